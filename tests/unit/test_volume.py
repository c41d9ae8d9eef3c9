"""load_series on tiny synthetic series: ordering, geometry, Hounsfield units and broken input."""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.helpers import enhanced_ct
from worker.volume import VolumeError, load_series

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ROWS, COLUMNS = 40, 32
FRAME_OF_REFERENCE = generate_uid()


def slice_hu(k: int) -> np.ndarray:
    """Test image for physical slice k: its HU values tell which slice it is."""
    hu = np.full((ROWS, COLUMNS), 10.0 * k)
    hu[0, 0] = -1024.0
    hu[-1, -1] = 1000.0 + 2 * k
    return hu


def ct_dataset(
    position,
    hu: np.ndarray,
    *,
    orientation=AXIAL,
    instance_number: int = 1,
    signed: bool = True,
    intercept: float = 0.0,
    slope: float = 1.0,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    rows: int = ROWS,
    columns: int = COLUMNS,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2.3"
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.6]
    ds.SliceThickness = 5.0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    _set_pixels(ds, hu[:rows, :columns], signed, slope, intercept)
    return ds


def _set_pixels(ds: Dataset, hu: np.ndarray, signed: bool, slope: float, intercept: float) -> None:
    ds.Rows, ds.Columns = hu.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    stored = np.round((hu - intercept) / slope).astype(np.int16 if signed else np.uint16)
    ds.PixelData = stored.tobytes()


def write(tmp_path: Path, datasets: list[Dataset]) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_series(z_positions, **kwargs) -> list[Dataset]:
    """One slice per z, InstanceNumber reversed (as some scanners number head-first)."""
    order = np.argsort(z_positions)
    rank = {int(i): k for k, i in enumerate(order)}
    return [
        ct_dataset((-30.0, -40.0, z), slice_hu(rank[i]), instance_number=len(z_positions) - i, **kwargs)
        for i, z in enumerate(z_positions)
    ]


def assert_slices_in_physical_order(hu: np.ndarray) -> None:
    np.testing.assert_array_equal(hu[:, 3, 3], 10.0 * np.arange(len(hu)))


def test_order_comes_from_positions_not_instance_numbers(tmp_path):
    datasets = axial_series([20.0, 5.0, 15.0, 0.0, 10.0, 25.0])
    random.Random(1).shuffle(datasets)

    loaded = load_series(write(tmp_path, datasets))

    volume = loaded.volume
    assert volume.hu.dtype == np.float32 and volume.hu.shape == (6, ROWS, COLUMNS)
    assert_slices_in_physical_order(volume.hu)
    np.testing.assert_allclose(volume.positions[:, 2], [0, 5, 10, 15, 20, 25])
    assert volume.spacing_mm == pytest.approx((5.0, 0.5, 0.6))  # PixelSpacing is [row, column] spacing
    assert [s.sop_instance_uid for s in volume.slices] == [ds.SOPInstanceUID for ds in loaded.sources]
    assert volume.frame_of_reference_uid == FRAME_OF_REFERENCE
    assert (volume.missing_slices, volume.uneven_spacing, volume.gantry_tilt_deg) == (0, False, 0.0)
    assert loaded.warnings == []


def test_slices_ascend_along_the_normal_for_sagittal_images(tmp_path):
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # normal = row x column = -x (towards patient right)
    xs = [-6.0, 3.0, 0.0, -3.0, 6.0]
    datasets = [ct_dataset((x, -50.0, 60.0), slice_hu(k), orientation=sagittal) for k, x in enumerate(xs)]

    volume = load_series(write(tmp_path, datasets)).volume

    np.testing.assert_allclose(volume.positions[:, 0], [6.0, 3.0, 0.0, -3.0, -6.0])
    np.testing.assert_array_equal(volume.hu[:, 3, 3], [40.0, 10.0, 20.0, 30.0, 0.0])
    assert volume.spacing_mm[0] == pytest.approx(3.0)


def test_gantry_tilt_reported_and_spacing_measured_along_the_normal(tmp_path):
    shear = math.tan(math.radians(20.0))
    datasets = [ct_dataset((-30.0, -40.0 + z * shear, z), slice_hu(k)) for k, z in enumerate([0.0, 5.0, 10.0, 15.0])]
    for ds in datasets:
        ds.GantryDetectorTilt = 20.0

    loaded = load_series(write(tmp_path, datasets))

    assert loaded.volume.gantry_tilt_deg == pytest.approx(20.0, abs=0.01)
    assert loaded.volume.spacing_mm[0] == pytest.approx(5.0)  # not the 5.32 mm between positions
    assert loaded.volume.uneven_spacing is False
    assert_slices_in_physical_order(loaded.volume.hu)
    assert any("gantry tilt 20.0°" in w and "GantryDetectorTilt 20°" in w for w in loaded.warnings)


def test_missing_slice_counted_and_warned(tmp_path):
    volume_warnings = load_series(write(tmp_path, axial_series([0.0, 5.0, 10.0, 25.0, 30.0, 35.0, 40.0])))

    assert volume_warnings.volume.missing_slices == 2
    assert volume_warnings.volume.spacing_mm[0] == pytest.approx(5.0)
    assert volume_warnings.volume.uneven_spacing is True  # index no longer maps linearly to position
    assert any("2 missing slice(s)" in w for w in volume_warnings.warnings)


def test_uneven_spacing_without_missing_slices(tmp_path):
    # posterior fossa at 2.5 mm, then 4 mm above it
    loaded = load_series(write(tmp_path, axial_series([0.0, 2.5, 5.0, 9.0, 13.0, 17.0, 21.0])))

    assert loaded.volume.uneven_spacing is True
    assert loaded.volume.missing_slices == 0
    assert loaded.volume.spacing_mm[0] == pytest.approx(4.0)
    assert any(w.startswith("uneven spacing") for w in loaded.warnings)


@pytest.mark.parametrize(
    "signed, slope, intercept",
    [(True, 1.0, 0.0), (False, 1.0, -1024.0), (False, 0.5, -1024.0), (True, 2.0, -1000.0)],
)
def test_stored_value_encodings_give_the_same_hounsfield_units(tmp_path, signed, slope, intercept):
    datasets = axial_series([0.0, 5.0, 10.0], signed=signed, slope=slope, intercept=intercept)

    volume = load_series(write(tmp_path, datasets)).volume

    np.testing.assert_allclose(volume.hu, np.stack([slice_hu(k) for k in range(3)]))


@pytest.mark.parametrize(
    "signed, intercept, padding, range_limit, padded",
    [
        (True, 0.0, -2000, None, -2000),
        (False, -1024.0, 4000, 4095, 4050),  # 4050 would be 3026 HU (bone) if rescaled
        (False, -1024.0, 4095, 4000, 4050),  # the range limit may be below the padding value
    ],
)
def test_padding_becomes_air_before_rescale(tmp_path, signed, intercept, padding, range_limit, padded):
    datasets = axial_series([0.0, 5.0], signed=signed, intercept=intercept)
    vr = "SS" if signed else "US"
    for ds in datasets:
        stored = ds.pixel_array.copy()
        stored[:, 0] = padding  # outside the reconstruction circle
        stored[:, 1] = padded
        ds.PixelData = stored.tobytes()
        ds.add_new(0x00280120, vr, padding)  # PixelPaddingValue
        if range_limit is not None:
            ds.add_new(0x00280121, vr, range_limit)  # PixelPaddingRangeLimit

    hu = load_series(write(tmp_path, datasets)).volume.hu

    assert (hu[:, :, :2] == -1024.0).all()
    assert (hu[:, 3, 3] == [0.0, 10.0]).all()


def test_values_below_air_are_clamped(tmp_path):
    datasets = axial_series([0.0, 5.0])
    for ds in datasets:
        stored = ds.pixel_array.copy()
        stored[0, :] = -2000  # outside the field of view, no PixelPaddingValue
        ds.PixelData = stored.tobytes()

    hu = load_series(write(tmp_path, datasets)).volume.hu

    assert hu.min() == -1024.0 and (hu[:, 0, :] == -1024.0).all()


def truncate_frame(ds: Dataset, index: int = 0) -> None:
    """Cut a compressed frame short, as an interrupted transfer would."""
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
    frames[index] = frames[index][: len(frames[index]) // 2]
    ds.PixelData = encapsulate(frames)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_series_gives_the_same_hounsfield_units(tmp_path, syntax):
    datasets = axial_series([0.0, 5.0, 10.0])
    native = load_series(write(tmp_path, datasets)).volume.hu
    for ds in datasets:
        ds.compress(syntax)
    (tmp_path / "compressed").mkdir()

    np.testing.assert_array_equal(load_series(write(tmp_path / "compressed", datasets)).volume.hu, native)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless])
def test_corrupt_compressed_instance_left_out_with_warning(tmp_path, syntax):
    datasets = axial_series([0.0, 5.0, 10.0, 15.0, 20.0])
    for ds in datasets:
        ds.compress(syntax)
    truncate_frame(datasets[2])

    loaded = load_series(write(tmp_path, datasets))

    assert len(loaded.volume.slices) == 4
    assert datasets[2].SOPInstanceUID not in {s.sop_instance_uid for s in loaded.volume.slices}
    assert loaded.volume.missing_slices == 1
    assert any(w.startswith(f"instance {datasets[2].SOPInstanceUID}: corrupt pixel data") for w in loaded.warnings)
    np.testing.assert_allclose(loaded.volume.hu[:, 3, 3], [0.0, 10.0, 30.0, 40.0])


def test_fewer_than_two_decodable_slices_is_an_error(tmp_path):
    datasets = axial_series([0.0, 5.0])
    for ds in datasets:
        ds.compress(RLELossless)
    truncate_frame(datasets[0])

    with pytest.raises(VolumeError, match="only 1 usable slice.*corrupt pixel data"):
        load_series(write(tmp_path, datasets))


def test_empty_input_is_an_error():
    with pytest.raises(VolumeError, match="no files"):
        load_series([])


def test_non_dicom_and_non_image_files_left_out(tmp_path):
    paths = write(tmp_path, axial_series([0.0, 5.0, 10.0]))
    (tmp_path / "notes.txt").write_text("not DICOM")
    report = ct_dataset((0.0, 0.0, 0.0), slice_hu(0))
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # dose SR
    del report.PixelData
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)

    loaded = load_series(paths + [tmp_path / "notes.txt", tmp_path / "sr.dcm"])

    assert len(loaded.volume.slices) == 3
    assert any(w.startswith("file notes.txt: unreadable") for w in loaded.warnings)
    assert any("X-Ray Radiation Dose SR Storage is not a CT image" in w for w in loaded.warnings)


def test_localizer_other_orientation_other_matrix_and_duplicates_not_mixed_in(tmp_path):
    datasets = axial_series([0.0, 5.0, 10.0, 15.0])
    localizer = ct_dataset((0.0, 0.0, 0.0), slice_hu(0), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    coronal = ct_dataset((0.0, 0.0, 0.0), slice_hu(0), orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
    small = ct_dataset((-30.0, -40.0, 2.5), slice_hu(0), rows=8, columns=8)
    duplicate = ct_dataset((-30.0, -40.0, 5.0), slice_hu(7))

    loaded = load_series(write(tmp_path, datasets + [localizer, coronal, small, duplicate]))

    assert [s.sop_instance_uid for s in loaded.volume.slices] == [ds.SOPInstanceUID for ds in datasets]
    assert_slices_in_physical_order(loaded.volume.hu)
    assert "1 localizer image(s) left out" in loaded.warnings
    assert any("another geometry" in w and "orientation" in w for w in loaded.warnings)
    assert any("another geometry" in w and "matrix (8, 8)" in w for w in loaded.warnings)
    assert any(f"duplicate position(s) left out: instance {duplicate.SOPInstanceUID}" in w for w in loaded.warnings)


def test_enhanced_ct_loads_into_the_same_volume_as_single_frames(tmp_path):
    singles = axial_series([10.0, 0.0, 5.0, 15.0], signed=False, intercept=-1024.0)
    single_dir, enhanced_dir = tmp_path / "single", tmp_path / "enhanced"
    single_dir.mkdir(), enhanced_dir.mkdir()
    multi = enhanced_ct(singles)

    single = load_series(write(single_dir, singles)).volume
    loaded = load_series(write(enhanced_dir, [multi]))

    enhanced = loaded.volume
    np.testing.assert_array_equal(enhanced.hu, single.hu)
    np.testing.assert_allclose(enhanced.positions, single.positions)
    assert enhanced.spacing_mm == pytest.approx(single.spacing_mm)
    assert enhanced.orientation == single.orientation
    assert [s.frame_number for s in enhanced.slices] == [2, 3, 1, 4]  # frames were stored z = 10, 0, 5, 15
    assert {s.sop_instance_uid for s in enhanced.slices} == {multi.SOPInstanceUID}
    assert all(source is loaded.sources[0] for source in loaded.sources)
    assert loaded.warnings == []


def test_corrupt_frame_of_enhanced_ct_leaves_only_that_frame_out(tmp_path):
    multi = enhanced_ct(axial_series([0.0, 5.0, 10.0, 15.0, 20.0]))
    multi.compress(RLELossless)
    truncate_frame(multi, index=1)

    loaded = load_series(write(tmp_path, [multi]))

    assert [s.frame_number for s in loaded.volume.slices] == [1, 3, 4, 5]
    assert loaded.volume.missing_slices == 1
    assert any(w.startswith(f"instance {multi.SOPInstanceUID} frame 2: corrupt pixel data") for w in loaded.warnings)


@pytest.mark.parametrize("seed, syntax", [(0, JPEG2000Lossless), (1, RLELossless)])  # seed 0 has a tilted gantry
def test_phantom_study_loads_to_its_ground_truth(tmp_path, seed, syntax):
    from training.phantom import make_study

    study = make_study(seed, matrix=64, transfer_syntax=syntax)
    params = study.truth["params"]

    volume = load_series(write(tmp_path, study.datasets[::-1])).volume

    np.testing.assert_array_equal(volume.hu, study.hu)
    assert [s.sop_instance_uid for s in volume.slices] == study.truth["sop_instance_uids"]
    assert volume.spacing_mm == pytest.approx(tuple(params["spacing_mm"]), abs=1e-4)
    assert volume.gantry_tilt_deg == pytest.approx(params["acquisition"]["tilt_deg"], abs=0.05)
