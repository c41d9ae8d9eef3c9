"""Series eligibility and choice over instance header summaries (as node.headers stores them)."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from node.headers import InstanceHeader, instance_header
from node.selection import SHARP, SOFT, UNCLASSIFIED, choose_series, eligibility, kernel_class
from training.phantom import make_study

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
MIN_SLICES, MIN_COVERAGE = 16, 80.0


def series(count: int = 32, spacing: float = 5.0, orientation=AXIAL, **overrides) -> list[InstanceHeader]:
    """Headers of a routine non-contrast head series, slices along the orientation's normal."""
    normal = np.cross(orientation[:3], orientation[3:])
    headers = []
    for i in range(count):
        header = {
            "sop_instance_uid": f"1.2.99.{i + 1}",
            "study_instance_uid": "1.2",
            "series_instance_uid": "1.2.99",
            "sop_class_uid": CT_IMAGE,
            "modality": "CT",
            "body_part": "HEAD",
            "series_description": "Head 5.0 H31s",
            "protocol_name": "Routine Head",
            "study_description": "CT Schaedel",
            "kernel": "H31s",
            "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "contrast_agent": None,
            "instance_number": count - i,
            "image_position": [float(v) for v in np.array([-120.0, -100.0, 0.0]) + i * spacing * normal],
            "image_orientation": list(orientation),
            "slice_thickness": spacing,
            "rows": 512,
            "columns": 512,
            "number_of_frames": 1,
        }
        header.update(overrides)
        headers.append(InstanceHeader(**header))
    return headers


def judge(headers: list[InstanceHeader]):
    return eligibility(headers, MIN_SLICES, MIN_COVERAGE)


def test_routine_head_series_is_eligible():
    result = judge(series())
    assert result.eligible and result.reason is None


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class Secondary Capture Image Storage is not a CT image"),
        ({"image_type": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer (ImageType LOCALIZER)"),
        ({"series_description": "Topogram 0.6 T20s"}, "localizer (SeriesDescription 'Topogram 0.6 T20s')"),
        ({"body_part": "CHEST"}, "not a head series (BodyPartExamined 'CHEST')"),
        (
            {"body_part": None, "series_description": "Abdomen", "protocol_name": None, "study_description": "CT ABD"},
            "not a head series (no BodyPartExamined; the descriptions name another region)",
        ),
        ({"series_description": "4cc sec 150cc D3D on"}, "contrast-enhanced (SeriesDescription '4cc sec 150cc D3D on')"),
        ({"series_description": "Head 80 ml Ultravist"}, "contrast-enhanced (SeriesDescription 'Head 80 ml Ultravist')"),
        ({"contrast_agent": "Omnipaque"}, "contrast-enhanced (ContrastBolusAgent 'Omnipaque')"),
        ({"series_description": "Head C+ 5mm"}, "contrast-enhanced (SeriesDescription 'Head C+ 5mm')"),
        ({"series_description": "CTA Head 0.6"}, "contrast-enhanced (SeriesDescription 'CTA Head 0.6')"),
        ({"series_description": "Perfusion 4D"}, "contrast-enhanced (SeriesDescription 'Perfusion 4D')"),
        ({"series_description": "Kopf mit KM"}, "contrast-enhanced (SeriesDescription 'Kopf mit KM')"),
        (
            {"image_type": ["DERIVED", "SECONDARY", "MIP"], "series_description": "Head"},
            "projection or rendering (ImageType DERIVED\\SECONDARY\\MIP, SeriesDescription 'Head')",
        ),
    ],
)
def test_ineligible_series_say_why(overrides, reason):
    result = judge(series(**overrides))
    assert (result.eligible, result.reason) == (False, reason)


@pytest.mark.parametrize(
    "overrides",
    [
        {"body_part": None, "series_description": "CT HEAD W/O", "protocol_name": None},
        {"body_part": None, "series_description": "Axial 5mm", "protocol_name": "cCT nativ"},
        {"body_part": None, "series_description": "Axial", "protocol_name": None, "study_description": "CT Schädel"},
        {"body_part": None, "series_description": "Kopf 5mm", "protocol_name": None},
        {"body_part": "BRAIN"},
        {"body_part": "HEADNECK"},
        {"series_description": "CT HEAD WO CONTRAST"},
        {"series_description": "Head non-contrast"},
        {"series_description": "Kopf ohne KM"},
        {"contrast_agent": "NONE"},
        {"image_type": ["DERIVED", "SECONDARY", "AXIAL"], "series_description": "Head axial reformat"},
        {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2.2"},  # Legacy Converted Enhanced CT
    ],
)
def test_eligible_variants(overrides):
    assert judge(series(**overrides)).reason is None


def test_sagittal_reformat_is_not_axial():
    result = judge(series(orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0)))
    assert result.reason == "not axial (slice normal 90° from the head-foot axis)"


def test_tilted_gantry_orientation_is_axial():
    tilt = math.radians(20.0)
    assert judge(series(orientation=(1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt)))).eligible


@pytest.mark.parametrize(
    "count, spacing, reason",
    [
        (8, 5.0, "8 slices cover 40 mm; need >= 16 slices and >= 80 mm"),
        (40, 1.0, "40 slices cover 40 mm; need >= 16 slices and >= 80 mm"),
        (1, 5.0, "1 slice covers 5 mm; need >= 16 slices and >= 80 mm"),
    ],
)
def test_too_little_of_a_head(count, spacing, reason):
    assert judge(series(count, spacing)).reason == reason


def test_slices_counted_by_distinct_position_not_by_instance():
    headers = series(12, 5.0)
    repeated = headers + [h.model_copy(update={"instance_number": 100 + i}) for i, h in enumerate(headers)]
    random.Random(3).shuffle(repeated)
    assert judge(repeated).reason == "12 slices cover 60 mm; need >= 16 slices and >= 80 mm"
    assert judge(series(16, 5.0)).eligible  # 75 mm between first and last centre + one gap = 80 mm


def test_enhanced_ct_without_per_frame_positions_checked_by_frame_count():
    enhanced = series(1, image_position=None, image_orientation=None, slice_thickness=None, number_of_frames=40)
    assert judge(enhanced).eligible
    assert judge([enhanced[0].model_copy(update={"number_of_frames": 10})]).reason == "10 slices; need >= 16 slices"


@pytest.mark.parametrize(
    "soft, sharp",
    [
        ("H31s", "H70h"), ("J40s", "J70h"), ("Hr38", "Hr68"), ("STANDARD", "BONEPLUS"), ("SOFT", "LUNG"),
        ("UC", "YC"), ("FC26", "FC35"),
    ],
)
def test_soft_tissue_kernel_chosen_over_sharp_kernel(soft, sharp):
    candidates = {"1.2.1": series(kernel=sharp), "1.2.2": series(kernel=soft)}

    chosen, skipped = choose_series(candidates, MIN_SLICES, MIN_COVERAGE)

    assert chosen == "1.2.2"
    assert skipped == {"1.2.1": skipped["1.2.1"]}
    chosen_summary = f"soft-tissue kernel {soft}, 5.0 mm, 32 slices"
    this_summary = f"sharp kernel {sharp}, 5.0 mm, 32 slices"
    assert skipped["1.2.1"] == f"another series was chosen: 1.2.2 ({chosen_summary}; this one: {this_summary})"


def test_five_mm_chosen_over_thin_slices_and_original_over_derived():
    thin = series(240, 0.625)
    derived = series(image_type=["DERIVED", "SECONDARY", "AXIAL"])
    original = series()

    chosen, skipped = choose_series({"1.2.3": thin, "1.2.4": derived, "1.2.5": original}, MIN_SLICES, MIN_COVERAGE)

    assert chosen == "1.2.5"
    assert set(skipped) == {"1.2.3", "1.2.4"}


def test_ineligible_series_skipped_with_their_own_reason():
    localizer = series(1, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    candidates = {"1.2.6": series(), "1.2.7": series(modality="MR"), "1.2.8": localizer}

    chosen, skipped = choose_series(candidates, MIN_SLICES, MIN_COVERAGE)

    assert chosen == "1.2.6"
    assert skipped == {"1.2.7": "modality MR is not CT", "1.2.8": "localizer (ImageType LOCALIZER)"}


def test_no_eligible_series():
    assert choose_series({"1.2.9": series(modality="MR"), "1.2.10": []}, MIN_SLICES, MIN_COVERAGE) == (
        None,
        {"1.2.9": "modality MR is not CT", "1.2.10": "no instances"},
    )


def test_choice_between_equal_series_does_not_depend_on_arrival_order():
    uids = ["1.2.40", "1.2.300", "1.2.5"]
    choices = set()
    for seed in range(4):
        random.Random(seed).shuffle(uids)
        choices.add(choose_series({uid: series() for uid in uids}, MIN_SLICES, MIN_COVERAGE)[0])
    assert choices == {"1.2.300"}  # the smallest UID as a string


@pytest.mark.parametrize(
    "kernel, expected",
    [
        ("H31s", SOFT), ("Hr40\\3", SOFT), ("B30f", SOFT), ("HD STANDARD", SOFT), ("B_SOFT_B", SOFT), ("Brain", SOFT),
        ("UB", SOFT), ("FC21", SOFT), ("H60s", SHARP), ("Hr64", SHARP), ("BONE", SHARP), ("EDGE", SHARP),
        ("YD", SHARP), ("FC30", SHARP), ("B_SHARP_C", SHARP), ("H50s", UNCLASSIFIED), ("DETAIL", UNCLASSIFIED),
        (None, UNCLASSIFIED),
    ],
)
def test_kernel_classes(kernel, expected):
    assert kernel_class(kernel) == expected


def test_headers_of_a_phantom_head_ct_are_eligible():
    headers = [instance_header(ds) for ds in make_study(1, matrix=64).datasets]

    assert judge(headers).eligible
    assert judge([h.model_copy(update={"contrast_agent": "Iomeron 350"}) for h in headers]).reason == (
        "contrast-enhanced (ContrastBolusAgent 'Iomeron 350')"
    )


def test_headers_that_say_nothing_of_the_region_leave_the_choice_to_the_images():
    """Anonymised: no BodyPartExamined, no descriptions. Eligible (the worker checks the images), but
    a series whose headers name the head wins."""
    silent = series(body_part=None, series_description=None, protocol_name=None, study_description=None)
    assert judge(silent).eligible
    chosen, skipped = choose_series({"1.2.1": silent, "1.2.2": series(kernel="H70h")}, MIN_SLICES, MIN_COVERAGE)
    assert chosen == "1.2.2" and skipped["1.2.1"].startswith("another series was chosen: 1.2.2")


def test_contrast_is_analysed_only_when_configured_and_then_after_a_plain_series():
    contrast = series(series_description="4cc sec 150cc D3D on")
    assert not eligibility(contrast, MIN_SLICES, MIN_COVERAGE).eligible
    assert eligibility(contrast, MIN_SLICES, MIN_COVERAGE, analyse_contrast=True).eligible
    candidates = {"1.2.1": contrast, "1.2.2": series(kernel="H70h")}
    assert choose_series(candidates, MIN_SLICES, MIN_COVERAGE, analyse_contrast=True)[0] == "1.2.2"
    assert choose_series({"1.2.1": contrast}, MIN_SLICES, MIN_COVERAGE, analyse_contrast=True) == ("1.2.1", {})
