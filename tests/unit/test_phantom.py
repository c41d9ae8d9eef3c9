"""The synthetic head CT: determinism, DICOM headers and pixels, anatomy, and masks that match."""
from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1
from scipy import ndimage

from training.phantom import ENCODABLE_TRANSFER_SYNTAXES, SUBTYPES, make_findings, make_study, write_study


def stored_hu(ds: pydicom.Dataset) -> np.ndarray:
    """HU as a loader should compute them: padding becomes air, then the rescale."""
    stored = ds.pixel_array.astype(np.float32)
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if "PixelPaddingValue" in ds:
        hu[stored == ds.PixelPaddingValue] = -1024.0
    return hu


def normal(ds: pydicom.Dataset) -> np.ndarray:
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


@pytest.fixture(scope="module")
def positive():
    return make_study(11, subtypes=["EDH", "IPH", "IVH", "SAH", "SDH"], matrix=128, n_slices=30, slice_thickness=5.0)


def test_same_seed_same_study():
    a, b = (make_study(3, matrix=48, n_slices=8) for _ in range(2))
    assert np.array_equal(a.hu, b.hu)
    assert all(np.array_equal(a.masks[s], b.masks[s]) for s in SUBTYPES)
    assert a.truth == b.truth and a.report == b.report
    assert [d.SOPInstanceUID for d in a.datasets] == [d.SOPInstanceUID for d in b.datasets]
    assert make_study(4, matrix=48, n_slices=8).truth["study_instance_uid"] != a.truth["study_instance_uid"]


def test_pixels_decode_to_hu_in_volume_order(positive):
    ds0 = positive.datasets[0]
    assert ds0.Modality == "CT" and ds0.BodyPartExamined == "HEAD" and list(ds0.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [d.SOPInstanceUID for d in positive.datasets] == positive.truth["sop_instance_uids"]
    for k, ds in enumerate(positive.datasets):
        assert np.array_equal(stored_hu(ds), positive.hu[k])
    heights = [np.array(d.ImagePositionPatient, dtype=float) @ normal(d) for d in positive.datasets]
    assert np.allclose(np.diff(heights), float(ds0.SpacingBetweenSlices), atol=1e-3)


def test_headers_vary_between_vendors_and_tilt_shears_positions():
    studies = [make_study(seed, matrix=32, n_slices=3) for seed in range(30)]
    assert {d.datasets[0].PixelRepresentation for d in studies} == {0, 1}
    assert {float(d.datasets[0].RescaleIntercept) for d in studies} == {-1024.0, 0.0}
    assert any("PixelPaddingValue" in d.datasets[0] for d in studies)
    tilted = [d for d in studies if float(d.datasets[0].GantryDetectorTilt) != 0]
    assert tilted and len(tilted) < len(studies)
    for study in tilted:
        ds = study.datasets
        step = np.subtract(ds[1].ImagePositionPatient, ds[0].ImagePositionPatient)
        n = normal(ds[0])
        in_plane = step - (step @ n) * n
        shear = np.degrees(np.arctan2(np.linalg.norm(in_plane), step @ n))
        assert shear == pytest.approx(float(ds[0].GantryDetectorTilt), abs=0.1)


def test_tissues_have_their_hounsfield_values():
    study = make_study(21, positive=False, matrix=128, n_slices=30, slice_thickness=5.0)
    hu = study.hu[12:22]  # mid-cerebrum
    assert not any(m.any() for m in study.masks.values())
    assert np.median(hu[hu < -500]) < -950  # air
    brain = hu[(hu > 0) & (hu < 60)]
    assert 22 < np.median(brain) < 38  # grey and white matter (and some CSF)
    assert (hu > 700).mean() > 0.01  # skull


def test_masks_line_up_with_blood(positive):
    assert positive.truth["subtypes"] == list(SUBTYPES)
    voxel_ml = np.prod(positive.truth["params"]["spacing_mm"]) / 1000
    for subtype in SUBTYPES:
        mask = positive.masks[subtype]
        assert mask.shape == positive.hu.shape and mask.dtype == bool
        assert 45 < np.median(positive.hu[mask]) < 95, subtype
        assert positive.truth["volumes_ml"][subtype] == pytest.approx(mask.sum() * voxel_ml, rel=1e-3)
    union = np.logical_or.reduce(list(positive.masks.values()))
    slice_labels = np.array(positive.truth["slice_labels"])
    assert np.array_equal(slice_labels[:, 0], union.any(axis=(1, 2)))


def test_hemorrhages_have_their_shapes_and_places(positive):
    hu, masks = positive.hu, positive.masks
    near_bone = ndimage.binary_dilation(hu > 300, iterations=3)
    for subtype in ("EDH", "SDH"):  # extra-axial: against the inner table
        assert (masks[subtype] & near_bone).sum() > 0.2 * masks[subtype].sum(), subtype
    lesions = {l["subtype"]: l for l in positive.truth["lesions"]}
    cols = positive.hu.shape[2]
    for subtype in ("EDH", "SDH", "IPH"):  # on the reported side (+x, higher columns = patient left)
        centre = np.nonzero(masks[subtype])[2].mean()
        assert (centre > cols / 2) == (lesions[subtype]["side"] == "left"), subtype
    iph = masks["IPH"]
    rim = ndimage.binary_dilation(iph, iterations=2) & ~iph & (hu > 0) & (hu < 45)
    assert np.median(hu[rim]) < 30  # hypodense edema around the clot


def test_ivh_layers_posteriorly():
    study = make_study(8, subtypes=["IVH"], matrix=96, n_slices=30, slice_thickness=5.0)
    assert study.truth["lesions"][0]["pattern"] == "layering"
    blood_rows = np.nonzero(study.masks["IVH"])[1]
    csf_rows = np.nonzero((study.hu > -5) & (study.hu < 15))[1]
    assert blood_rows.mean() > csf_rows.mean()  # rows grow toward the back of the head


def test_small_and_large_bleeds_occur():
    volumes = [make_study(s, subtypes=["IPH"], matrix=48, n_slices=20, slice_thickness=5.0).truth["volumes_ml"]["IPH"]
               for s in range(8)]
    assert min(volumes) < 5 < 20 < max(volumes)


def test_findings_and_negative_reports():
    assert make_study(5, positive=False, matrix=32, n_slices=4).truth["labels"]["any"] == 0
    findings = make_findings(5, subtypes=["SDH"])
    assert findings["subtypes"] == ["SDH"] and findings["positive"]
    with pytest.raises(ValueError):
        make_findings(5, positive=False, subtypes=["SDH"])


@pytest.mark.parametrize("syntax", ENCODABLE_TRANSFER_SYNTAXES)
def test_transfer_syntaxes_round_trip(tmp_path, syntax):
    study = make_study(13, matrix=32, n_slices=2, transfer_syntax=syntax)
    folder = write_study(study, tmp_path)
    for k, uid in enumerate(study.truth["sop_instance_uids"]):
        ds = pydicom.dcmread(folder / "dicom" / f"{uid}.dcm")
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(stored_hu(ds), study.hu[k])


def test_unencodable_syntax_is_refused():
    with pytest.raises(ValueError, match="cannot encode"):
        make_study(1, matrix=32, n_slices=2, transfer_syntax=JPEGLosslessSV1)


def test_write_study_layout(tmp_path):
    study = make_study(17, subtypes=["SAH"], matrix=32, n_slices=6, transfer_syntax=ExplicitVRLittleEndian)
    folder = write_study(study, tmp_path)
    assert folder == tmp_path / study.datasets[0].StudyID
    assert len(list((folder / "dicom").glob("*.dcm"))) == 6
    masks = np.load(folder / "masks.npz")
    assert all(np.array_equal(masks[s], study.masks[s]) for s in SUBTYPES)
    assert json.loads((folder / "truth.json").read_text()) == json.loads(json.dumps(study.truth))
    assert (folder / "report.txt").read_text().strip() == study.report


def test_a_large_mass_shifts_the_midline_away_from_it():
    findings = make_findings(7, subtypes=["SDH"])
    assert findings["midline_shift_mm"] > 5 and findings["midline_shift_toward"] == "left"
    kwargs = dict(matrix=96, n_slices=30, slice_thickness=5.0)
    shifted, normal_ = make_study(7, subtypes=["SDH"], **kwargs), make_study(7, positive=False, **kwargs)

    def deep_csf_column(hu: np.ndarray) -> float:
        """Mean column of CSF voxels around the ventricles (mid-slices, central crop)."""
        n = hu.shape[0]
        core = hu[n // 2 - 3: n // 2 + 5, 30:66, 30:66]
        return float(np.nonzero((core > -5) & (core < 15))[2].mean())

    moved_mm = (deep_csf_column(shifted.hu) - deep_csf_column(normal_.hu)) * float(shifted.datasets[0].PixelSpacing[1])
    assert moved_mm > findings["midline_shift_mm"] / 3  # toward the patient's left: higher columns
