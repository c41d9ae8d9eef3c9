"""Head CT and contrast recognised from the images (worker.head_ct): phantoms with and without
synthetic contrast, real non-contrast slices in true HU, and a chest and an abdomen that are not heads."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ichnode.common.config import PriorityRule
from ichnode.common.result_folder import ResultFolder
from tests.helpers import GroundTruthDetector, detector_output
from training.datasets import SHARED_DATA
from training.dicom_series import ct_series_datasets
from training.phantom import make_study
from worker.geometry import Volume
from worker.head_ct import CONTRAST_FRACTION, examine
from worker.pipeline import NotAnalysed, analyze_series
from worker.volume import load_series

REAL_SLICES = SHARED_DATA / "ct-ich-hu-slices" / "ct"
CT_ICH_PIXEL_MM = 0.45  # not recorded in those files; CT-ICH's 512 x 512 matrices span about 230 mm


def phantom_volume(seed: int) -> tuple[Volume, np.ndarray]:
    study = make_study(seed, matrix=256, n_slices=40)
    spacing = tuple(study.truth["params"]["spacing_mm"])
    return Volume.from_array(study.hu.copy(), spacing), study.hu


def with_contrast(volume: Volume, seed: int, hu: float = 220.0) -> Volume:
    """The phantom as after a venous-phase bolus: a dozen vessels (3-4 mm across, running along the
    slices' normal) through the brain, and a dense sinus in the midline behind it."""
    rng = np.random.default_rng(seed)
    enhanced = volume.hu.copy()
    _, rows, columns = enhanced.shape
    pixel = volume.spacing_mm[1]
    yy, xx = np.mgrid[:rows, :columns]
    for z in range(enhanced.shape[0]):
        brain = np.argwhere((enhanced[z] > 20) & (enhanced[z] < 45))
        if len(brain) < 1000:
            continue
        centre = brain.mean(axis=0)
        for row, column in brain[rng.choice(len(brain), 12, replace=False)]:
            enhanced[z][(yy - row) ** 2 + (xx - column) ** 2 <= (1.8 / pixel) ** 2] = hu
        back = brain[brain[:, 0] == brain[:, 0].max()][0]
        sinus = (np.abs(xx - centre[1]) < 3 / pixel) & (yy < back[0] - 3 / pixel) & (yy > back[0] - 10 / pixel)
        enhanced[z][sinus & (enhanced[z] > 20) & (enhanced[z] < 45)] = hu
    return Volume.from_array(enhanced, volume.spacing_mm)


@pytest.mark.parametrize("seed", [101, 202, 7])
def test_phantom_heads_are_heads_without_contrast_and_with_it_when_dense_vessels_are_added(seed):
    volume, _ = phantom_volume(seed)
    plain = examine(volume)
    assert plain.head and plain.contrast is None, plain
    assert "skull ring around brain" in plain.head_reason
    enhanced = examine(with_contrast(volume, seed))
    assert enhanced.head and enhanced.contrast and "120-400 HU" in enhanced.contrast, enhanced


def real_slices() -> list[np.ndarray]:
    if not REAL_SLICES.is_dir():
        pytest.skip(f"{REAL_SLICES} not present")
    return [pydicom.dcmread(p).pixel_array.astype(np.float32) for p in sorted(REAL_SLICES.glob("*.dcm"))]


def test_real_non_contrast_slices_are_a_head_and_none_is_taken_for_contrast():
    """18 slices of 10 CT-ICH patients in the scanner's HU (bleeds, fractures, craniotomies): no slice
    shows contrast on its own, nor all of them together, and together they are a head."""
    slices = real_slices()
    spacing = (5.0, CT_ICH_PIXEL_MM, CT_ICH_PIXEL_MM)
    for hu in slices:
        assert examine(Volume.from_array(hu[None], spacing)).contrast is None
    stacked = examine(Volume.from_array(np.stack(slices), spacing))
    assert stacked.head and stacked.contrast is None, stacked


def body(rows_mm: float, columns_mm: float, organs, pixel: float = 0.8, slices: int = 20) -> Volume:
    """An axial trunk: an ellipse of soft tissue with `organs` [(centre y, x, radii y, x in mm, HU)], a
    vertebra (a bone ring around the spinal canal) and ribs around it."""
    n = 512
    yy, xx = (np.mgrid[:n, :n] - n / 2) * pixel
    hu = np.full((n, n), -1000.0)
    hu[(yy / (rows_mm / 2)) ** 2 + (xx / (columns_mm / 2)) ** 2 <= 1] = 40.0
    for cy, cx, ry, rx, value in organs:
        hu[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = value
    spine_y = rows_mm / 2 - 45
    hu[(yy - spine_y) ** 2 + xx**2 <= 15**2] = 900.0  # vertebral ring
    hu[(yy - spine_y) ** 2 + xx**2 <= 7**2] = 30.0  # the spinal cord in its canal
    for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):  # ribs just inside the outline
        ry, rx = 0.85 * rows_mm / 2 * np.sin(angle), 0.85 * columns_mm / 2 * np.cos(angle)
        hu[(yy - ry) ** 2 + (xx - rx) ** 2 <= 6**2] = 800.0
    return Volume.from_array(np.repeat(hu[None], slices, axis=0), (5.0, pixel, pixel))


def test_a_chest_and_an_abdomen_are_not_heads():
    chest = body(230, 330, [(-10, -70, 80, 55, -850.0), (-10, 70, 80, 55, -850.0)])
    abdomen = body(250, 340, [(-20, -60, 60, 70, 55.0)])
    for volume in (chest, abdomen):
        check = examine(volume)
        assert not check.head and "on 0 of 20 slices examined (needs 3)" in check.head_reason, check


def test_the_contrast_threshold_is_a_fraction():
    assert 0 < CONTRAST_FRACTION < 0.05


def write(datasets, folder) -> list:
    folder.mkdir()
    paths = [folder / f"{index}.dcm" for index in range(len(datasets))]
    for ds, path in zip(datasets, paths):
        ds.save_as(path, enforce_file_format=True)
    return paths


def test_the_pipeline_skips_a_chest_whose_headers_name_no_region(tmp_path):
    chest = body(230, 330, [(-10, -70, 80, 55, -850.0), (-10, 70, 80, 55, -850.0)])
    stored = (chest.hu + 1024).astype(np.uint16)
    n = len(stored)
    datasets = ct_series_datasets(
        stored, positions=chest.positions, orientation=chest.orientation, pixel_spacing=chest.spacing_mm[1:],
        thickness=5.0, spacing=5.0, study_uid=generate_uid(), series_uid=generate_uid(),
        frame_of_reference_uid=generate_uid(), instance_uids=[generate_uid() for _ in range(n)],
        header={"BodyPartExamined": ""}, intercept=-1024.0)
    paths = write(datasets, tmp_path / "chest")
    with pytest.raises(NotAnalysed, match=r"^not a head CT by its images \(the headers do not say\): a skull ring"):
        analyze_series(paths, None, PriorityRule(), ResultFolder(tmp_path / "results"))


def test_the_pipeline_skips_contrast_by_default_and_analyses_it_with_a_warning_when_set(tmp_path, caplog):
    """A CQ500-style series: no BodyPartExamined, only "4cc sec 150cc D3D on" for a description."""
    study = make_study(7, matrix=128, n_slices=20)
    for ds in study.datasets:
        del ds.BodyPartExamined
        ds.SeriesDescription, ds.StudyDescription = "4cc sec 150cc D3D on", ""
    paths = write(study.datasets, tmp_path / "cq500")
    output = detector_output(load_series(paths).volume, {}, {"any": 0.1})
    with pytest.raises(NotAnalysed) as refused:
        analyze_series(paths, GroundTruthDetector(output), PriorityRule(), ResultFolder(tmp_path / "a"))
    assert str(refused.value) == ("contrast-enhanced (SeriesDescription '4cc sec 150cc D3D on'); "
                                  "set series.analyse_contrast to analyse it")
    caplog.set_level("INFO", logger="ichnode.worker")
    analysis = analyze_series(paths, GroundTruthDetector(output), PriorityRule(), ResultFolder(tmp_path / "b"),
                              analyse_contrast=True)
    assert analysis.warnings[-1].startswith("contrast-enhanced (SeriesDescription '4cc sec 150cc D3D on'): "
                                            "analysed because series.analyse_contrast is set")
    assert "headers do not name the head; images show a head: a skull ring around brain" in caplog.text
