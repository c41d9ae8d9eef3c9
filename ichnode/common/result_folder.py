"""The folder of one analysed series (``data_dir/results/<digest of its SeriesInstanceUID>``, or
the ``--out`` of `ichnode analyze`): the DICOM result objects, findings.json and a PNG thumbnail of
each heatmap capture. The worker writes it; the node's delivery, worklist and retention read or
remove it."""
from __future__ import annotations

from pathlib import Path


class ResultFolder:
    def __init__(self, path: Path):
        self.path = path

    def object_file(self, modality: str, sop_instance_uid: str) -> Path:
        """Where a result object is written, e.g. ``SR_<SOPInstanceUID>.dcm``."""
        return self.path / f"{modality}_{sop_instance_uid}.dcm"

    def thumbnail(self, index: int) -> Path:
        """The thumbnail of the index-th heatmap capture (0: the most suspicious key slice)."""
        return self.path / f"thumb_{index}.png"

    @property
    def findings_file(self) -> Path:
        return self.path / "findings.json"
