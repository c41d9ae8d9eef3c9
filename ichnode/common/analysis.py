"""The result contract: what the worker hands back for one series, one model end to end.

`Findings` is findings.json (README "findings.json"). `SeriesFindings` adds what the worker
knows of its run (result files, loader warnings, seconds, seconds per stage); the node stores it, the API shows it
and HL7, webhooks and the worklist read it. `AnalysisResult` is the Celery task's return value:
the series, its dispatch generation, and its findings or why it was not analysed.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ichnode.common.vocabulary import Level


class Priority(BaseModel):
    """The worklist priority of a result (worker.priority assigns it)."""

    model_config = ConfigDict(frozen=True)
    level: Level
    score: float  # sorts the worklist, higher first: every STAT above every URGENT above every ROUTINE
    rationale: str


class ModelIdentity(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    version: str


class Findings(BaseModel):
    """What the detector found in one series, as findings.json holds it."""

    study_instance_uid: str
    series_instance_uid: str
    probabilities: dict[str, float]  # keys vocabulary.LABELS
    volumes_ml: dict[str, float]
    slice_scores: list[float]  # one per slice, inferior to superior
    key_slices: list[str]  # SOP Instance UIDs, highest score first
    priority: Priority
    difficult: bool
    model: ModelIdentity
    result_uids: dict[str, str] = {}  # object kind (sr, seg, kos, sc:<n>) -> SOP Instance UID


class WorkerStages(BaseModel):
    """The worker's seconds per stage of one series (the node adds the stages around them)."""

    model_config = ConfigDict(frozen=True)
    load: float  # reading the instances into a Hounsfield volume
    detector: float  # the model, findings and priority
    result_objects: float  # building and writing the DICOM results, thumbnails and findings.json


class WorkerStagePeaks(BaseModel):
    """The worker process's peak resident memory in MB during each stage of one series
    (worker/memory.py; Linux only)."""

    model_config = ConfigDict(frozen=True)
    load: float
    detector: float
    result_objects: float


class SeriesFindings(Findings):
    """Findings with what the worker adds about its run: the node's record of an analysed series."""

    result_files: list[str] = []  # DICOM result objects in sending order, relative to data_dir
    warnings: list[str] = []  # the loader's: instances left out, gantry tilt, missing slices
    seconds: float | None = None  # the worker's time for the series
    stages: WorkerStages | None = None  # the same time per stage (None from older workers)
    peak_memory_mb: WorkerStagePeaks | None = None  # None where the system does not tell


class Skipped(BaseModel):
    """A series that was not analysed, and why (findings.json and the API say so)."""

    skipped: str


class AnalysisResult(BaseModel):
    """The return value of the analysis task for one dispatch (generation) of a series."""

    series_uid: str
    generation: int
    outcome: SeriesFindings | Skipped
