"""Webhooks: a JSON POST per analysed series at or above `webhook_min_level` (chat, paging, ...).

The payload carries no patient name, patient ID or accession number unless
`webhook_include_patient` is set: webhook receivers are often outside the hospital's PACS/RIS
trust zone. docs/INTEGRATION.md shows an example payload.
"""
from __future__ import annotations

import httpx

from ichnode.common.analysis import Findings
from ichnode.common.vocabulary import DISCLAIMER, LEVEL_RANK, Level
from node.errors import DeliveryError
from node.store import StudyRow
from node.worklist import series_url, thumbnail_url

EVENT = "ich.result"


def should_notify(level: Level, min_level: Level) -> bool:
    """True when `level` is at least as urgent as `min_level` (STAT > URGENT > ROUTINE)."""
    return LEVEL_RANK[level] >= LEVEL_RANK[min_level]


def build_webhook_payload(findings: Findings, study: StudyRow, include_patient: bool, base_url: str = "") -> dict:
    """The JSON body for one result. Links are relative to the node unless `base_url` is given."""
    series_uid = findings.series_instance_uid
    base = base_url.rstrip("/")
    payload = {
        "event": EVENT,
        "disclaimer": DISCLAIMER,
        "study_instance_uid": findings.study_instance_uid,
        "series_instance_uid": series_uid,
        "priority": findings.priority.model_dump(),
        "probabilities": findings.probabilities,
        "volumes_ml": findings.volumes_ml,
        "difficult": findings.difficult,
        "key_slices": findings.key_slices,
        "model": findings.model.model_dump(),
        "links": {
            "worklist": f"{base}/",
            "series": base + series_url(series_uid),
            "thumbnails": [base + thumbnail_url(series_uid, n) for n in range(len(findings.key_slices))],
        },
    }
    if include_patient:
        payload["patient"] = {"id": study.patient_id, "name": study.patient_name}
        payload["accession_number"] = study.accession_number
    return payload


def post_webhook(url: str, payload: dict, timeout: float = 10.0) -> None:
    """POST the payload as JSON; DeliveryError unless the receiver answers 2xx within `timeout`.

    Redirects are not followed: a webhook URL should name its final endpoint.
    """
    try:
        response = httpx.post(url, json=payload, timeout=timeout, headers={"User-Agent": "ichnode"})
    except httpx.TimeoutException:
        raise DeliveryError(f"webhook {url}: no response within {timeout:g} s") from None
    except httpx.ConnectError as exc:
        raise DeliveryError(f"webhook {url}: cannot connect: {exc}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise DeliveryError(f"webhook {url}: {type(exc).__name__}: {exc}") from None
    if not response.is_success:
        body = " ".join(response.text.split())[:200]
        location = f" to {response.headers['location']}" if response.is_redirect else ""
        raise DeliveryError(f"webhook {url}: HTTP {response.status_code} {response.reason_phrase}{location}: {body}")
