"""The one preprocessing path shared by training and inference.

Hounsfield volume -> head crop (one square box for the whole series, so every slice keeps the
same scale; `HEAD_CROPS` says around what) -> in-plane resampling to a fixed working size -> three window channels scaled 0..1
(brain 40/80, subdural 80/200, soft tissue 40/380, as in paper 004), then two context channels:
one window (CONTEXT_WINDOWS: the brain window unless the model says otherwise) of the slices about
CONTEXT_MM below and above (2.5D input, paper 004's adjacent slices; at the series' ends, and for
sources whose slices stand alone, zeros), then the bone window (BONE_WINDOW: the skull and its
fractures, which every other channel shows as flat white). Sources that hold
only the brain window (RSNA PNG slices) get the subdural, soft-tissue and bone channels as zeros, the
same "not available" that training's channel dropout shows the members on full-HU volumes. Each
member reads the leading channels it was built for (`ResNeXtConfig.channels`; the U-Nets the
three windows), and `prepare` makes only as many as asked. :meth:`HeadCrop.to_volume`
is the inverse mapping: maps at working size go back to the volume's own (rows, columns) grid.
:func:`intracranial_mask` is where heatmaps and lesion masks may be non-zero, and where the
U-Nets' scan-level scores look.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
import torch.nn.functional as F

#: (centre, width) in HU of the three input channels.
WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (40.0, 380.0))
BRAIN_CHANNELS = 1  # the leading channels every source has; the rest need full HU
WINDOW_CHANNELS = len(WINDOWS)
#: Distance of the context channels' slices: CT-ICH's and most routine head CT's slice thickness,
#: so a thin-slice series shows the same anatomy beside each slice as the training data did.
CONTEXT_MM = 5.0
CONTEXT_CHANNELS = 2  # below, above
#: The windows the context channels may show, by name, in the order of WINDOWS: the subdural window
#: keeps blood apart from the bone beside it, where the brain window shows both near white.
CONTEXT_WINDOWS = ("brain", "subdural")
#: (centre, width) in HU of the last channel: bone from its marrow to the cortex' densest
BONE_WINDOW = (600.0, 2800.0)
BONE_CHANNEL = WINDOW_CHANNELS + CONTEXT_CHANNELS
CHANNELS = BONE_CHANNEL + 1
AIR_HU = -1024.0
HEAD_THRESHOLD_HU = -300.0  # skin and skull are above, air and most pillow foam below
CROP_MARGIN = 0.05  # fraction of the head's extent added on each side
#: What the head crop boxes. "footprint": everything above HEAD_THRESHOLD_HU in any slice, head
#: holder, table and objects beside the head too (how 0.4.0 and earlier were trained), so the
#: head's size in the working image varies with the field of view. "largest_body": the largest
#: connected body above the threshold (the head), after an opening that cuts thin contacts.
HEAD_CROPS = ("footprint", "largest_body")
_BODY_GRID = 2  # the largest body is found on every second row and column (speed)
_BODY_OPENING = 2  # iterations of that grid's opening: cuts contacts up to about 4 pixels wide
BONE_HU = 300.0
INTRACRANIAL_HU = (-50.0, 150.0)  # brain, CSF and blood; not air, fat, bone or calcification
MIN_INTERIOR_FRACTION = 0.15  # of the head's non-bone area, for a skull ring to count as closed
_IN_PLANE = np.array([np.zeros((3, 3)), ndimage.generate_binary_structure(2, 1), np.zeros((3, 3))], bool)


def _window(hu: torch.Tensor, centre: float, width: float) -> torch.Tensor:
    return ((hu - (centre - width / 2)) / width).clamp(0.0, 1.0)


def window_channels(hu: torch.Tensor, brain_window_only: bool = False) -> torch.Tensor:
    """(slices, rows, cols) HU -> (slices, 3, rows, cols) float32 in 0..1; with brain_window_only
    the channels past BRAIN_CHANNELS are zero (the source clipped HU to the brain window)."""
    channels = [_window(hu, c, w) for c, w in WINDOWS]
    if brain_window_only:
        channels[BRAIN_CHANNELS:] = [torch.zeros_like(hu) for _ in channels[BRAIN_CHANNELS:]]
    return torch.stack(channels, dim=1).float()


def context_channels(windows: torch.Tensor, slice_mm: float, window: str = "brain") -> torch.Tensor:
    """(slices, 3, s, s) window channels -> (slices, 2, s, s): `window` (one of CONTEXT_WINDOWS) of
    the slice about CONTEXT_MM below and of the one above (at least the next slice), zero past the
    series' ends."""
    offset = max(1, round(CONTEXT_MM / slice_mm)) if slice_mm > 0 else 1
    shown = windows[:, CONTEXT_WINDOWS.index(window)]
    below, above = torch.zeros_like(shown), torch.zeros_like(shown)
    below[offset:], above[:-offset] = shown[:-offset], shown[offset:]
    return torch.stack([below, above], dim=1)


@dataclass(frozen=True)
class HeadCrop:
    """A square box (top, left, side) in the volume grid; it may extend past the image edges."""

    top: int
    left: int
    side: int
    rows: int
    cols: int

    @classmethod
    def find(cls, hu: np.ndarray, mode: str = "footprint") -> "HeadCrop":
        """The square box around the head (`mode`: one of HEAD_CROPS)."""
        rows, cols = hu.shape[1:]
        box = _largest_body_extent(hu) if mode == "largest_body" else None
        if box is None:
            box = _extent((hu > HEAD_THRESHOLD_HU).any(axis=0))
        if box is None:  # no head: keep the whole frame
            return cls(0, 0, max(rows, cols), rows, cols)
        r0, r1, c0, c1 = box
        extent = max(r1 - r0 + 1, c1 - c0 + 1)
        side = max(8, int(round(extent * (1 + 2 * CROP_MARGIN))))
        top = int(round((r0 + r1 + 1) / 2 - side / 2))
        left = int(round((c0 + c1 + 1) / 2 - side / 2))
        return cls(top, left, side, rows, cols)

    def _overlap(self) -> tuple[slice, slice, slice, slice]:
        """(volume rows, volume cols, box rows, box cols) of the part of the box inside the image."""
        r0, c0 = max(self.top, 0), max(self.left, 0)
        r1, c1 = min(self.top + self.side, self.rows), min(self.left + self.side, self.cols)
        return (
            slice(r0, r1),
            slice(c0, c1),
            slice(r0 - self.top, r1 - self.top),
            slice(c0 - self.left, c1 - self.left),
        )

    def to_working(self, volume_maps: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
        """(slices, rows, cols) in the volume grid -> (slices, size, size) inside the box."""
        vr, vc, br, bc = self._overlap()
        boxed = volume_maps.new_full((volume_maps.shape[0], self.side, self.side), fill)
        boxed[:, br, bc] = volume_maps[:, vr, vc]
        return F.interpolate(
            boxed[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[:, 0]

    def to_volume(self, working_maps: torch.Tensor) -> torch.Tensor:
        """(slices, size, size) maps -> (slices, rows, cols) in the volume grid, 0 outside the box."""
        boxed = F.interpolate(
            working_maps[:, None].float(), size=(self.side, self.side), mode="bilinear", align_corners=False
        )[:, 0]
        vr, vc, br, bc = self._overlap()
        out = boxed.new_zeros((boxed.shape[0], self.rows, self.cols))
        out[:, vr, vc] = boxed[:, br, bc]
        return out


def _extent(footprint: np.ndarray) -> tuple[int, int, int, int] | None:
    """(first row, last row, first column, last column) of a 2-D mask; None when it is empty."""
    r_any, c_any = footprint.any(axis=1), footprint.any(axis=0)
    if not r_any.any():
        return None
    (r0, r1), (c0, c1) = np.flatnonzero(r_any)[[0, -1]], np.flatnonzero(c_any)[[0, -1]]
    return int(r0), int(r1), int(c0), int(c1)


def _largest_body_extent(hu: np.ndarray) -> tuple[int, int, int, int] | None:
    """The extent (as `_extent`) of the largest 3-D connected body above the head threshold,
    opened in plane first so that a head holder or table touching the head is not part of it."""
    coarse = hu[:, ::_BODY_GRID, ::_BODY_GRID] > HEAD_THRESHOLD_HU
    opened = ndimage.binary_opening(coarse, _IN_PLANE, iterations=_BODY_OPENING)
    labels, count = ndimage.label(opened)
    if count == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum_labels(opened, labels, range(1, count + 1))))
    r0, r1, c0, c1 = _extent((labels == largest).any(axis=0))
    g = _BODY_GRID  # back to the full grid: a coarse pixel stands for g x g pixels
    return r0 * g, min(r1 * g + g - 1, hu.shape[1] - 1), c0 * g, min(c1 * g + g - 1, hu.shape[2] - 1)


def intracranial_mask(hu: np.ndarray) -> np.ndarray:
    """(slices, rows, cols) HU -> bool mask of the intracranial soft tissue of each slice.

    Inside a closed skull ring (bone filled per slice, minus the bone); on slices without one
    (skull base, vertex, a head without bone) the head minus its bone. Either way only voxels in
    the INTRACRANIAL_HU range are kept, so air, scalp fat, bone and its partial-volume edge never
    are. The bone is not grown: thin subdural and epidural blood lies right against it.
    """
    bone = hu > BONE_HU
    interior = ndimage.binary_fill_holes(bone, _IN_PLANE) & ~bone
    head = (hu > HEAD_THRESHOLD_HU) & ~bone
    closed = interior.sum(axis=(1, 2)) >= MIN_INTERIOR_FRACTION * np.maximum(head.sum(axis=(1, 2)), 1)
    region = np.where(closed[:, None, None], interior, head)
    return region & (hu >= INTRACRANIAL_HU[0]) & (hu <= INTRACRANIAL_HU[1])


@dataclass
class Prepared:
    """A volume ready for the members: window channels at working size, the crop to go back, and
    the intracranial region on both grids (scan scores look only inside it, masks stay inside it)."""

    images: torch.Tensor  # (slices, up to CHANNELS, size, size) float32 0..1: windows, context, bone
    crop: HeadCrop
    inside: np.ndarray  # (slices, rows, cols) bool: intracranial_mask on the volume grid
    inside_working: torch.Tensor  # (slices, size, size) bool: the same at working size


def prepare(hu: np.ndarray, size: int, slice_mm: float, brain_window_only: bool = False,
            channels: int = CHANNELS, head_crop: str = "footprint", context_window: str = "brain") -> Prepared:
    """HU volume (slices, rows, cols) -> window, context and bone channels of the head at size x size.

    slice_mm: the gap between slices (Volume.spacing_mm[0]), which places the context channels;
    brain_window_only: the volume's HU were clipped to the brain window (see window_channels);
    channels: the most any member reads: the three windows always, the context channels when it is
    past them, the bone window when it is CHANNELS (a model that reads fewer keeps its prepared
    images that much smaller); head_crop: one of HEAD_CROPS; context_window: one of CONTEXT_WINDOWS,
    what the context channels show."""
    crop = HeadCrop.find(hu, head_crop)
    working_hu = crop.to_working(torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)), size, AIR_HU)
    inside = intracranial_mask(hu)
    inside_working = crop.to_working(torch.from_numpy(inside.astype(np.float32)), size, 0.0) >= 0.5
    windows = window_channels(working_hu, brain_window_only)
    parts = [windows]
    if channels > WINDOW_CHANNELS:
        parts.append(context_channels(windows, slice_mm, context_window))
    if channels > BONE_CHANNEL:
        bone = torch.zeros_like(working_hu) if brain_window_only else _window(working_hu, *BONE_WINDOW)
        parts.append(bone[:, None])
    images = torch.cat(parts, dim=1)
    return Prepared(images=images, crop=crop, inside=inside, inside_working=inside_working)


def masks_to_working(masks: np.ndarray, crop: HeadCrop, size: int) -> torch.Tensor:
    """Boolean masks (slices, rows, cols) in the volume grid -> soft 0..1 masks at working size."""
    return crop.to_working(torch.from_numpy(masks.astype(np.float32)), size, 0.0)
