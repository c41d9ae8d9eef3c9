"""Deterministic UIDs for the result objects.

A UID is a hash of the source series, the model (name and version) and the object kind, so
analysing the same series again with the same model yields the same SOP Instance and Series
UIDs and the PACS replaces the earlier objects instead of storing duplicates; a new model
version yields new objects. ichnode has no registered UID root, so the UIDs use pydicom's root
with the hash as suffix (``pydicom.uid.generate_uid`` with ``entropy_srcs``).
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import generate_uid


@dataclass(frozen=True)
class ResultUIDs:
    source_series_uid: str
    model_name: str
    model_version: str

    def _uid(self, *parts: str) -> str:
        return generate_uid(
            entropy_srcs=[self.source_series_uid, self.model_name, self.model_version, *parts]
        )

    def instance(self, kind: str) -> str:
        """SOP Instance UID of the object of ``kind`` ("sr", "seg", "kos", "sc:<n>")."""
        return self._uid("instance", kind)

    def series(self, family: str) -> str:
        """Series Instance UID of one object family ("sr", "seg", "kos", "sc")."""
        return self._uid("series", family)

    def tracking(self, label: str) -> str:
        """Tracking UID shared by a finding in the SR and its segment in the SEG."""
        return self._uid("tracking", label)

    def device(self) -> str:
        """Device Observer UID of the algorithm that made the findings."""
        return generate_uid(entropy_srcs=["device", self.model_name, self.model_version])
