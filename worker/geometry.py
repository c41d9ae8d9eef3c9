"""The Hounsfield volume and its geometry: what the detector, result objects and training share.

Convention: slices are ordered by increasing position along the slice normal (row x column
direction cosines), so for a standard axial head CT index 0 is the most inferior slice.
Arrays are indexed (slice, row, column).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SliceRef:
    """The source instance a volume slice came from."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # for multi-frame (Enhanced CT) sources, 1-based


@dataclass
class Volume:
    """A CT series as Hounsfield units plus the geometry needed to map results back to DICOM."""

    hu: np.ndarray  # float32, (slices, rows, columns)
    spacing_mm: tuple[float, float, float]  # (slice, row, column); slice = median gap along the normal
    orientation: tuple[float, ...]  # ImageOrientationPatient, 6 direction cosines
    positions: np.ndarray  # (slices, 3) ImagePositionPatient of each slice, in volume order
    slices: list[SliceRef]  # source instance of each slice, in volume order
    frame_of_reference_uid: str = ""
    gantry_tilt_deg: float = 0.0
    missing_slices: int = 0  # gaps along the normal larger than 1.5x the median spacing
    uneven_spacing: bool = False

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"volume must be 3-D (slices, rows, columns), got shape {self.hu.shape}")
        if len(self.slices) != self.hu.shape[0] or len(self.positions) != self.hu.shape[0]:
            raise ValueError("slices and positions must have one entry per volume slice")

    @property
    def voxel_volume_ml(self) -> float:
        s, r, c = self.spacing_mm
        return s * r * c / 1000.0

    @classmethod
    def from_array(
        cls,
        hu: np.ndarray,
        spacing_mm: tuple[float, float, float] = (5.0, 0.5, 0.5),
        slices: list[SliceRef] | None = None,
    ) -> "Volume":
        """A volume without DICOM sources (training data, tests): axial, origin at 0."""
        n = hu.shape[0]
        positions = np.zeros((n, 3))
        positions[:, 2] = np.arange(n) * spacing_mm[0]
        refs = slices or [SliceRef("", "") for _ in range(n)]
        return cls(
            hu=hu.astype(np.float32, copy=False),
            spacing_mm=spacing_mm,
            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
            positions=positions,
            slices=refs,
        )
