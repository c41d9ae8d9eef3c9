"""Heatmap secondary captures: each key slice in a brain window with the detector's heatmap.

Every image carries, burned in: a red "not for diagnostic use" banner on top, the colour bar of
the heatmap on the right and the slice's scores below. Small matrices are enlarged (nearest
neighbour) to about 512 columns so the text stays legible.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from ichnode.common.analysis import Findings
from ichnode.common.vocabulary import DISCLAIMER, LABELS, SUBTYPES
from worker.detector import DetectorOutput
from worker.findings import key_slice_indices
from worker.geometry import Volume
from worker.results.identity import object_identity
from worker.results.sources import copy_patient_and_study, slice_source
from worker.results.uids import ResultUIDs

SERIES_NUMBER = 9904
BANNER = DISCLAIMER
BANNER_RGB = (200, 0, 0)
WINDOW_CENTER, WINDOW_WIDTH = 40.0, 80.0  # brain window
HEAT_FLOOR = 0.2  # heat below this is not drawn, so normal brain stays grey
HEAT_OPACITY = 0.6
#: Colour map anchors (value, sRGB): blue, cyan, yellow, red.
COLOUR_MAP = ((0.0, (0, 0, 255)), (1 / 3, (0, 255, 255)), (2 / 3, (255, 255, 0)), (1.0, (255, 0, 0)))
TARGET_COLUMNS = 512


def colour_map(values: np.ndarray) -> np.ndarray:
    """``values`` (0..1) as sRGB floats 0..255, shape ``values.shape + (3,)``."""
    stops = [v for v, _ in COLOUR_MAP]
    return np.stack(
        [np.interp(values, stops, [rgb[c] for _, rgb in COLOUR_MAP]) for c in range(3)], axis=-1
    )


def blend(hu: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A CT slice in the brain window with ``heat`` (0..1) overlaid, as uint8 RGB."""
    low = WINDOW_CENTER - WINDOW_WIDTH / 2
    grey = np.clip((hu - low) / WINDOW_WIDTH, 0.0, 1.0)[..., None] * 255.0
    heat = np.clip(heat, 0.0, 1.0)
    alpha = np.where(heat >= HEAT_FLOOR, HEAT_OPACITY, 0.0)[..., None]
    return np.rint(grey * (1 - alpha) + colour_map(heat) * alpha).astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fitting_font(text: str, width: int, size: int) -> ImageFont.FreeTypeFont:
    font = _font(size)
    while size > 8 and font.getlength(text) > width:
        size -= 1
        font = _font(size)
    return font


def render(hu: np.ndarray, heat: np.ndarray, lines: list[str]) -> np.ndarray:
    """The whole secondary capture: banner, blended slice, colour bar and ``lines`` of text."""
    scale = max(1, round(TARGET_COLUMNS / hu.shape[1]))
    image = np.repeat(np.repeat(blend(hu, heat), scale, axis=0), scale, axis=1)
    rows, columns = image.shape[:2]
    text_size = max(12, columns // 32)
    banner_height = 2 * text_size
    bar_width = 4 * text_size
    footer_height = (len(lines) + 1) * (text_size + 4)
    canvas = Image.new("RGB", (columns + bar_width, banner_height + rows + footer_height), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, banner_height))
    draw = ImageDraw.Draw(canvas)

    draw.rectangle((0, 0, canvas.width - 1, banner_height - 1), fill=BANNER_RGB)
    banner_font = _fitting_font(BANNER, canvas.width - 8, int(text_size * 1.3))
    draw.text((canvas.width // 2, banner_height // 2), BANNER, fill=(255, 255, 255), font=banner_font, anchor="mm")

    font = _font(text_size)
    bar_left, bar_right = columns + text_size // 2, columns + text_size + text_size // 2
    bar_top, bar_bottom = banner_height + text_size, banner_height + rows - text_size
    ramp = colour_map(np.linspace(1.0, 0.0, bar_bottom - bar_top)).astype(np.uint8)
    bar = np.repeat(ramp[:, None, :], bar_right - bar_left, axis=1)
    canvas.paste(Image.fromarray(bar), (bar_left, bar_top))
    draw.text((bar_right + 2, bar_top), "1", fill=(255, 255, 255), font=font, anchor="lm")
    draw.text((bar_right + 2, bar_bottom), "0", fill=(255, 255, 255), font=font, anchor="lm")
    draw.text((bar_left, bar_top - 2), "p", fill=(255, 255, 255), font=font, anchor="ld")

    y = banner_height + rows + 4
    for line in lines:
        draw.text((4, y), line, fill=(255, 255, 255), font=font)
        y += text_size + 4
    return np.asarray(canvas)


def _lines(index: int, rank: int, output: DetectorOutput, findings: Findings) -> list[str]:
    scores = output.slice_probabilities[index]
    subtypes = sorted(SUBTYPES, key=lambda s: -scores[LABELS.index(s)])
    return [
        f"Key slice {rank} (slice {index + 1} of {len(output.slice_scores)}): "
        f"ICH {float(output.slice_scores[index]):.2f}",
        "  ".join(f"{s} {scores[LABELS.index(s)]:.2f}" for s in subtypes),
        f"Study: ICH {findings.probabilities['any']:.2f}, priority {findings.priority.level}"
        f" - {output.model_name} {output.model_version}",
    ]


def _patient_orientation(orientation: tuple[float, ...]) -> tuple[str, str]:
    """Patient Orientation letters of the row and column directions (dominant axis)."""
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def letter(cosines) -> str:
        axis = int(np.argmax(np.abs(cosines)))
        return letters[axis][0 if cosines[axis] > 0 else 1]

    return letter(orientation[:3]), letter(orientation[3:6])


def build_scs(
    sources: list[Dataset], volume: Volume, output: DetectorOutput, findings: Findings, uids: ResultUIDs
) -> list[Dataset]:
    """One secondary capture per key slice, instance n for the n-th key slice (kind "sc:<n>")."""
    return [
        _build_sc(rank, index, sources, volume, output, findings, uids)
        for rank, index in enumerate(key_slice_indices(output), start=1)
    ]


def _build_sc(
    rank: int,
    index: int,
    sources: list[Dataset],
    volume: Volume,
    output: DetectorOutput,
    findings: Findings,
    uids: ResultUIDs,
) -> Dataset:
    source, frames = slice_source(sources, volume, index)
    pixels = render(volume.hu[index], output.heatmaps[index], _lines(index, rank, output, findings))
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=source.StudyInstanceUID,
        patient_orientation=_patient_orientation(volume.orientation),
        **object_identity(uids, output, "sc", SERIES_NUMBER, f"AI ICH heatmaps - {DISCLAIMER}",
                          instance=f"sc:{rank}", instance_number=rank),
    )
    copy_patient_and_study(source, sc)
    sc.BodyPartExamined = source.get("BodyPartExamined") or "HEAD"  # unpaired: no Laterality
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # rendered by a workstation
    sc.DerivationDescription = f"Brain window {WINDOW_CENTER:g}/{WINDOW_WIDTH:g} with ICH heatmap overlay"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frames:
        reference.ReferencedFrameNumber = frames[0]
    sc.SourceImageSequence = [reference]
    return sc
