"""End-to-end latency of an analysed series, per stage, from its last instance received to its
results acknowledged by every destination.

  completion_wait  last instance received -> the assembler finds the series complete
  queue            complete -> result stored, less the worker's own stages: selection, waiting
                   for a worker, task transport and result pick-up
  load, detector, result_objects   the worker's stages (ichnode.common.analysis.WorkerStages)
  delivery         result stored -> the last result item acknowledged (DICOM, HL7, webhooks)
  total            last instance received -> the last acknowledgement (or the result stored, when
                   there is nothing to deliver)

The series API shows them (`timings.stages`) and /metrics has them as the histogram
`ichnode_series_stage_seconds{stage}`, observed when the result is stored and when its last item
is delivered.
"""
from __future__ import annotations

from pydantic import BaseModel

from node.metrics import STAGE_SECONDS
from node.store import DeliveryRow, SeriesRow


class StageSeconds(BaseModel):
    """Seconds per stage; None for a stage not reached (or not reported by an older worker)."""

    completion_wait: float | None = None
    queue: float | None = None
    load: float | None = None
    detector: float | None = None
    result_objects: float | None = None
    delivery: float | None = None
    total: float | None = None


def stage_seconds(series: SeriesRow, deliveries: list[DeliveryRow]) -> StageSeconds:
    """The stages of the series' latest analysis; `deliveries` are its outbox items (any generation)."""
    stages: dict[str, float] = {}
    if series.completed_at is not None and series.completed_at >= series.last_received_at:
        stages["completion_wait"] = series.completed_at - series.last_received_at
    findings = series.findings
    if series.state == "done" and series.analysed_at and findings is not None:
        worker = findings.stages
        if worker is not None:
            stages.update(worker.model_dump())
            if series.completed_at is not None:
                stages["queue"] = max(0.0, series.analysed_at - series.completed_at - sum(worker.model_dump().values()))
        ours = [d for d in deliveries if d.generation == series.generation]
        if ours and all(d.state == "sent" and d.sent_at for d in ours):
            delivered_at = max(d.sent_at for d in ours)
            stages["delivery"] = max(0.0, delivered_at - series.analysed_at)
            stages["total"] = delivered_at - series.last_received_at
        elif not ours:
            stages["total"] = series.analysed_at - series.last_received_at
    return StageSeconds(**{name: round(value, 3) for name, value in stages.items()})


def observe(stages: StageSeconds, *names: str) -> None:
    """Put the named stages that are known into the /metrics histogram."""
    for name in names:
        value = getattr(stages, name)
        if value is not None:
            STAGE_SECONDS.labels(stage=name).observe(value)
