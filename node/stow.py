"""STOW-RS delivery (PS3.18 10.5): result objects to a DICOMweb archive, one request per object.

One object per request, so a server that refuses an object (409 or 400, or a FailedSOPSequence
item in a 202) fails that object only: the others are stored and the outbox retries the refused
one. An object counts as stored only when the Store Instances Response lists it in
ReferencedSOPSequence; a Warning Reason there is kept with its outbox item. When the server cannot
be reached (connection, TLS, time-out) the remaining objects wait for the next round.

dicomweb-client builds the multipart/related request. `stow_token` (bearer) or
`stow_username`/`stow_password` (basic) go into the session's headers, never into a log line.
"""
from __future__ import annotations

import ssl
from pathlib import Path

import requests
from dicomweb_client import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from ichnode.common.config import DeliverySection, StowEndpoint
from node.errors import Outcome

TIMEOUT_SECONDS = (10, 60)  # connect, read
# meanings of the PS3.4 status codes STOW-RS responses use, by hexadecimal code or class; longest prefix wins
FAILURE_REASONS = {"0110": "processing failure", "0122": "SOP class not supported",
                   "C122": "transfer syntax not supported", "A7": "out of resources",
                   "A9": "data set does not match SOP class", "C": "cannot understand"}
WARNING_REASONS = {"B000": "coercion of data elements", "B006": "elements discarded",
                   "B007": "data set does not match SOP class"}


def _system_ca_store() -> str | bool:
    """requests trusts certifi's bundle by default; a hospital adds its CA to the system's store."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.capath or True


def stow_client(endpoint: StowEndpoint, delivery: DeliverySection, on_response) -> DICOMwebClient:
    """A client whose every HTTP response also goes to `on_response`: dicomweb-client returns only the
    body it could parse (by exact media type), and raises on an error status."""
    session = requests.Session()
    session.verify = str(delivery.stow_ca_bundle) if delivery.stow_ca_bundle else _system_ca_store()
    session.headers.update({"Accept": "application/dicom+json", "User-Agent": "ichnode"})
    if delivery.stow_token.get_secret_value():
        session.headers["Authorization"] = f"Bearer {delivery.stow_token.get_secret_value()}"
    elif delivery.stow_username:
        session.auth = (delivery.stow_username, delivery.stow_password.get_secret_value())
    # chunk_size above any object: each request goes with a Content-Length (not chunked), which every server takes
    client = DICOMwebClient(endpoint.url, session=session, timeout=TIMEOUT_SECONDS, chunk_size=1 << 31,
                            callback=lambda response, *args, **kwargs: on_response(response))
    client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff
    return client


def describe(code: int | None, reasons: dict[str, str]) -> str:
    """``0xA900 (data set does not match SOP class)``: a reason code with its meaning, when known."""
    if code is None:
        return "none given"
    text = f"{code:04X}"
    meaning = next((reasons[prefix] for prefix in sorted(reasons, key=len, reverse=True) if text.startswith(prefix)),
                   None)
    return f"0x{text}" + (f" ({meaning})" if meaning else "")


def _store_instances_response(response: requests.Response) -> Dataset:
    """The response body as a data set; empty when it is not DICOM JSON."""
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type not in ("application/dicom+json", "application/json"):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return Dataset()


def _item(response: Dataset, sequence: str, sop_uid: str) -> Dataset | None:
    return next((item for item in response.get(sequence, [])
                 if item.get("ReferencedSOPInstanceUID") == sop_uid), None)


def judge(where: str, sop_uid: str, response: requests.Response) -> Outcome:
    """The outcome of one object from the server's answer to its STOW-RS request."""
    status = f"{where}: HTTP {response.status_code} {response.reason}"
    body = _store_instances_response(response)
    failed = _item(body, "FailedSOPSequence", sop_uid)
    if failed is not None:
        return Outcome(error=f"{status}: Failure Reason {describe(failed.get('FailureReason'), FAILURE_REASONS)}")
    if not response.ok:
        return Outcome(error=f"{status}: {' '.join(response.text.split())[:200]}")
    stored = _item(body, "ReferencedSOPSequence", sop_uid)
    if stored is None:
        return Outcome(error=f"{status}: the Store Instances Response does not list the object as stored")
    warning = stored.get("WarningReason")
    return Outcome(warning=None if warning is None else f"{where}: Warning Reason {describe(warning, WARNING_REASONS)}")


def send_stow(endpoint: StowEndpoint, paths: list[Path], delivery: DeliverySection) -> dict[Path, Outcome]:
    """STOW-RS each file to the endpoint; returns path -> outcome."""
    answers: list[requests.Response] = []
    client = stow_client(endpoint, delivery, answers.append)
    where = str(endpoint)
    outcome: dict[Path, Outcome] = {}
    for path in paths:
        try:
            ds = dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            outcome[path] = Outcome(error=f"result file {path} cannot be read: {exc}")
            continue
        answers.clear()
        problem: Exception | None = None
        try:
            client.store_instances([ds])
        except (requests.HTTPError, ValueError) as exc:  # an error status, or a body dicomweb-client cannot read
            problem = exc
        except requests.RequestException as exc:  # no answer: connection refused, TLS, time-out
            unreachable = Outcome(error=f"{where}: {type(exc).__name__}: {exc}")
            outcome.update({rest: unreachable for rest in paths if rest not in outcome})
            break
        if answers:
            outcome[path] = judge(where, str(ds.SOPInstanceUID), answers[-1])
        else:  # it failed before sending (the object could not be encoded)
            outcome[path] = Outcome(error=f"{where}: not sent: {type(problem).__name__}: {problem}")
    return outcome
