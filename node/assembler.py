"""`SeriesAssembler`: decides when a series is complete and which series of a study to analyse.

A series is complete when no instance arrived for `quiet_seconds`, or earlier (after a short
settle time) when the instance count reaches the header's Images in Acquisition and the slice
positions are evenly spaced with no gap. When no series of its study is still being received,
node.selection chooses the series to analyse; every other one is skipped with its reason.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from ichnode.common.config import Settings
from ichnode.common.slice_geometry import slice_normal, slice_spacing
from node.headers import InstanceHeader
from node.metrics import SERIES
from node.selection import choose_series
from node.store import SeriesRow, Store

log = logging.getLogger("ichnode.assembler")

EARLY_SETTLE_SECONDS = 1.0


def positions_continuous(headers: list[InstanceHeader]) -> bool:
    """Evenly spaced slice positions along the normal, no gap and no duplicate."""
    orientation = next((h.image_orientation for h in headers if h.image_orientation), None)
    positions = [h.image_position for h in headers if h.image_position]
    if orientation is None or len(positions) != len(headers) or len(positions) < 3:
        return False
    return slice_spacing(np.sort(np.asarray(positions) @ slice_normal(orientation))).continuous


class SeriesAssembler:
    def __init__(self, store: Store, settings: Settings, dispatch: Callable[[str, float], None]):
        self.store = store
        self.series_settings = settings.series
        self.dispatch = dispatch  # (series_uid, last_received_at) -> queue it

    def _headers(self, series_uid: str) -> list[InstanceHeader]:
        return [instance.header for instance in self.store.instances(series_uid)]

    def is_complete(self, series: SeriesRow, now: float) -> bool:
        idle = now - series.last_received_at
        if idle >= self.series_settings.quiet_seconds:
            return True
        expected = series.images_in_acquisition
        if not expected or series.instance_count < expected or idle < EARLY_SETTLE_SECONDS:
            return False
        return positions_continuous(self._headers(series.series_uid))

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        studies: set[str] = set()
        for series in self.store.series_in_state("receiving"):
            if series.completed_at is not None and series.completed_at >= series.last_received_at:
                studies.add(series.study_uid)  # complete, waiting for its study siblings
            elif self.is_complete(series, now) and self.store.mark_complete(series.series_uid, series.last_received_at):
                log.info("series %s complete with %d instances", series.series_uid, series.instance_count)
                studies.add(series.study_uid)
        for study_uid in studies:
            self.select(study_uid)

    def select(self, study_uid: str) -> None:
        series = self.store.study_series(study_uid)
        waiting = [s for s in series if s.state == "receiving"]
        if any(s.completed_at is None or s.completed_at < s.last_received_at for s in waiting):
            return  # a sibling series is still arriving: choose once the study is in
        analysed = [s for s in series if s.state in ("queued", "analysing", "done", "failed")]
        candidates = {s.series_uid: self._headers(s.series_uid) for s in waiting + analysed}
        rule = self.series_settings
        chosen, skipped = choose_series(candidates, rule.min_slices, rule.min_coverage_mm, rule.analyse_contrast)
        for s in waiting:
            uid = s.series_uid
            if uid == chosen:
                self.dispatch(uid, s.last_received_at)
            else:
                reason = skipped.get(uid) or f"another series was chosen: {chosen}"
                log.info("series %s skipped: %s", uid, reason)
                self.store.mark_skipped(uid, reason)
                SERIES.labels(state="skipped").inc()
