"""The node's HTTP API (FastAPI): health, metrics, studies and series, worklist and web page, and
STOW-RS (node/dicomweb.py).

When `api_token` is set every /api and /dicom-web route needs `Authorization: Bearer <token>`.
"""
from __future__ import annotations

import hmac
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.config import Settings
from node.dicomweb import make_dicomweb_router
from node.intake import Intake
from node.spool import Spool
from node.store import Store
from node.worklist import iso, make_worklist_router, mount_web


def series_view(series: dict) -> dict:
    """One series as the API shows it: state, reason, timings and findings."""
    findings = series.get("findings")
    return {
        "series_instance_uid": series["series_uid"],
        "state": series["state"],
        "reason": series["reason"],
        "modality": series["modality"],
        "body_part": series["body_part"],
        "description": series["description"],
        "kernel": series["kernel"],
        "instances": series["instance_count"],
        "generation": series["generation"],
        "timings": {
            "received": iso(series["received_at"]),
            "last_received": iso(series["last_received_at"]),
            "completed": iso(series["completed_at"]),
            "queued": iso(series["queued_at"]),
            "started": iso(series["started_at"]),
            "analysed": iso(series["analysed_at"]),
        },
        "findings": findings if findings else ({"skipped": series["reason"]} if series["state"] == "skipped" else None),
    }


def create_app(store: Store, settings: Settings, health: dict | None = None) -> FastAPI:
    """`health` is a live dict the service fills (listener, workers); /healthz reports it."""
    health = health if health is not None else {}

    def require_token(request: Request) -> None:
        if not settings.api_token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), settings.api_token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="ichnode",
        version="0.1.0",
        description="ICH triage node API. Triage aid: NOT FOR DIAGNOSTIC USE.",
    )
    guarded = [Depends(require_token)]

    @app.get("/healthz")
    def healthz():
        problems = {k: v for k, v in health.items() if v is not True}
        body = {"status": "ok" if not problems else "degraded", "checks": dict(health), "time": iso(time.time())}
        if problems:
            raise HTTPException(503, body)
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(generate_latest().decode(), media_type=CONTENT_TYPE_LATEST)

    def with_series(study: dict) -> dict:
        return dict(_study_view(study), series=[series_view(x) for x in store.study_series(study["study_uid"])])

    @app.get("/api/studies", dependencies=guarded)
    def studies():
        return [with_series(s) for s in store.studies()]

    @app.get("/api/studies/{study_uid}", dependencies=guarded)
    def study(study_uid: str):
        found = store.study(study_uid)
        if not found:
            raise HTTPException(404, f"no study {study_uid}")
        return with_series(found)

    @app.get("/api/series/{series_uid}", dependencies=guarded)
    def series(series_uid: str):
        found = store.series(series_uid)
        if not found:
            raise HTTPException(404, f"no series {series_uid}")
        return dict(series_view(found), deliveries=[_delivery_view(d) for d in store.deliveries(series_uid)])

    @app.get("/api/deliveries", dependencies=guarded)
    def deliveries():
        return [_delivery_view(d) for d in store.deliveries()]

    app.include_router(make_worklist_router(store, settings), dependencies=guarded)
    app.include_router(make_dicomweb_router(Intake(Spool(settings.spool_dir), store)), dependencies=guarded)
    mount_web(app)
    return app


def _study_view(study: dict) -> dict:
    return {
        "study_instance_uid": study["study_uid"],
        "patient_id": study["patient_id"],
        "patient_name": study["patient_name"],
        "accession_number": study["accession_number"],
        "study_date": study["study_date"],
        "received": iso(study["received_at"]),
        "acknowledged": iso(study["acknowledged_at"]),
        "acknowledged_by": study["acknowledged_by"],
    }


def _delivery_view(item: dict) -> dict:
    payload = item["payload"] if item["channel"] == "dicom" else f"<{item['channel']} message>"
    return {
        "id": item["id"], "series_instance_uid": item["series_uid"], "generation": item["generation"],
        "channel": item["channel"], "target": item["target"], "object": payload, "state": item["state"],
        "attempts": item["attempts"], "last_error": item["last_error"],
        "next_attempt": iso(item["next_attempt_at"]) if item["state"] == "pending" else None,
        "sent": iso(item["sent_at"]),
    }


