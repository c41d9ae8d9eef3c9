"""`SeriesAssembler`: decides when a series is complete and which series of a study to analyse.

A series is complete when no instance arrived for `quiet_seconds` ("quiet"), or earlier, after a
short settle time without an instance and only when its slice positions are evenly spaced with no
gap: when the instance count reaches the header's Images in Acquisition ("count_hint"), or when
the association that brought every instance of it was released by its sender and it has at least
`min_slices` instances ("association_release"; a sender that opens one association per instance
never triggers it). What told is kept per series (`completed_by`) and counted in
`ichnode_series_completed_total{by}`. When no series of its study is still being received,
node.selection chooses the series to analyse; every other one is skipped with its reason.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Literal

import numpy as np

from ichnode.common.config import Settings
from ichnode.common.slice_geometry import slice_normal, slice_spacing
from node.headers import InstanceHeader
from node.metrics import SERIES, SERIES_COMPLETED
from node.selection import choose_series
from node.store import SeriesRow, Store

log = logging.getLogger("ichnode.assembler")

EARLY_SETTLE_SECONDS = 1.0
Completion = Literal["quiet", "count_hint", "association_release"]


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
        self._released: dict[str, tuple[float, int]] = {}  # series -> (released at, instances it brought)
        self._lock = threading.Lock()  # association_released comes from the listener's threads

    def _headers(self, series_uid: str) -> list[InstanceHeader]:
        return [instance.header for instance in self.store.instances(series_uid)]

    def association_released(self, instances_by_series: dict[str, int], at: float | None = None) -> None:
        """A sender released its association, which brought these new instances of these series."""
        at = time.time() if at is None else at
        with self._lock:
            for series_uid, count in instances_by_series.items():
                self._released[series_uid] = (at, count)

    def _released_whole(self, series: SeriesRow) -> bool:
        """The series' every instance came on one association, since released, with none after it."""
        with self._lock:
            released_at, count = self._released.get(series.series_uid, (0.0, 0))
        return (count == series.instance_count >= self.series_settings.min_slices
                and series.last_received_at <= released_at)

    def completion(self, series: SeriesRow, now: float) -> Completion | None:
        """Whether the series is complete, and what tells; None while it may still grow."""
        idle = now - series.last_received_at
        if idle >= self.series_settings.quiet_seconds:
            return "quiet"
        if idle < EARLY_SETTLE_SECONDS:
            return None
        expected = series.images_in_acquisition
        hint: Completion | None = None
        if expected and series.instance_count >= expected:
            hint = "count_hint"
        elif self._released_whole(series):
            hint = "association_release"
        return hint if hint and positions_continuous(self._headers(series.series_uid)) else None

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        studies: set[str] = set()
        for series in self.store.series_in_state("receiving"):
            if series.completed_at is not None and series.completed_at >= series.last_received_at:
                studies.add(series.study_uid)  # complete, waiting for its study siblings
            elif (by := self.completion(series, now)) and self.store.mark_complete(
                    series.series_uid, series.last_received_at, by):
                with self._lock:
                    self._released.pop(series.series_uid, None)
                SERIES_COMPLETED.labels(by=by).inc()
                log.info("series %s complete with %d instances (%s)", series.series_uid, series.instance_count, by)
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
