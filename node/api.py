"""The node's HTTP API (FastAPI): health, metrics, studies and series, worklist and web page, and
STOW-RS (node/dicomweb.py).

When `http.api_token` is set every /api and /dicom-web route needs `Authorization: Bearer <token>`.
Every /api read is a `Query` line in the audit trail (node/audit.py) naming the caller (`api_token`
when the token was presented, `anonymous` without one configured) and address; a request refused
for its token is a `User Authentication` failure.
"""
from __future__ import annotations

import hmac
import time

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from ichnode.common.analysis import SeriesFindings, Skipped
from ichnode.common.config import Settings
from node import audit
from node.dicomweb import make_dicomweb_router
from node.intake import Intake
from node.latency import StageSeconds, stage_seconds
from node.metrics import CONTENT_TYPE, exposition
from node.spool import Spool
from node.store import Channel, DeliveryRow, SeriesRow, SeriesState, Store, StudyRow
from node.worklist import iso, make_worklist_router, mount_web


class SeriesTimings(BaseModel):
    """When the series reached each step (ISO-8601 UTC), what told it was complete, and the latency
    of its latest analysis per stage in seconds (node/latency.py)."""

    received: str | None
    last_received: str | None
    completed: str | None
    completed_by: str | None  # quiet, count_hint or association_release (node/assembler.py)
    queued: str | None
    started: str | None
    analysed: str | None
    stages: StageSeconds


class SeriesView(BaseModel):
    """One series as the API shows it: state, reason, timings and findings."""

    series_instance_uid: str
    state: SeriesState
    reason: str | None
    modality: str | None
    body_part: str | None
    description: str | None
    kernel: str | None
    instances: int
    generation: int
    timings: SeriesTimings
    findings: SeriesFindings | Skipped | None

    @classmethod
    def of(cls, series: SeriesRow, deliveries: list[DeliveryRow]) -> "SeriesView":
        """`deliveries`: the series' outbox items."""
        skipped = Skipped(skipped=series.reason) if series.state == "skipped" else None
        return cls(
            series_instance_uid=series.series_uid,
            state=series.state,
            reason=series.reason,
            modality=series.modality,
            body_part=series.body_part,
            description=series.description,
            kernel=series.kernel,
            instances=series.instance_count,
            generation=series.generation,
            timings=SeriesTimings(
                received=iso(series.received_at),
                last_received=iso(series.last_received_at),
                completed=iso(series.completed_at),
                completed_by=series.completed_by,
                queued=iso(series.queued_at),
                started=iso(series.started_at),
                analysed=iso(series.analysed_at),
                stages=stage_seconds(series, deliveries),
            ),
            findings=series.findings or skipped,
        )


class DeliveryView(BaseModel):
    id: int
    series_instance_uid: str
    generation: int
    channel: Channel
    target: str
    object: str  # the result file for DICOM; the other channels' messages are not shown
    state: str
    attempts: int
    last_error: str | None
    next_attempt: str | None
    sent: str | None

    @classmethod
    def of(cls, item: DeliveryRow) -> "DeliveryView":
        return cls(
            id=item.id, series_instance_uid=item.series_uid, generation=item.generation, channel=item.channel,
            target=item.target, object=item.payload if item.channel == "dicom" else f"<{item.channel} message>",
            state=item.state, attempts=item.attempts, last_error=item.last_error,
            next_attempt=iso(item.next_attempt_at) if item.state == "pending" else None, sent=iso(item.sent_at),
        )


class SeriesWithDeliveries(SeriesView):
    deliveries: list[DeliveryView]


class StudyView(BaseModel):
    study_instance_uid: str
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    received: str | None
    acknowledged: str | None
    acknowledged_by: str | None
    series: list[SeriesView]
    other_objects: int  # objects of other SOP classes than CT images, answered success and not analysed


def create_app(store: Store, settings: Settings, health: dict | None = None, spool: Spool | None = None) -> FastAPI:
    """`health` is a live dict the service fills (listener, workers); /healthz reports it. `spool`:
    the node's, shared with the DICOM listener so that one free-space check serves both (default:
    one of its own)."""
    health = health if health is not None else {}
    api_token = settings.http.api_token

    def require_token(request: Request) -> None:
        if not api_token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), api_token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(
        title="ichnode",
        version="0.1.0",
        description="ICH triage node API. Triage aid: NOT FOR DIAGNOSTIC USE.",
    )
    guarded = [Depends(require_token)]

    @app.middleware("http")
    async def audit_requests(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith(("/api/", "/dicom-web/")):
            address = request.client.host if request.client else None
            if response.status_code == 401:
                audit.record("User Authentication", "E", audit.MINOR_FAILURE, path=path, address=address,
                             reason="missing or wrong bearer token")
            elif request.method == "GET" and path.startswith("/api/"):
                audit.record("Query", "R", path=path, status=response.status_code, address=address,
                             user="api_token" if api_token else "anonymous")
        return response

    @app.get("/healthz")
    def healthz():
        problems = {k: v for k, v in health.items() if v is not True}
        body = {"status": "ok" if not problems else "degraded", "checks": dict(health), "time": iso(time.time())}
        if problems:
            raise HTTPException(503, body)
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return PlainTextResponse(exposition(), media_type=CONTENT_TYPE)

    def study_view(study: StudyRow) -> StudyView:
        return StudyView(
            study_instance_uid=study.study_uid,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            accession_number=study.accession_number,
            study_date=study.study_date,
            received=iso(study.received_at),
            acknowledged=iso(study.acknowledged_at),
            acknowledged_by=study.acknowledged_by,
            series=[SeriesView.of(s, store.deliveries(s.series_uid)) for s in store.study_series(study.study_uid)],
            other_objects=store.other_objects(study.study_uid),
        )

    @app.get("/api/studies", dependencies=guarded, response_model=list[StudyView])
    def studies():
        return [study_view(s) for s in store.studies()]

    @app.get("/api/studies/{study_uid}", dependencies=guarded, response_model=StudyView)
    def study(study_uid: str):
        found = store.study(study_uid)
        if not found:
            raise HTTPException(404, f"no study {study_uid}")
        return study_view(found)

    @app.get("/api/series/{series_uid}", dependencies=guarded, response_model=SeriesWithDeliveries)
    def series(series_uid: str):
        found = store.series(series_uid)
        if not found:
            raise HTTPException(404, f"no series {series_uid}")
        items = store.deliveries(series_uid)
        return SeriesWithDeliveries(**dict(SeriesView.of(found, items)), deliveries=[DeliveryView.of(d) for d in items])

    @app.post("/api/series/{series_uid}/retry", dependencies=guarded, response_model=SeriesView, status_code=202)
    def retry(series_uid: str):
        """Analyse a failed series again: it is dispatched within a second."""
        found = store.series(series_uid)
        if not found:
            raise HTTPException(404, f"no series {series_uid}")
        if not store.retry_series(series_uid):
            raise HTTPException(409, f"series {series_uid} is {found.state}, not failed: nothing to retry")
        return SeriesView.of(store.series(series_uid), store.deliveries(series_uid))

    @app.get("/api/deliveries", dependencies=guarded, response_model=list[DeliveryView])
    def deliveries():
        return [DeliveryView.of(d) for d in store.deliveries()]

    app.include_router(make_worklist_router(store, settings.storage), dependencies=guarded)
    spool = spool or Spool(settings.storage.spool_dir, settings.storage.min_free_bytes)
    intake = Intake(spool, store, settings.listener)
    app.include_router(make_dicomweb_router(intake), dependencies=guarded)
    mount_web(app)
    return app
