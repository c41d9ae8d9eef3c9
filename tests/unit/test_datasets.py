"""Dataset adapters: phantom folders, RSNA and CQ500 layouts (built here), real CT-ICH, splits."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ichnode.common.vocabulary import LABELS, SUBTYPES
from training import datasets
from training.phantom import make_studies, make_study, write_study

CTICH = datasets.SHARED_DATA / "ct-ich"


def test_written_phantoms_load_like_in_memory_ones(tmp_path):
    """Through the node's loader, for every vendor header profile, tilted or not."""
    kwargs = dict(matrix=48, n_slices=8, positive_fraction=0.7)
    in_memory = datasets.phantom_scans(seed=10, n=5, **kwargs)
    for study in make_studies(10, 5, kwargs["positive_fraction"], matrix=48, n_slices=8):
        write_study(study, tmp_path)
    from_disk = datasets.phantom_scans(tmp_path)
    assert [s.scan_id for s in from_disk] == [s.scan_id for s in in_memory]
    assert {(s.volume.gantry_tilt_deg != 0) for s in in_memory} == {True, False}
    manufacturers = {pydicom.dcmread(next((tmp_path / s.scan_id / "dicom").iterdir())).Manufacturer for s in in_memory}
    assert len(manufacturers) == 4
    for a, b in zip(in_memory, from_disk):
        assert np.array_equal(a.volume.hu, b.volume.hu)
        assert np.allclose(a.volume.positions, b.volume.positions, atol=1e-3)
        assert np.allclose(a.volume.spacing_mm, b.volume.spacing_mm, atol=1e-3)
        assert a.volume.gantry_tilt_deg == pytest.approx(b.volume.gantry_tilt_deg, abs=0.1)
        assert [r.sop_instance_uid for r in a.volume.slices] == [r.sop_instance_uid for r in b.volume.slices]
        assert a.labels == b.labels and a.report == b.report
        assert np.array_equal(a.slice_labels, b.slice_labels)
        assert all(np.array_equal(a.masks[s], b.masks[s]) for s in SUBTYPES)
    assert any(s.labels["any"] for s in in_memory)


# ----------------------------------------------------------------------------------------------
# RSNA 2019 layout


def write_rsna(root: Path) -> dict[str, dict]:
    """Two labelled series (two patients) and one unlabelled; returns expected labels per series."""
    (root / "stage_2_train").mkdir(parents=True)
    rows, expected = [], {}
    names = iter(range(1000))
    for seed, patient, labelled in ((1, "P1", True), (2, "P2", True), (3, "P3", False)):
        study = make_study(seed, matrix=32, n_slices=5, patient_id=patient)
        series_labels = np.zeros((5, len(LABELS)), dtype=int)
        series_labels[1:3, LABELS.index("SDH")] = 1 if seed == 1 else 0  # volume slices 1 and 2
        series_labels[4, LABELS.index("IPH")] = 1 if seed == 2 else 0  # the most superior slice
        series_labels[:, 0] = series_labels[:, 1:].any(axis=1)
        for k, ds in enumerate(study.datasets):
            sop = f"ID_{next(names) * 7919 % 100003:09x}"  # file order unrelated to slice order
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.save_as(root / "stage_2_train" / f"{sop}.dcm", enforce_file_format=True)
            if labelled:
                for name, label in datasets.RSNA_SUBTYPES.items():
                    rows.append((f"{sop}_{name}", series_labels[k, LABELS.index(label)]))
        expected[str(study.datasets[0].SeriesInstanceUID)] = {"patient": patient, "slices": series_labels}
    rows.sort()
    with open(root / "stage_2_train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    return expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # RSNA's "ID_..." UIDs, kept on purpose
def test_rsna_groups_orders_and_labels_series(tmp_path):
    expected = write_rsna(tmp_path)
    scans = list(datasets.rsna_scans(tmp_path))
    assert len(scans) == 2  # the unlabelled series is skipped
    for scan in scans:
        want = expected[scan.scan_id]
        assert scan.patient_id == want["patient"]
        heights = scan.volume.positions @ np.cross(scan.volume.orientation[:3], scan.volume.orientation[3:])
        assert np.all(np.diff(heights) > 0)
        assert np.array_equal(scan.slice_labels, want["slices"])
        assert scan.labels == {k: int(want["slices"][:, i].any()) for i, k in enumerate(LABELS)}


# ----------------------------------------------------------------------------------------------
# CQ500 layout


def write_cq500(root: Path) -> None:
    studies = {
        # name: series written as (seed, thickness, description, kernel)
        "CQ500-CT-0": [(20, 5.0, "CT 5mm", "STANDARD"), (21, 0.625, "CT 0.625mm", "STANDARD"),
                       (22, 0.625, "CT BONE THIN", "BONE")],
        "CQ500-CT-1": [(23, 5.0, "CT PLAIN", "H30s"), (24, 2.5, "CT Bone", "H70h")],
    }
    for name, series in studies.items():
        folder = root / f"{name.replace('-', '')} {name.replace('-', '')}" / "Unknown Study"
        for seed, thickness, description, kernel in series:
            study = make_study(seed, matrix=32, n_slices=4, slice_thickness=thickness)
            out = folder / description
            out.mkdir(parents=True)
            for ds in study.datasets:
                ds.SeriesDescription, ds.ConvolutionKernel = description, kernel
                ds.save_as(out / f"{ds.InstanceNumber}.dcm", enforce_file_format=True)
    header = ["name", "Category"] + [f"R{r}:{c}" for r in (1, 2, 3) for c in ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "Fracture")]
    reads = {  # per reader: ICH, IPH, IVH, SDH, EDH, SAH, Fracture
        "CQ500-CT-0": [[1, 1, 0, 1, 0, 0, 0], [1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0]],
        "CQ500-CT-1": [[0] * 7, [1, 0, 0, 0, 0, 1, 0], [0] * 7],
    }
    with open(root / "reads.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name, by_reader in reads.items():
            writer.writerow([name, "B1"] + [v for reader in by_reader for v in reader])


def test_cq500_majority_labels_and_thin_plain_series(tmp_path):
    write_cq500(tmp_path)
    scans = {s.scan_id: s for s in datasets.cq500_scans(tmp_path)}
    assert set(scans) == {"CQ500-CT-0", "CQ500-CT-1"}
    first, second = scans["CQ500-CT-0"], scans["CQ500-CT-1"]
    assert first.labels == {"any": 1, "EDH": 0, "IPH": 1, "IVH": 0, "SAH": 0, "SDH": 1}
    assert second.labels == {k: 0 for k in LABELS}  # one reader of three is not a majority
    assert first.volume.spacing_mm[0] == pytest.approx(0.625)  # thin plain, not thin bone
    assert second.volume.spacing_mm[0] == pytest.approx(5.0)  # plain beats thinner bone
    assert first.slice_labels is None and first.patient_id == "CQ500-CT-0"


# ----------------------------------------------------------------------------------------------
# CT-ICH (real data)


def enclosed_air(hu: np.ndarray) -> int:
    """Air pixels inside the head outline: sinuses and airways, found low in the head."""
    return int((ndimage.binary_fill_holes(hu > -300) & (hu < -500)).sum())


@pytest.mark.skipif(not CTICH.is_dir(), reason="CT-ICH data not present")
def test_ctich_pseudo_hu_order_and_labels():
    bleed, clean = datasets.ctich_scans(CTICH, patients=[49, 57])
    for scan in (bleed, clean):
        n = scan.volume.hu.shape[0]
        assert scan.volume.hu.shape[1:] == (650, 650) and scan.slice_labels.shape == (n, len(LABELS))
        assert scan.volume.spacing_mm == (5.0, datasets.CTICH_PIXEL_SPACING_MM, datasets.CTICH_PIXEL_SPACING_MM)
        hu = scan.volume.hu
        mid = hu[n // 3: 2 * n // 3]
        assert 20 < np.median(mid[(mid > 0) & (mid < 80)]) < 45  # brain
        assert np.percentile(mid[mid > 100], 90) > 300  # skull
        assert sum(map(enclosed_air, hu[:3])) > 10 * sum(map(enclosed_air, hu[-3:])) + 100  # inferior first
    assert bleed.labels == {"any": 1, "EDH": 1, "IPH": 1, "IVH": 0, "SAH": 0, "SDH": 0}
    assert clean.labels == {k: 0 for k in LABELS}
    assert np.array_equal(bleed.slice_labels[:, 0], bleed.slice_labels[:, 1:].any(axis=1))
    assert bleed.slice_labels[:, 0].sum() == 9
    assert (bleed.age_years, clean.age_years) == (35.0, 26.0)  # patient_demographics.csv
    assert (bleed.slice_fracture.sum(), clean.slice_fracture.sum()) == (14, 0)  # Fracture_Yes_No
    assert bleed.slice_fracture[[13, 14, 19, 30]].all() and not bleed.slice_fracture[[12, 15, 31]].any()


# ----------------------------------------------------------------------------------------------
# Splits


def test_split_by_patient_is_deterministic_and_never_splits_a_patient():
    ids = [f"p{i}" for i in range(40) for _ in range(i % 3 + 1)]  # several scans per patient
    train, val, test = datasets.split_by_patient(ids, (0.6, 0.2, 0.2), seed=3)
    reordered = datasets.split_by_patient(list(reversed(ids)), (0.6, 0.2, 0.2), seed=3)
    assert [set(g) for g in reordered] == [set(train), set(val), set(test)]  # input order does not matter
    groups = [set(g) for g in (train, val, test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert [len(g) for g in groups] == [24, 8, 8]
    assert sorted(train + val + test) == sorted(ids)
    assert datasets.split_by_patient(ids, (0.6, 0.2, 0.2), seed=3) == (train, val, test)
    assert datasets.split_by_patient(ids, (0.6, 0.2, 0.2), seed=4) != (train, val, test)
    rest, held = datasets.split_by_patient(ids, 0.25, seed=3)
    assert len(set(held)) == 10 and not set(held) & set(rest)


SHARED = CTICH.parent
needs_shared = pytest.mark.skipif(not (SHARED / "rsna-slices").is_dir() or not (SHARED / "ct-ich-hu-slices").is_dir(),
                                  reason="RSNA slices / CT-ICH true-HU slices not present")


@needs_shared
def test_ctich_brain_window_assumption_agrees_with_true_hu_on_the_same_slices():
    """The JPG brain window, fitted against the same slice in true HU (smoothed, reduced major
    axis over unsaturated brain pixels), is centred at about 39 HU and about 110 HU wide on all 18
    slices: the assumed 40/100 is within the training's contrast augmentation (15%)."""
    from PIL import Image

    widths, centres = [], []
    for scan in datasets.ctich_hu_slices(SHARED / "ct-ich-hu-slices")[::6]:
        hu = ndimage.gaussian_filter(np.rot90(scan.volume.hu[0], 1), 1.5)  # the NIfTI slices lie transposed
        folder = CTICH / "Patients_CT" / scan.patient_id.split("-")[1] / "brain"
        greys = [np.asarray(Image.open(p).convert("L").resize((512, 512), Image.BILINEAR), dtype=np.float32)
                 for p in folder.glob("*.jpg")]
        grey = max(greys, key=lambda g: np.corrcoef(np.clip(hu, -10, 90)[::4, ::4].ravel(), g[::4, ::4].ravel())[0, 1])
        keep = ndimage.binary_erosion((grey > 25) & (grey < 230) & (hu > 0) & (hu < 90), iterations=3)
        x, y = hu[keep], grey[keep]
        slope = np.sqrt(np.polyfit(x, y, 1)[0] / np.polyfit(y, x, 1)[0])
        widths.append(255 / slope)
        centres.append(x.mean() + (127.5 - y.mean()) / slope)
    centre, width = datasets.CTICH_BRAIN_WINDOW
    assert np.median(widths) == pytest.approx(width, rel=0.15)
    assert np.median(centres) == pytest.approx(centre, abs=3)


@needs_shared
def test_rsna_slices_split_is_fixed_and_patient_free_with_brain_window_only_hu():
    ids = [f"ID_{i:05x}.png" for i in range(100)]
    split = datasets.rsna_slice_split(ids)
    assert split == datasets.rsna_slice_split(list(reversed(ids)))  # order of listing does not matter
    assert sum(v == "heldout" for v in split.values()) == 20
    grey = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    hu = datasets.rsna_slice_hu(grey)
    assert hu[0, 0] == -1024 and hu[0, 2] == pytest.approx(40, abs=0.2) and hu[0, 3] == pytest.approx(80)
    scan = datasets.rsna_slice_scans(SHARED / "rsna-slices", "heldout")[0]
    assert scan.brain_window_only and scan.volume.hu.shape[0] == 1 and scan.slice_labels.shape == (1, 6)
