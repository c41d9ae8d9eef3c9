"""`Spool`: every received instance as a Part 10 file, written atomically and fsynced.

`write_file` makes the file's data durable and names the directories whose entries must still be
fsynced (`sync_dirs`) before the file counts as stored; the C-STORE intake fsyncs them once for a
whole group of instances (node/intake.py). `write` does both for one instance.

Layout: ``<spool>/<study>/<series>/<instance>.dcm``, each name the digest of the Study, Series or
SOP Instance UID (`ichnode.common.uids.path_name`): whatever a sender puts in a UID, it never
becomes part of a path. The store records each instance's path and its UIDs as received. A SOP
Instance UID that is already stored is kept as first received.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from ichnode.common.uids import path_name
from node.metrics import DISK_BELOW_MIN_FREE, DISK_FREE_BYTES

log = logging.getLogger("ichnode.spool")

CHECK_SECONDS = 0.5
MB = 1024 * 1024


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dirs(dirs: list[Path]) -> None:
    """fsync each directory once, in the order given (a new file's folder before its parents)."""
    for folder in dict.fromkeys(dirs):
        _fsync_dir(folder)


class FreeSpace:
    """Free space under `path` against a watermark of `min_free_bytes`; logs each shortage once."""

    def __init__(self, path: Path, min_free_bytes: int):
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._checked_at = float("-inf")
        self._shortage: str | None = None
        self._lock = threading.Lock()  # one statvfs for all associations

    def shortage(self) -> str | None:
        """Why instances are refused now (free space below the watermark), or None."""
        if self.min_free_bytes <= 0:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= CHECK_SECONDS:
                self._checked_at = now
                self._update()
            return self._shortage

    def _update(self) -> None:
        stat = os.statvfs(self.path)
        free = stat.f_bavail * stat.f_frsize
        DISK_FREE_BYTES.set(free)
        shortage = None
        if free < self.min_free_bytes:
            shortage = f"disk full: {free / MB:.0f} MB free, below storage.min_free_mb {self.min_free_bytes / MB:.0f}"
        DISK_BELOW_MIN_FREE.set(shortage is not None)
        if shortage and not self._shortage:
            log.error("%s under %s: instances are refused (0xA700) until there is room again", shortage, self.path)
        elif self._shortage and not shortage:
            log.warning("free space back above storage.min_free_mb (%.0f MB free): instances are taken again",
                        free / MB)
        self._shortage = shortage


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.free_space = FreeSpace(root, min_free_bytes)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        return self.root / path_name(study_uid) / path_name(series_uid)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.series_dir(study_uid, series_uid) / f"{path_name(sop_uid)}.dcm"

    def write(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> tuple[Path, bool]:
        """Store the bytes durably; returns (path, True) when new, (path, False) for a duplicate."""
        path, new, dirs = self.write_file(study_uid, series_uid, sop_uid, data)
        sync_dirs(dirs)
        return path, new

    def write_file(self, study_uid: str, series_uid: str, sop_uid: str,
                   data: bytes) -> tuple[Path, bool, list[Path]]:
        """Write and fsync the file under its final name; returns (path, new, the directories to fsync
        before the file's name is durable). For a duplicate they are its folders up to the spool
        root: the first copy may still be on its way to being durable in another thread."""
        final = self.path_for(study_uid, series_uid, sop_uid)
        every_level = [final.parent, final.parent.parent, self.root]
        if final.exists():
            return final, False, every_level
        created = [p for p in (final.parent.parent, final.parent) if not p.exists()]
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".incoming-", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(tmp_name, final)  # atomic, and refuses to replace a concurrent duplicate
            except FileExistsError:
                return final, False, every_level
        finally:
            os.unlink(tmp_name)
        return final, True, [final.parent] + [folder.parent for folder in created]

    def files(self) -> list[Path]:
        return sorted(self.root.glob("*/*/*.dcm"))

    def relative(self, path: Path) -> str:
        """The path below the spool root, as the store records it."""
        return os.path.relpath(path, self.root)
