"""STOW-RS receive (PS3.18 10.5): ``POST /dicom-web/studies`` and ``/dicom-web/studies/{StudyInstanceUID}``.

The body is ``multipart/related; type="application/dicom"``, one Part 10 instance per part. It is
parsed as it streams in (python-multipart), and each instance goes through the same intake as a
C-STORE (node/intake.py: validation, spool with fsync, record, a duplicate kept once) before the
next part is read, so the answer follows only when every instance is stored or refused. With a
study in the URL, an instance of another study is refused (0xA900).

The answer is the Store Instances Response in application/dicom+json, or application/dicom+xml
for a client that accepts only XML: ReferencedSOPSequence for the instances stored (duplicates
included), FailedSOPSequence with a Failure Reason (the C-STORE status code) for the others.
HTTP status: 200 all stored, 202 some refused, 409 none stored; 400 no instance or a malformed
body (instances before the malformation are kept), 415 another media type, 406 an Accept header
that allows neither JSON nor XML.
"""
from __future__ import annotations

import logging
from io import BytesIO
from xml.etree.ElementTree import Element, SubElement, tostring

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from pydicom import Dataset, dcmread
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from node import audit
from node.headers import InstanceHeader
from node.intake import Intake, Refused

log = logging.getLogger("ichnode.dicomweb")

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
NATIVE_DICOM_MODEL = "http://dicom.nema.org/PS3.19/models/NativeDICOM"


class _Parts:
    """The parts of a multipart body, as python-multipart's callbacks deliver them in pieces."""

    def __init__(self):
        self.complete: list[tuple[str, bytes]] = []  # (part Content-Type, bytes), in order
        self._headers: dict[str, str] = {}
        self._field = self._value = b""
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_part_data": self._part_data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field = self._value = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]

    def _end(self) -> None:
        media_type, _ = parse_options_header(self._headers.get("content-type", "application/dicom"))
        self.complete.append((media_type.decode("latin-1"), bytes(self._data)))

    def take(self) -> list[tuple[str, bytes]]:
        taken, self.complete = self.complete, []
        return taken


def _response_media_type(accept: str) -> str:
    """JSON unless the client accepts XML and not JSON (quality values are not weighed)."""
    accepted = {item.split(";")[0].strip().lower() for item in accept.split(",") if item.strip()}
    if not accepted or accepted & {DICOM_JSON, "application/json", "application/*", "*/*"}:
        return DICOM_JSON
    if accepted & {DICOM_XML, "application/xml"}:
        return DICOM_XML
    raise HTTPException(406, f"the Store Instances Response is {DICOM_JSON} or {DICOM_XML}; Accept was {accept!r}")


def _identify(data: bytes) -> tuple[str | None, str | None]:
    """SOP Class and Instance UID of a refused instance, where its header can be read."""
    try:
        ds = dcmread(BytesIO(data), stop_before_pixels=True, force=True)
        return ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    except Exception:  # unreadable: its FailedSOPSequence item has the Failure Reason alone
        return None, None


def _reference(sop_class: str | None, sop_instance: str | None, failure_reason: int | None = None) -> Dataset:
    item = Dataset()
    if sop_class:
        item.ReferencedSOPClassUID = sop_class
    if sop_instance:
        item.ReferencedSOPInstanceUID = sop_instance
    if failure_reason is not None:
        item.FailureReason = failure_reason
    return item


def _xml(ds: Dataset, parent: Element) -> Element:
    """The Native DICOM Model (PS3.19) of a data set of UI, US and SQ attributes (the response's)."""
    for element in ds:
        attribute = SubElement(parent, "DicomAttribute", tag=f"{element.tag:08X}", vr=element.VR,
                               keyword=element.keyword)
        if element.VR == "SQ":
            for number, item in enumerate(element.value, 1):
                _xml(item, SubElement(attribute, "Item", number=str(number)))
        else:
            SubElement(attribute, "Value", number="1").text = str(element.value)
    return parent


def _encode(response: Dataset, media_type: str) -> bytes:
    if media_type == DICOM_XML:
        root = _xml(response, Element("NativeDicomModel", xmlns=NATIVE_DICOM_MODEL))
        return tostring(root, encoding="utf-8", xml_declaration=True)
    return response.to_json().encode()


def make_dicomweb_router(intake: Intake) -> APIRouter:
    router = APIRouter(prefix="/dicom-web", tags=["DICOMweb"])

    async def store(request: Request, study_uid: str | None) -> Response:
        media_type = _response_media_type(request.headers.get("accept", ""))
        content_type, params = parse_options_header(request.headers.get("content-type", ""))
        related_type = params.get(b"type", b"application/dicom").lower()
        if content_type != b"multipart/related" or related_type != b"application/dicom":
            raise HTTPException(415, 'STOW-RS takes multipart/related; type="application/dicom" (Part 10 instances)')
        if not params.get(b"boundary"):
            raise HTTPException(400, "the multipart/related Content-Type has no boundary")
        source = f"STOW-RS {request.client.host if request.client else 'unknown client'}"

        def matches_url(header: InstanceHeader) -> None:
            if study_uid is not None and header.study_instance_uid != study_uid:
                raise Refused(0xA900, f"Study Instance UID differs from the request URL's {study_uid}")

        stored: list[Dataset] = []
        failed: list[Dataset] = []
        headers: list[InstanceHeader] = []  # of the instances stored, for the audit trail

        async def accept(part_type: str, data: bytes) -> None:
            if part_type != "application/dicom":
                log.warning("%s: part %d is %s, not application/dicom: refused", source,
                            len(stored) + len(failed) + 1, part_type)
                failed.append(_reference(None, None, failure_reason=0xC000))
                return
            try:
                header = await run_in_threadpool(intake.accept, data, source, matches_url)
            except Refused as refused:
                failed.append(_reference(*_identify(data), failure_reason=refused.status))
                return
            stored.append(_reference(header.sop_class_uid, header.sop_instance_uid))
            headers.append(header)

        parts = _Parts()
        parser = MultipartParser(params[b"boundary"], parts.callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
                for part in parts.take():
                    await accept(*part)
        except MultipartParseError as exc:
            log.warning("%s: malformed multipart body after %d instance(s): %s", source, len(stored) + len(failed), exc)
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        except ClientDisconnect:
            log.warning("%s: the client went away after %d instance(s)", source, len(stored) + len(failed))
            raise HTTPException(400, "the client disconnected before the end of the body") from None
        finally:  # what was stored is audited however the request ends
            audit.instances_stored(headers, peer="STOW-RS", address=request.client.host if request.client else None)
        if parser.state != MultipartState.END:
            log.warning("%s: body ends before the closing boundary", source)
            raise HTTPException(400, "the multipart body ends before its closing boundary")
        if not stored and not failed:
            raise HTTPException(400, "no instance in the request")
        response = Dataset()
        if stored:
            response.ReferencedSOPSequence = stored
        if failed:
            response.FailedSOPSequence = failed
        status = 200 if not failed else 202 if stored else 409
        log.info("%s: %d instance(s) stored, %d refused", source, len(stored), len(failed))
        return Response(_encode(response, media_type), status_code=status, media_type=media_type)

    @router.post("/studies", summary="STOW-RS: store instances")
    async def store_instances(request: Request) -> Response:
        return await store(request, None)

    @router.post("/studies/{study_uid}", summary="STOW-RS: store instances of one study")
    async def store_study_instances(request: Request, study_uid: str) -> Response:
        return await store(request, study_uid)

    return router
