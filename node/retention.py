"""`purge_expired`: free the disk of series finished more than `retention_days` ago.

A series' spooled instances and result objects go once it is analysed (or skipped or failed)
and nothing is left to deliver; the store keeps the study, the series state and its findings,
so the worklist and API still show it. Objects of other SOP classes kept in the spool
(`[listener] other_objects = "keep"`) go `retention_days` after they arrived; they stay counted.
"""
from __future__ import annotations

import logging
import shutil
import time

from ichnode.common.config import StorageSection
from node.spool import Spool
from node.store import Store

log = logging.getLogger("ichnode.retention")


def purge_expired(store: Store, spool: Spool, storage: StorageSection, now: float | None = None) -> int:
    if not storage.retention_days:
        return 0
    now = time.time() if now is None else now
    cutoff = now - storage.retention_days * 86400
    others = store.expired_other_objects(cutoff)
    for path in others:
        (spool.root / path).unlink(missing_ok=True)
    store.forget_other_object_files(others)
    purged = 0
    for series in store.expired_series(cutoff):
        for folder in (spool.series_dir(series.study_uid, series.series_uid),
                       storage.result_folder(series.series_uid).path):
            shutil.rmtree(folder, ignore_errors=True)
        store.mark_purged(series.series_uid)
        purged += 1
    if purged or others:
        log.info("retention: removed the files of %d series finished and %d other objects received over %g days ago",
                 purged, len(others), storage.retention_days)
    return purged
