"""`load_series`: the files of one CT series -> a Hounsfield :class:`~worker.geometry.Volume`.

Accepts CT Image Storage (one slice per file) and Enhanced / Legacy Converted Enhanced CT Image
Storage (one slice per frame; geometry and rescale from the per-frame functional groups, falling
back to the shared groups). What the loader does with imperfect series:

* Unreadable files, non-CT instances, images without position/orientation and localizers are
  left out with a warning. Of the rest, only the majority geometry (orientation, matrix, pixel
  spacing, frame of reference, image flavour = ImageType value 3) is kept; the others are left
  out with a warning.
* Slices are ordered by ImagePositionPatient projected on the slice normal (InstanceNumber is not
  trusted). Slices within 0.01 mm of the one below are duplicates: left out with a warning (of
  slices at exactly the same position, the first file given is kept).
* Pixel data that fails to decode leaves that instance (for multi-frame: that frame) out, with a
  warning naming the SOP Instance UID; the resulting gap then counts as missing slices.
* Gantry tilt: the offsets between slice positions have a component within the slice plane (a
  sheared stack). The pixel data is left as acquired - every slice is still the 2-D image the
  scanner reconstructed, not resampled onto a rectilinear grid - and ``gantry_tilt_deg`` reports
  the shear angle. The slice spacing is the offset projected on the normal, so it is the true
  distance between the slice planes. GantryDetectorTilt is only quoted in the warning: scanners
  that write a tilted ImageOrientationPatient have an unsheared stack despite a non-zero tilt.
* Hounsfield units: padding (PixelPaddingValue, up to PixelPaddingRangeLimit when present, on the
  stored values) becomes air; after RescaleSlope/RescaleIntercept everything below air (outside
  the reconstruction field of view) is clamped to air.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from ichnode.common.slice_geometry import SAME_POSITION_MM, slice_normal, slice_spacing
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES, MULTI_FRAME_CT_SOP_CLASSES
from worker.geometry import SliceRef, Volume

AIR_HU = -1024.0
MIN_TILT_DEG = 0.1  # shear below this is rounding in the stored positions
MAX_LISTED = 5  # instances named in one warning


class VolumeError(Exception):
    """A series that cannot become a volume; the message says why."""


@dataclass
class LoadedSeries:
    volume: Volume
    sources: list[Dataset]  # source instance of each volume slice, volume order
    warnings: list[str]


@dataclass(frozen=True)
class _Geometry:
    """What every slice of one volume must share."""

    orientation: tuple[float, ...]  # rounded, for comparison only
    matrix: tuple[int, int]
    pixel_spacing: tuple[float, ...]
    frame_of_reference: str
    flavour: str  # ImageType / FrameType value 3, e.g. AXIAL

    def differences(self, other: "_Geometry") -> str:
        return ", ".join(
            f"{f.name.replace('_', ' ')} {getattr(self, f.name)} (kept {getattr(other, f.name)})"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        )


@dataclass
class _Frame:
    """One 2-D image: a single-frame instance or one frame of a multi-frame instance."""

    ds: Dataset
    index: int | None  # 0-based frame index for multi-frame instances
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rescale: tuple[float, float]  # slope, intercept
    image_type: tuple[str, ...]

    @property
    def label(self) -> str:
        return _label(self.ds, self.index)

    @property
    def geometry(self) -> _Geometry:
        return _Geometry(
            orientation=tuple(round(float(v), 3) + 0.0 for v in self.orientation),
            matrix=(int(self.ds.Rows), int(self.ds.Columns)),
            pixel_spacing=tuple(round(v, 3) for v in self.pixel_spacing),
            frame_of_reference=str(self.ds.get("FrameOfReferenceUID", "")),
            flavour=self.image_type[2] if len(self.image_type) > 2 else "",
        )


def load_series(paths: Sequence[Path]) -> LoadedSeries:
    if not paths:
        raise VolumeError("no files in the series")
    warnings: list[str] = []
    frames: list[_Frame] = []
    for path in paths:
        ds = _read(Path(path), warnings)
        if ds is not None:
            frames.extend(_frames(ds, warnings))
    frames = _majority_geometry(frames, warnings)
    decoded = _decode(frames, warnings)
    if not decoded:
        raise VolumeError("no usable CT slices" + _because(warnings))

    normal = slice_normal(decoded[0][0].orientation)
    decoded = _ordered_without_duplicates(decoded, normal, warnings)
    if len(decoded) < 2:
        raise VolumeError(f"only {len(decoded)} usable slice (need at least 2)" + _because(warnings))

    kept = [frame for frame, _ in decoded]
    positions = np.array([frame.position for frame in kept])
    first = kept[0]
    gap, uneven, missing = _spacing(positions @ normal, warnings)
    tilt = _gantry_tilt(positions, normal, first, warnings)
    volume = Volume(
        hu=np.stack([hu for _, hu in decoded]),
        spacing_mm=(gap, first.pixel_spacing[0], first.pixel_spacing[1]),
        orientation=tuple(float(v) for v in first.orientation),
        positions=positions,
        slices=[
            SliceRef(
                sop_class_uid=str(f.ds.SOPClassUID),
                sop_instance_uid=str(f.ds.SOPInstanceUID),
                frame_number=None if f.index is None else f.index + 1,
            )
            for f in kept
        ],
        frame_of_reference_uid=str(first.ds.get("FrameOfReferenceUID", "")),
        gantry_tilt_deg=tilt,
        missing_slices=missing,
        uneven_spacing=uneven,
    )
    return LoadedSeries(volume=volume, sources=[f.ds for f in kept], warnings=warnings)


def _because(warnings: list[str]) -> str:
    return ": " + "; ".join(warnings) if warnings else ""


def _read(path: Path, warnings: list[str]) -> Dataset | None:
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        warnings.append(f"file {path.name}: unreadable ({exc}): left out")
        return None
    sop_class = str(ds.get("SOPClassUID", ""))
    uid = ds.get("SOPInstanceUID", path.name)
    if sop_class not in CT_IMAGE_SOP_CLASSES:
        warnings.append(f"instance {uid}: {UID(sop_class).name or 'no SOP class'} is not a CT image: left out")
        return None
    if "PixelData" not in ds:
        warnings.append(f"instance {uid}: no pixel data: left out")
        return None
    return ds


def _label(ds: Dataset, index: int | None) -> str:
    return f"instance {ds.SOPInstanceUID}" + ("" if index is None else f" frame {index + 1}")


def _frame_attribute(ds: Dataset, index: int | None, group: str, keyword: str) -> Any:
    """`keyword` for one frame: per-frame functional group, then shared group, then top level."""
    if index is not None:
        for groups, item in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
            sequence = ds.get(groups)
            if sequence is not None and len(sequence) > item and sequence[item].get(group):
                value = sequence[item].get(group)[0].get(keyword)
                if value is not None:
                    return value
    return ds.get(keyword)


def _frames(ds: Dataset, warnings: list[str]) -> list[_Frame]:
    multi_frame = str(ds.SOPClassUID) in MULTI_FRAME_CT_SOP_CLASSES
    indices: list[int | None] = list(range(int(ds.get("NumberOfFrames", 1)))) if multi_frame else [None]
    frames = []
    for index in indices:
        attribute = partial(_frame_attribute, ds, index)
        position = attribute("PlanePositionSequence", "ImagePositionPatient")
        orientation = attribute("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = attribute("PixelMeasuresSequence", "PixelSpacing")
        slope = attribute("PixelValueTransformationSequence", "RescaleSlope")
        intercept = attribute("PixelValueTransformationSequence", "RescaleIntercept")
        image_type = attribute("CTImageFrameTypeSequence", "FrameType") if multi_frame else None
        image_type = image_type or ds.get("ImageType") or ()
        if position is None or orientation is None or spacing is None:
            warnings.append(f"{_label(ds, index)}: no image position, orientation or pixel spacing: left out")
            continue
        if slope is None or intercept is None:
            warnings.append(f"{_label(ds, index)}: no RescaleSlope/RescaleIntercept: stored values used as HU")
        frames.append(
            _Frame(
                ds=ds,
                index=index,
                position=np.array([float(v) for v in position]),
                orientation=np.array([float(v) for v in orientation]),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                rescale=(float(slope if slope is not None else 1.0), float(intercept or 0.0)),
                image_type=tuple(str(v).upper() for v in image_type),
            )
        )
    return frames


def _majority_geometry(frames: list[_Frame], warnings: list[str]) -> list[_Frame]:
    localizers = [f for f in frames if "LOCALIZER" in f.image_type]
    if localizers:
        warnings.append(f"{len(localizers)} localizer image(s) left out")
    frames = [f for f in frames if "LOCALIZER" not in f.image_type]
    if not frames:
        return []
    counts = Counter(f.geometry for f in frames)
    majority = min(counts, key=lambda g: (-counts[g], str(g)))  # ties: independent of file order
    for geometry, count in counts.items():
        if geometry != majority:
            warnings.append(f"{count} image(s) with another geometry left out: {geometry.differences(majority)}")
    return [f for f in frames if f.geometry == majority]


def _decode(frames: list[_Frame], warnings: list[str]) -> list[tuple[_Frame, np.ndarray]]:
    decoded = []
    for frame in frames:
        try:
            decoder = get_decoder(frame.ds.file_meta.TransferSyntaxUID)
            stored, _ = decoder.as_array(frame.ds, index=frame.index or 0)
            if stored.shape != (frame.ds.Rows, frame.ds.Columns):
                raise ValueError(f"decoded shape {stored.shape}")
        except Exception as exc:  # decoder plugins raise many exception types for corrupt data
            reason = " ".join(str(exc).split())
            warnings.append(f"{frame.label}: corrupt pixel data ({type(exc).__name__}: {reason}): left out")
            continue
        decoded.append((frame, _hounsfield(stored, frame)))
    return decoded


def _hounsfield(stored: np.ndarray, frame: _Frame) -> np.ndarray:
    slope, intercept = frame.rescale
    hu = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    padding = frame.ds.get("PixelPaddingValue")
    if padding is not None:
        limit = frame.ds.get("PixelPaddingRangeLimit", padding)
        low, high = min(padding, limit), max(padding, limit)
        hu[(stored >= low) & (stored <= high)] = AIR_HU
    return np.maximum(hu, np.float32(AIR_HU), out=hu)


def _ordered_without_duplicates(
    decoded: list[tuple[_Frame, np.ndarray]], normal: np.ndarray, warnings: list[str]
) -> list[tuple[_Frame, np.ndarray]]:
    ordered = sorted(decoded, key=lambda item: float(item[0].position @ normal))
    kept, duplicates = [ordered[0]], []
    for item in ordered[1:]:
        if float((item[0].position - kept[-1][0].position) @ normal) < SAME_POSITION_MM:
            duplicates.append(item[0].label)
        else:
            kept.append(item)
    if duplicates:
        shown = ", ".join(duplicates[:MAX_LISTED]) + (", ..." if len(duplicates) > MAX_LISTED else "")
        warnings.append(f"{len(duplicates)} duplicate position(s) left out: {shown}")
    return kept


def _spacing(along_normal: np.ndarray, warnings: list[str]) -> tuple[float, bool, int]:
    """(median gap, uneven, missing slice count) of the sorted positions along the normal."""
    spacing = slice_spacing(along_normal)
    gaps, median, large = spacing.gaps_mm, spacing.median_mm, spacing.large_gaps_mm
    if spacing.missing:
        gaps_text = f"{len(large)} gap(s) up to {large.max():.2f} mm, median {median:.2f} mm"
        warnings.append(f"{spacing.missing} missing slice(s): {gaps_text}")
    if spacing.uneven:
        warnings.append(f"uneven spacing: gaps {gaps.min():.2f}-{gaps.max():.2f} mm, median {median:.2f} mm")
    return median, spacing.uneven, spacing.missing


def _gantry_tilt(positions: np.ndarray, normal: np.ndarray, first: _Frame, warnings: list[str]) -> float:
    """Shear angle of the stack: offset within the slice plane vs offset along the normal."""
    offset = positions[-1] - positions[0]
    along = float(offset @ normal)
    within = float(np.linalg.norm(offset - along * normal))
    tilt = math.degrees(math.atan2(within, abs(along)))
    if tilt < MIN_TILT_DEG:
        return 0.0
    header = _frame_attribute(first.ds, first.index, "CTAcquisitionDetailsSequence", "GantryDetectorTilt")
    quoted = f" (GantryDetectorTilt {float(header):g}°)" if header is not None else ""
    warnings.append(f"gantry tilt {tilt:.1f}°{quoted}: slices left as acquired, spacing measured along the normal")
    return tilt
