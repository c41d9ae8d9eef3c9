"""`examine`: is a Hounsfield volume a head CT, and does it show intravenous contrast? From the images.

Anonymisers often empty BodyPartExamined and the descriptions, so the worker looks at the volume
itself. Each slice (at most MAX_SLICES of them, evenly spread, on a grid of about 1 mm) is
checked for a **skull ring**: bone (>= BONE_HU), closed over small gaps (sutures, thin temporal
squama), enclosing a region whose median is brain (BRAIN_HU) and at least MIN_INTERIOR_MM2 large,
in a head-sized outline (HEAD_WIDTH_MM across its widest side). A chest has ribs around lung
(air), an abdomen no bony ring, a vertebra a ring around a few square centimetres: none passes.
The volume is a head when at least MIN_RING_SLICES slices have such a ring.

**Contrast** shows in the head as dense vessels and venous sinuses: the fraction of the
intracranial voxels of the ring slices that lie at VESSEL_HU in structures not touching bone
(what touches bone is partial volume of an oblique skull or the skull base, or the rim of a
calcification). Without contrast that is faint calcification and noise: at most 0.17% on the 18
real non-contrast CT-ICH slices in true HU (tests/unit/test_head_ct.py), under CONTRAST_FRACTION;
a dozen 3-4 mm vessels and a sinus at 220 HU make 0.8% in a phantom. The threshold is not yet
calibrated on real contrast-enhanced scans (none are in the repository's data). Acute blood
(50-90 HU) does not count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from worker.geometry import Volume

BONE_HU = 400.0
BRAIN_HU = (15.0, 60.0)
VESSEL_HU = (120.0, 400.0)
HEAD_WIDTH_MM = (100.0, 230.0)  # infant to large adult skull, outer width
MIN_INTERIOR_MM2 = 2000.0  # the cranial cavity of a slice through the brain (a 50 mm circle)
CLOSING_MM = 6.0
GRID_MM = 1.0
MAX_SLICES = 48
MIN_RING_SLICES = 3
CONTRAST_FRACTION = 0.004


@dataclass(frozen=True)
class HeadCheck:
    head: bool
    head_reason: str  # the evidence either way, for the log and the skip reason
    contrast: str | None  # the evidence of contrast, None when none is seen


@dataclass(frozen=True)
class _Ring:
    width_mm: float
    brain_hu: float
    vessels: int  # intracranial voxels at VESSEL_HU, not touching bone
    intracranial: int


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy**2 + xx**2 <= radius**2


def _ring(hu: np.ndarray, pixel_mm: float) -> _Ring | None:
    """The skull ring of one slice (on a grid of `pixel_mm`), or None when there is none."""
    bone = hu >= BONE_HU
    if not bone.any():
        return None
    pad = max(1, round(CLOSING_MM / pixel_mm))
    closed = ndimage.binary_closing(np.pad(bone, pad), structure=_disk(pad))[pad:-pad, pad:-pad]
    filled = ndimage.binary_fill_holes(closed)
    labels, count = ndimage.label(filled & ~closed)
    if not count:
        return None
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    interior = labels == 1 + int(np.argmax(sizes))
    if interior.sum() * pixel_mm**2 < MIN_INTERIOR_MM2:
        return None
    skull_labels, _ = ndimage.label(filled)
    outline = skull_labels == skull_labels[interior][0]
    rows, columns = np.nonzero(outline)
    width = max(np.ptp(rows), np.ptp(columns)) * pixel_mm + pixel_mm
    brain = float(np.median(hu[interior]))
    if not (HEAD_WIDTH_MM[0] <= width <= HEAD_WIDTH_MM[1] and BRAIN_HU[0] <= brain <= BRAIN_HU[1]):
        return None
    dense = interior & (hu >= VESSEL_HU[0]) & (hu <= VESSEL_HU[1])
    # partial volume of bone (oblique skull, skull base) and calcification rims touch bone: not vessels
    touching = ndimage.binary_propagation(dense & ndimage.binary_dilation(bone), mask=dense, structure=np.ones((3, 3)))
    vessels = dense & ~touching
    return _Ring(width_mm=width, brain_hu=brain, vessels=int(vessels.sum()), intracranial=int(interior.sum()))


def examine(volume: Volume) -> HeadCheck:
    """The image evidence of a head CT and of contrast in `volume`."""
    n = volume.hu.shape[0]
    indices = np.unique(np.linspace(0, n - 1, min(n, MAX_SLICES)).round().astype(int))
    row_mm, column_mm = volume.spacing_mm[1], volume.spacing_mm[2]
    step = max(1, int(GRID_MM // min(row_mm, column_mm)))  # sample to about GRID_MM; thin bone survives
    pixel_mm = step * float(np.sqrt(row_mm * column_mm))
    rings = [r for r in (_ring(volume.hu[i, ::step, ::step], pixel_mm) for i in indices) if r is not None]
    needed = min(MIN_RING_SLICES, len(indices))
    if len(rings) < needed:
        return HeadCheck(
            head=False,
            head_reason=f"a skull ring around brain ({BRAIN_HU[0]:g}-{BRAIN_HU[1]:g} HU), "
            f"{HEAD_WIDTH_MM[0]:g}-{HEAD_WIDTH_MM[1]:g} mm wide, on {len(rings)} of {len(indices)} slices "
            f"examined (needs {needed})",
            contrast=None,
        )
    widths = [r.width_mm for r in rings]
    reason = (f"a skull ring around brain (median {np.median([r.brain_hu for r in rings]):.0f} HU) on {len(rings)} "
              f"of {len(indices)} slices examined, {min(widths):.0f}-{max(widths):.0f} mm wide")
    fraction = sum(r.vessels for r in rings) / max(1, sum(r.intracranial for r in rings))
    contrast = None
    if fraction >= CONTRAST_FRACTION:
        contrast = (f"images: {100 * fraction:.2f}% of the intracranial voxels at {VESSEL_HU[0]:g}-{VESSEL_HU[1]:g} HU "
                    f"(dense vessels and sinuses; threshold {100 * CONTRAST_FRACTION:g}%)")
    return HeadCheck(head=True, head_reason=reason, contrast=contrast)
