"""Which series of a study the node analyses, from the stored header summaries (node.headers).

A series is eligible when all of these hold (checked in this order; the first failure is the
reason it is skipped):

1. Modality CT, and a CT image SOP class (CT Image, Enhanced CT, Legacy Converted Enhanced CT);
   secondary captures such as dose screens are not.
2. Not a localizer: ImageType without LOCALIZER and a SeriesDescription without
   scout / topogram / localizer / surview / scanogram.
3. A head series (the words are in ichnode.common.header_words): BodyPartExamined names the
   head. When it is empty, a head keyword in SeriesDescription, ProtocolName or StudyDescription.
   A BodyPartExamined that names another region, or (when it is empty) descriptions that name
   another region and not the head, make the series ineligible. Headers that say nothing either
   way leave it eligible: the worker then decides from the images (skull ring, brain, head size;
   worker.head_ct) and skips a series that is not a head.
4. Non-contrast: ContrastBolusAgent empty (or "none", "no", ...) and a SeriesDescription without
   contrast words or volumes ("C+", "CTA", "150cc", ...). With `analyse_contrast` set, a
   contrast-enhanced series stays eligible (the worker analyses it with a warning).
5. Not a projection or rendering: DERIVED / SECONDARY series are accepted (axial reformats keep
   true Hounsfield units and are often the reading series), except MIP, MinIP, volume
   rendering, SSD and curved reformats (by ImageType or SeriesDescription).
6. Axial: the slice normal within 30 degrees of the patient's head-foot axis. A tilted gantry
   stays well within this; coronal and sagittal reformats do not.
7. Enough of a head: at least `min_slices` distinct slice positions, covering at least
   `min_coverage_mm` along the normal (first to last position plus one median gap). Enhanced
   (multi-frame) CT headers carry no per-frame positions, so only its frame count is checked
   here; the loader measures the real volume.

Among eligible series the highest rank wins, compared in this order:

1. Headers that name the head over headers that say nothing (checked on the images).
2. Non-contrast over contrast-enhanced (only with `analyse_contrast`).
3. Kernel class: soft-tissue/brain kernels over unclassified ones over sharp (bone, lung, edge)
   ones - see :func:`kernel_class`.
4. Slice thickness class: 2.5-5 mm, then 1.25-2.5 mm or 5-8 mm, then thinner (noisy, slow) or
   thicker (partial volume) or unknown.
5. ORIGINAL over DERIVED.
6. Thickness nearer 5 mm (the thickness of most training data).
7. More slices.
8. Ties: the smallest Series Instance UID, so the choice never depends on arrival order.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from pydicom.uid import UID

from ichnode.common.header_words import contrast_in_headers, head_in_headers
from ichnode.common.slice_geometry import SAME_POSITION_MM, slice_normal, slice_spacing
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node.headers import InstanceHeader

MAX_AXIAL_TILT_DEG = 30.0
PREFERRED_THICKNESS_MM = 5.0

LOCALIZER_WORDS = re.compile(r"SCOUT|TOPO|LOCALI[SZ]ER|SURVIEW|SCANOGRAM")
PROJECTION_TYPES = {
    "MIP", "MINIP", "MIN IP", "VR", "VRT", "VOLUME RENDERING", "SSD", "CPR", "CURVED", "PROJECTION IMAGE"
}
PROJECTION_WORDS = re.compile(r"\b(MIP|MINIP|MIN IP|VRT|VR|SSD|CPR)\b")

SOFT, UNCLASSIFIED, SHARP = 2, 1, 0
KERNEL_CLASS_NAMES = {SOFT: "soft-tissue kernel", UNCLASSIFIED: "unclassified kernel", SHARP: "sharp kernel"}
SHARP_KERNEL_WORDS = ("BONE", "LUNG", "EDGE", "SHARP", "CHST", "CHEST")
SOFT_KERNEL_WORDS = ("SOFT", "STANDARD", "STND", "BRAIN", "SMOOTH", "BODY")
PHILIPS_SOFT = {"A", "B", "C", "UA", "UB", "UC", "UD", "EA", "EB", "EC"}
PHILIPS_SHARP = {"D", "E", "L", "YA", "YB", "YC", "YD", "YE", "YF"}
CANON_KERNEL = re.compile(r"FC(\d{2})\b")  # FC01-FC29 body and brain, FC30 and up bone and lung
SIEMENS_KERNEL = re.compile(r"[A-Z]{1,2}(\d{2})[A-Z]?")  # H31s, J40s, Hr38, Br36, Qr40, H70h


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    reason: str | None  # why not, human-readable
    rank: tuple  # sort key among eligible series: higher is better


@dataclass(frozen=True)
class _Series:
    """What selection needs to know about one series, from its instance headers."""

    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    body_part: str  # texts as received; matched upper-cased
    series_description: str
    descriptions: str  # series description, protocol name and study description
    contrast_agent: str
    kernel: str
    normal: np.ndarray | None  # unit slice normal of the majority orientation
    slices: int
    coverage_mm: float | None  # None when the headers hold no per-slice positions
    thickness_mm: float | None

    @property
    def original(self) -> bool:
        return bool(self.image_type) and self.image_type[0] == "ORIGINAL"

    def summary(self) -> str:
        thickness = f"{self.thickness_mm:.1f} mm" if self.thickness_mm is not None else "thickness unknown"
        kernel = KERNEL_CLASS_NAMES[kernel_class(self.kernel)] + (f" {self.kernel}" if self.kernel else "")
        return f"{kernel}, {thickness}, {self.slices} slices"


def kernel_class(kernel: str | None) -> int:
    """SOFT, UNCLASSIFIED or SHARP for a ConvolutionKernel value of any vendor."""
    name = (kernel or "").split("\\")[0].strip().upper()
    if any(word in name for word in SHARP_KERNEL_WORDS):
        return SHARP
    if any(word in name for word in SOFT_KERNEL_WORDS):
        return SOFT
    if name in PHILIPS_SOFT:
        return SOFT
    if name in PHILIPS_SHARP:
        return SHARP
    if match := CANON_KERNEL.match(name):
        return SOFT if int(match.group(1)) < 30 else SHARP
    if match := SIEMENS_KERNEL.fullmatch(name):
        number = int(match.group(1))
        return SOFT if number < 50 else SHARP if number >= 60 else UNCLASSIFIED
    return UNCLASSIFIED


def _most_common(values: list) -> object:
    """The most frequent value; ties go to the smallest as text, so header order never matters."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], str(value))) if counts else None


def _text(headers: list[InstanceHeader], key: str) -> str:
    return str(_most_common([getattr(h, key) for h in headers if getattr(h, key)]) or "").strip()


def _orientation(header: InstanceHeader) -> tuple[float, ...] | None:
    """ImageOrientationPatient rounded so that equal orientations compare equal."""
    cosines = header.image_orientation
    return tuple(round(v, 3) for v in cosines) if cosines else None


def _summarise(headers: list[InstanceHeader]) -> _Series:
    orientation = _most_common([_orientation(h) for h in headers if h.image_orientation])
    normal = slice_normal(orientation) if orientation is not None else None
    along: list[float] = []
    frames = 0
    for h in headers:
        if h.number_of_frames > 1 and not h.image_position:
            frames += h.number_of_frames
        elif h.image_position and orientation is not None and _orientation(h) == orientation:
            along.append(float(np.dot(h.image_position, normal)))
    distinct = np.unique(np.round(np.array(along) / SAME_POSITION_MM)) * SAME_POSITION_MM
    gap = slice_spacing(distinct).median_mm if len(distinct) >= 2 else None
    thicknesses = [h.slice_thickness for h in headers if h.slice_thickness]
    thickness = float(np.median(thicknesses)) if thicknesses else gap
    if frames:
        coverage = None
    elif gap is not None:
        coverage = float(distinct[-1] - distinct[0]) + gap
    else:
        coverage = thickness or 0.0
    image_types = [tuple(h.image_type) for h in headers]
    return _Series(
        modality=_text(headers, "modality"),
        sop_class=_text(headers, "sop_class_uid"),
        image_type=_most_common(image_types) or (),
        body_part=_text(headers, "body_part"),
        series_description=_text(headers, "series_description"),
        descriptions=" ".join(_text(headers, k) for k in ("series_description", "protocol_name", "study_description")),
        contrast_agent=_text(headers, "contrast_agent"),
        kernel=_text(headers, "kernel"),
        normal=normal,
        slices=len(distinct) + frames,
        coverage_mm=coverage,
        thickness_mm=thickness,
    )


def _why_not(series: _Series, min_slices: int, min_coverage_mm: float, analyse_contrast: bool) -> str | None:
    if series.modality != "CT":
        return f"modality {series.modality or 'missing'} is not CT"
    if series.sop_class not in CT_IMAGE_SOP_CLASSES:
        return f"SOP class {UID(series.sop_class).name or 'missing'} is not a CT image"
    if "LOCALIZER" in series.image_type:
        return "localizer (ImageType LOCALIZER)"
    description = series.series_description.upper()
    if LOCALIZER_WORDS.search(description):
        return f"localizer (SeriesDescription '{series.series_description}')"
    if head_in_headers(series.body_part, series.descriptions) is False:
        named = f"BodyPartExamined '{series.body_part}'" if series.body_part else \
            "no BodyPartExamined; the descriptions name another region"
        return f"not a head series ({named})"
    contrast = contrast_in_headers(series.contrast_agent, series.series_description)
    if contrast and not analyse_contrast:
        return f"contrast-enhanced ({contrast})"
    if PROJECTION_TYPES & set(series.image_type) or PROJECTION_WORDS.search(description):
        image_type = "\\".join(series.image_type)
        return f"projection or rendering (ImageType {image_type}, SeriesDescription '{series.series_description}')"
    if series.normal is not None:
        tilt = math.degrees(math.acos(min(1.0, abs(float(series.normal[2])))))
        if tilt > MAX_AXIAL_TILT_DEG:
            return f"not axial (slice normal {tilt:.0f}° from the head-foot axis)"
    if series.coverage_mm is None:
        if series.slices < min_slices:
            return f"{series.slices} slices; need >= {min_slices} slices"
    elif series.slices < min_slices or series.coverage_mm < min_coverage_mm:
        cover = "slice covers" if series.slices == 1 else "slices cover"
        need = f"need >= {min_slices} slices and >= {min_coverage_mm:.0f} mm"
        return f"{series.slices} {cover} {series.coverage_mm:.0f} mm; {need}"
    return None


def _thickness_class(thickness: float | None) -> int:
    if thickness is None:
        return 0
    if 2.5 <= thickness <= 5.0:
        return 2
    return 1 if 1.25 <= thickness <= 8.0 else 0


def _rank(series: _Series) -> tuple:
    distance = abs(series.thickness_mm - PREFERRED_THICKNESS_MM) if series.thickness_mm is not None else math.inf
    return (
        head_in_headers(series.body_part, series.descriptions) is True,
        contrast_in_headers(series.contrast_agent, series.series_description) is None,
        kernel_class(series.kernel),
        _thickness_class(series.thickness_mm),
        series.original,
        -round(distance, 2),
        series.slices,
    )


def _judge(series: _Series, min_slices: int, min_coverage_mm: float, analyse_contrast: bool) -> Eligibility:
    reason = _why_not(series, min_slices, min_coverage_mm, analyse_contrast)
    return Eligibility(eligible=reason is None, reason=reason, rank=_rank(series) if reason is None else ())


def eligibility(headers: list[InstanceHeader], min_slices: int, min_coverage_mm: float,
                analyse_contrast: bool = False) -> Eligibility:
    if not headers:
        return Eligibility(eligible=False, reason="no instances", rank=())
    return _judge(_summarise(headers), min_slices, min_coverage_mm, analyse_contrast)


def choose_series(
    candidates: dict[str, list[InstanceHeader]], min_slices: int, min_coverage_mm: float,
    analyse_contrast: bool = False,
) -> tuple[str | None, dict[str, str]]:
    """(chosen series UID or None, {uid: skip reason} for every other series)."""
    series = {uid: _summarise(headers) for uid, headers in candidates.items() if headers}
    judged = {uid: _judge(s, min_slices, min_coverage_mm, analyse_contrast) for uid, s in series.items()}
    skipped = {uid: "no instances" for uid, headers in candidates.items() if not headers}
    skipped.update({uid: e.reason for uid, e in judged.items() if not e.eligible})
    eligible = sorted(uid for uid, e in judged.items() if e.eligible)
    if not eligible:
        return None, skipped
    chosen = max(eligible, key=lambda uid: judged[uid].rank)  # max keeps the first (smallest UID) of equals
    for uid in eligible:
        if uid != chosen:
            comparison = f"{series[chosen].summary()}; this one: {series[uid].summary()}"
            skipped[uid] = f"another series was chosen: {chosen} ({comparison})"
    return chosen, skipped
