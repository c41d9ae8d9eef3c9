"""The radiologist's worklist: studies in reading order, acknowledgements, heatmap thumbnails.

One row per study, shown through its *chosen* series: the analysed series with the highest
priority, otherwise the series furthest along (analysing, queued, receiving, failed, skipped).
A series being re-received after a late instance keeps its previous findings, so a STAT study
does not drop down the list while its update arrives.

Order: analysed studies by priority score (highest first), then studies without findings, each
group oldest arrival first. The node's web page (node/web) renders this list.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, HTTPException, Path as PathParam, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ichnode.common.analysis import Priority
from ichnode.common.config import StorageSection
from ichnode.common.vocabulary import Level
from node import audit
from node.store import SeriesRow, SeriesState, Store, StudyRow

WEB_DIR = Path(__file__).parent / "web"

# which series stands for its study when none has findings: the one furthest along
_STATE_RANK = {"analysing": 5, "queued": 4, "receiving": 3, "done": 2, "failed": 1, "skipped": 0}


class Timings(BaseModel):
    received: str | None = Field(description="first instance of the study received (ISO-8601 UTC)")
    completed: str | None = Field(description="series complete, ready to dispatch")
    analysed: str | None = Field(description="analysis finished")


class Acknowledgement(BaseModel):
    by: str
    at: str


class WorklistItem(BaseModel):
    study_instance_uid: str
    series_instance_uid: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    state: SeriesState | None = Field(description="state of the chosen series; None for a study without series")
    reason: str | None = Field(description="why the series was skipped or failed")
    priority: Priority | None = Field(description="None until the study has findings")
    probabilities: dict[str, float] = Field(description="p(any) and per subtype: EDH, IPH, IVH, SAH, SDH")
    volumes_ml: dict[str, float]
    difficult: bool
    thumbnails: list[str] = Field(description="heatmap thumbnail URLs, one per key slice, most suspicious first")
    timings: Timings
    acknowledged: Acknowledgement | None


class AckRequest(BaseModel):
    by: str = Field(min_length=1, max_length=64, pattern=r"\S", description="who read the study")


def iso(ts: float | None) -> str | None:
    """A store timestamp as ISO-8601 UTC, as every API response gives times."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts else None


def series_url(series_uid: str) -> str:
    """Where the API serves a series; the UID is quoted, as received UIDs may hold any character."""
    return f"/api/series/{quote(series_uid, safe='')}"


def thumbnail_url(series_uid: str, index: int) -> str:
    """Where the API serves the index-th heatmap thumbnail of a series."""
    return f"{series_url(series_uid)}/thumbnails/{index}.png"


def _chosen_series(series: list[SeriesRow]) -> SeriesRow | None:
    analysed = [s for s in series if s.findings]
    if analysed:
        return max(analysed, key=lambda s: s.findings.priority.score)
    return max(series, key=lambda s: _STATE_RANK[s.state], default=None)


def _item(storage: StorageSection, study: StudyRow, series: SeriesRow | None) -> WorklistItem:
    findings = series.findings if series else None
    acknowledged = (
        Acknowledgement(by=study.acknowledged_by, at=iso(study.acknowledged_at)) if study.acknowledged_at else None
    )
    thumbnails = []
    if findings:
        folder = storage.result_folder(series.series_uid)
        thumbnails = [thumbnail_url(series.series_uid, n) for n in range(len(findings.key_slices))
                      if folder.thumbnail(n).is_file()]
    return WorklistItem(
        study_instance_uid=study.study_uid,
        series_instance_uid=series.series_uid if series else None,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        accession_number=study.accession_number,
        state=series.state if series else None,
        reason=series.reason if series else None,
        priority=findings.priority if findings else None,
        probabilities=findings.probabilities if findings else {},
        volumes_ml=findings.volumes_ml if findings else {},
        difficult=findings.difficult if findings else False,
        thumbnails=thumbnails,
        timings=Timings(
            received=iso(study.received_at),
            completed=iso(series.completed_at) if series else None,
            analysed=iso(series.analysed_at) if series else None,
        ),
        acknowledged=acknowledged,
    )


def _sort_key(item: WorklistItem, received_at: float) -> tuple:
    if item.priority is None:
        return (1, 0.0, received_at)
    return (0, -item.priority.score, received_at)


def make_worklist_router(store: Store, storage: StorageSection) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["worklist"])

    @router.get("/worklist", response_model=list[WorklistItem], summary="Studies in reading order")
    def worklist(
        state: SeriesState | None = Query(None, description="only studies whose chosen series is in this state"),
        level: Level | None = Query(None, description="only studies with this priority level"),
        include_acknowledged: bool = Query(True, description="false: hide studies already acknowledged"),
    ) -> list[WorklistItem]:
        rows = []
        for study in store.studies():
            item = _item(storage, study, _chosen_series(store.study_series(study.study_uid)))
            if state and item.state != state:
                continue
            if level and (item.priority is None or item.priority.level != level):
                continue
            if not include_acknowledged and item.acknowledged:
                continue
            rows.append((_sort_key(item, study.received_at), item))
        return [item for _, item in sorted(rows, key=lambda row: row[0])]

    @router.post("/studies/{study_uid}/ack", response_model=WorklistItem, summary="Acknowledge a study as read")
    def acknowledge(body: AckRequest, study_uid: str) -> WorklistItem:
        if not store.acknowledge(study_uid, body.by.strip()):
            raise HTTPException(404, f"no study {study_uid}")
        audit.record("Procedure Record", "U", study_instance_uid=study_uid, acknowledged_by=body.by.strip())
        return _item(storage, store.study(study_uid), _chosen_series(store.study_series(study_uid)))

    @router.get(
        "/series/{series_uid}/thumbnails/{n}.png",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such thumbnail"}},
        summary="Heatmap thumbnail of the n-th key slice",
    )
    def thumbnail(series_uid: str, n: int = PathParam(ge=0, le=99)):
        path = storage.result_folder(series_uid).thumbnail(n)
        if not path.is_file():
            raise HTTPException(404, f"no thumbnail {n} for series {series_uid}")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})

    return router


def mount_web(app: FastAPI) -> None:
    """Serve the worklist page at / and its script and style sheet under /static."""
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})
