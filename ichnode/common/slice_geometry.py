"""Where slices lie along their normal and how evenly: the one computation behind series
completion (node.assembler), series selection (node.selection) and volume loading
(worker.volume)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SAME_POSITION_MM = 0.01  # slices closer than this along the normal are at the same position
UNEVEN_FRACTION = 0.10  # a gap deviating more than this from the median makes spacing uneven
MISSING_GAP_FACTOR = 1.5  # a gap above this many median gaps has missing slices in it


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane of ImageOrientationPatient (row x column direction cosines)."""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return normal / np.linalg.norm(normal)


@dataclass(frozen=True)
class SliceSpacing:
    gaps_mm: np.ndarray  # between consecutive positions
    median_mm: float
    uneven: bool  # some gap deviates more than UNEVEN_FRACTION from the median
    missing: int  # slices missing in the gaps larger than MISSING_GAP_FACTOR medians

    @property
    def large_gaps_mm(self) -> np.ndarray:
        return self.gaps_mm[self.gaps_mm > MISSING_GAP_FACTOR * self.median_mm]

    @property
    def continuous(self) -> bool:
        """Evenly spaced, no gap and no duplicate position."""
        return self.median_mm > 0 and not self.uneven


def slice_spacing(along_normal: Sequence[float]) -> SliceSpacing:
    """Spacing of slice positions along the normal (at least two, sorted ascending)."""
    gaps = np.diff(np.asarray(along_normal, float))
    median = float(np.median(gaps))
    uneven = bool(np.any(np.abs(gaps - median) > UNEVEN_FRACTION * median))
    large = gaps[gaps > MISSING_GAP_FACTOR * median]
    missing = int(sum(round(gap / median) - 1 for gap in large))
    return SliceSpacing(gaps_mm=gaps, median_mm=median, uneven=uneven, missing=missing)
