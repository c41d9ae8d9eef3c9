"""The DICOM result objects: valid (dciodvfy, dsrdump), readable back, and saying the right thing."""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ichnode.common.analysis import Findings
from ichnode.common.config import PriorityRule
from ichnode.common.vocabulary import LABELS
from tests.helpers import dciodvfy_errors, detector_output
from worker.detector import DetectorOutput
from worker.findings import findings_from_output
from worker.geometry import SliceRef, Volume
from worker.priority import assign_priority
from worker.results import build_results
from worker.results.sc import BANNER_RGB
from worker.results.sources import in_source_order

SLICES, MATRIX, SPACING = 16, 64, (5.0, 0.5, 0.5)
BLOB = (8, 20, 40, 7)  # slice, row, column, radius (pixels) of the synthetic hemorrhage


def ct_series(hu: np.ndarray, spacing=SPACING) -> tuple[list[Dataset], Volume]:
    """A single-frame CT series holding ``hu`` (slices ascending in z) and its Volume."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for index, plane in enumerate(hu):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Results", "R1", "", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
        ds.ReferringPhysicianName, ds.Manufacturer, ds.BodyPartExamined = "", "Test", "HEAD"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = "CT", 1, index + 1, 1
        ds.ImageType, ds.KVP = ["ORIGINAL", "PRIMARY", "AXIAL"], 120
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-16.0, -16.0, index * spacing[0]]
        ds.PixelSpacing, ds.SliceThickness = list(spacing[1:]), spacing[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = plane.astype(np.int16).tobytes()
        datasets.append(ds)
    volume = Volume(
        hu=hu.astype(np.float32),
        spacing_mm=spacing,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        positions=np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets]),
        slices=[SliceRef(ds.SOPClassUID, ds.SOPInstanceUID) for ds in datasets],
        frame_of_reference_uid=frame_of_reference,
    )
    return datasets, volume


def head_hu() -> np.ndarray:
    rows, columns = np.mgrid[:MATRIX, :MATRIX]
    brain = (rows - MATRIX / 2) ** 2 + (columns - MATRIX / 2) ** 2 < (0.4 * MATRIX) ** 2
    hu = np.where(brain, 35.0, -1000.0)
    return np.repeat(hu[None], SLICES, axis=0)


def findings_for(sources: list[Dataset], volume: Volume, output: DetectorOutput) -> Findings:
    priority = assign_priority(PriorityRule(), output.probabilities, output.volumes_ml, output.difficult)
    return findings_from_output(sources[0].StudyInstanceUID, sources[0].SeriesInstanceUID, volume, output, priority)


def blob_mask() -> np.ndarray:
    z, y, x, radius = BLOB
    zz, yy, xx = np.mgrid[:SLICES, :MATRIX, :MATRIX]
    return (zz - z) ** 2 * 9 + (yy - y) ** 2 + (xx - x) ** 2 < radius**2


@pytest.fixture(scope="module")
def case():
    """A positive study: an SDH blob, plus a small IPH on one slice; results written to disk."""
    sources, volume = ct_series(head_hu())
    iph = np.zeros(volume.hu.shape, bool)
    iph[BLOB[0], 40:44, 20:24] = True
    masks = {"SDH": blob_mask(), "IPH": iph}
    output = detector_output(volume, masks, {"any": 0.93, "SDH": 0.88, "IPH": 0.61})
    findings = findings_for(sources, volume, output)
    results = build_results(sources, volume, output, findings)
    return sources, volume, output, findings, dict(zip(findings.result_uids, results))


@pytest.fixture(scope="module")
def written(case, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("results")
    paths = {}
    for kind, ds in case[4].items():
        paths[kind] = directory / f"{kind.replace(':', '_')}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return paths


def test_every_object_is_made_and_recorded(case):
    _, _, _, findings, results = case
    assert set(results) == {"seg", "sr", "kos", "sc:1", "sc:2", "sc:3"}
    for kind, ds in results.items():
        assert findings.result_uids[kind] == ds.SOPInstanceUID
        assert ds.StudyInstanceUID == findings.study_instance_uid
    assert len({ds.SeriesInstanceUID for ds in results.values()}) == 4  # SEG, SR, KOS, SC series


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("kind", ["seg", "sr", "kos", "sc:1"])
def test_dciodvfy_finds_no_error(written, kind):
    errors = dciodvfy_errors(written[kind])
    assert not errors, "\n".join(errors)


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk not installed")
def test_dsrdump_reads_the_report(written):
    run = subprocess.run(["dsrdump", str(written["sr"])], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Imaging Measurement Report" in run.stdout
    assert '(35486000,SCT,"Subdural intracranial hemorrhage")' in run.stdout


def _groups_by_tracking_id(report: hd.sr.MeasurementReport) -> dict[str, object]:
    groups = report.get_image_measurement_groups() + report.get_volumetric_roi_measurement_groups()
    return {g.tracking_identifier.split()[0]: g for g in groups}


def _referenced_instances(measurement) -> list[str]:
    return [image.referenced_sop_instance_uid for image in measurement.referenced_images]


def test_sr_reports_each_finding(case, written):
    sources, _, _, findings, results = case
    sr = hd.sr.srread(written["sr"])
    groups = _groups_by_tracking_id(sr.content)
    assert set(groups) >= set(LABELS)
    expected_presence = {"any": "Present", "SDH": "Present", "IPH": "Present", "SAH": "Absent"}
    for label, presence in expected_presence.items():
        group = groups[label]
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.meaning == presence
        probability = group.get_measurements(name=hd.sr.CodedConcept("122157", "DCM", "Probability"))[0]
        assert probability.value == pytest.approx(findings.probabilities[label])
        assert probability.unit.value == "{probability}"
    assert groups["SAH"].get_measurements()[0].referenced_images == []
    any_probability = groups["any"].get_measurements()[0]
    assert _referenced_instances(any_probability) == findings.key_slices
    volume = groups["SDH"].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0]
    assert volume.value == pytest.approx(findings.volumes_ml["SDH"])
    assert volume.unit.value == "ml"
    # Segmented subtypes point at their segment in the SEG
    segment = groups["SDH"].referenced_segment
    assert segment[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == results["seg"].SOPInstanceUID
    assert {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence} >= {
        ds.SOPInstanceUID for ds in sources
    }


def test_sr_carries_priority_difficulty_algorithm_and_disclaimer(case, written):
    _, _, output, findings, _ = case
    sr = hd.sr.srread(written["sr"])
    triage = _groups_by_tracking_id(sr.content)["Worklist"]
    items = {item.name.meaning: item for item in triage[0].ContentSequence}
    assert items["Priority (attribute)"].value.value == findings.priority.level == "STAT"
    assert items["Difficult case"].value.meaning == "No"
    assert items["Worklist priority score"].value == pytest.approx(findings.priority.score)
    assert items["Worklist priority rationale"].value == findings.priority.rationale
    assert "NOT FOR DIAGNOSTIC USE" in items["Comment"].value
    assert items["Algorithm Name"].value == output.model_name
    assert items["Algorithm Version"].value == output.model_version
    assert output.model_name in [item.get("ManufacturerModelName") for item in sr.ContributingEquipmentSequence
                                 if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"]


def test_seg_holds_each_mask_on_its_source_slices(case, written):
    sources, _, output, _, _ = case
    seg = hd.seg.segread(written["seg"])
    labels = {d.SegmentNumber: d.SegmentLabel.split()[0] for d in seg.SegmentSequence}
    assert labels == {1: "IPH", 2: "SDH"}  # only non-empty masks, in subtype order
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    non_empty = sum(int(output.masks[s].any(axis=(1, 2)).sum()) for s in labels.values())
    assert seg.NumberOfFrames == non_empty  # empty frames omitted
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in sources], segment_numbers=[1, 2]
    )
    for number, subtype in labels.items():
        np.testing.assert_array_equal(pixels[..., number - 1].astype(bool), output.masks[subtype])


def test_sc_shows_banner_and_heat_where_the_finding_is(case):
    _, _, _, findings, results = case
    sc = results["sc:1"]
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == findings.key_slices[0]
    rgb = sc.pixel_array.astype(int)
    scale = 512 // MATRIX
    banner = rgb[:12]
    assert (np.abs(banner - BANNER_RGB).sum(axis=-1) < 30).mean() > 0.5  # red band
    assert (banner.min(axis=-1) > 200).any()  # white text on it
    top = next(row for row in range(rgb.shape[0]) if np.abs(rgb[row, 0] - BANNER_RGB).sum() > 30)
    _, y, x, _ = BLOB
    hot = rgb[top + y * scale + scale // 2, x * scale + scale // 2]
    assert hot[0] > hot[1] + 60 and hot[0] > hot[2] + 60  # the red end of the colour map
    brain = rgb[top + 40 * scale, 32 * scale]
    assert np.ptp(brain) < 5  # grey where there is no heat


def test_no_seg_when_nothing_is_segmented():
    sources, volume = ct_series(head_hu())
    output = detector_output(volume, {}, {"any": 0.03})
    findings = findings_for(sources, volume, output)
    results = build_results(sources, volume, output, findings)
    assert "seg" not in findings.result_uids
    sr = next(ds for ds in results if ds.SOPInstanceUID == findings.result_uids["sr"])
    report = _reread(sr).content
    assert not report.get_volumetric_roi_measurement_groups()
    presence = {label: g.get_qualitative_evaluations()[0].value.meaning
                for label, g in _groups_by_tracking_id(report).items() if label in LABELS}
    assert set(presence.values()) == {"Absent"}


def _reread(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def test_uids_are_deterministic_per_series_and_model(case):
    sources, volume, output, findings, _ = case
    again = findings_for(sources, volume, output)
    build_results(sources, volume, output, again)
    assert again.result_uids == findings.result_uids
    newer = replace(output, model_version="1.1.0")
    other = findings_for(sources, volume, newer)
    build_results(sources, volume, newer, other)
    assert set(other.result_uids) == set(findings.result_uids)
    assert not set(other.result_uids.values()) & set(findings.result_uids.values())


def test_kos_points_at_the_key_slices(case, written):
    _, _, _, findings, _ = case
    kos = pydicom.dcmread(written["kos"])
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in kos.ContentSequence if item.ValueType == "IMAGE"]
    assert referenced == findings.key_slices


def test_multiframe_masks_follow_frame_numbers():
    source = Dataset()
    source.SOPInstanceUID, source.NumberOfFrames = generate_uid(), 4
    volume = Volume.from_array(
        np.zeros((3, 2, 2)), slices=[SliceRef("", source.SOPInstanceUID, frame) for frame in (4, 2, 1)]
    )
    array = np.arange(3)[:, None, None] * np.ones((3, 2, 2))
    images, framed = in_source_order([source] * 3, volume, array)
    assert images == [source]
    assert framed[:, 0, 0].tolist() == [2, 1, 0, 0]  # frame 3 is not in the volume: empty


def test_phantom_results_cover_ground_truth(tmp_path):
    """Through the real loader, a tilted vendor-style phantom: the SEG holds exactly its masks."""
    phantom = pytest.importorskip("training.phantom")
    from worker.volume import load_series

    study = phantom.make_study(5, subtypes=["SDH", "IVH"], matrix=128, n_slices=24)
    paths = []
    for index, ds in enumerate(study.datasets):
        paths.append(tmp_path / f"ct{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    loaded = load_series(paths)
    masks = {s: m for s, m in study.masks.items() if m.any()}
    assert set(masks) == {"SDH", "IVH"}
    output = detector_output(loaded.volume, masks, {"any": 0.97, "SDH": 0.9, "IVH": 0.8})
    findings = findings_for(loaded.sources, loaded.volume, output)
    results = dict(zip(findings.result_uids, build_results(loaded.sources, loaded.volume, output, findings)))
    for kind, ds in results.items():
        path = tmp_path / f"{kind.replace(':', '_')}.dcm"
        ds.save_as(path, enforce_file_format=True)
        if shutil.which("dciodvfy"):
            assert not dciodvfy_errors(path), kind
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    numbers = {d.SegmentLabel.split()[0]: d.SegmentNumber for d in seg.SegmentSequence}
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in loaded.sources], segment_numbers=sorted(numbers.values())
    )
    for subtype, number in numbers.items():
        np.testing.assert_array_equal(pixels[..., number - 1].astype(bool), study.masks[subtype])


@pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
def test_nonconformant_patient_attributes_do_not_cost_the_results():
    sources, volume = ct_series(head_hu())
    for ds in sources:
        ds.PatientSex, ds.PatientBirthDate = "U", "1970"  # seen in the wild; highdicom rejects both
    output = detector_output(volume, {"SDH": blob_mask()}, {"any": 0.9, "SDH": 0.9})
    findings = findings_for(sources, volume, output)
    results = build_results(sources, volume, output, findings)
    assert len(results) == 6
    assert {(ds.PatientSex or "", ds.PatientBirthDate or "", ds.PatientID) for ds in results} == {("", "", "R1")}
    assert sources[0].PatientSex == "U"  # the caller's datasets are left alone


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.filterwarnings("ignore:.*for VR UI")
def test_results_reference_source_uids_outside_the_grammar_exactly_as_received(tmp_path):
    """Anonymised studies (hex, leading zeros, letters, over 64 characters): the results join the study
    and point at the slices by the UIDs the sender used, unchanged. dciodvfy's only complaints are
    those UIDs; highdicom and pydicom take them (pydicom with a warning, see ichnode.common.uids)."""
    study, series, frame_of_reference = "63b4b5296cbcf3c5fcd0e380bf99c7cb", "1.2.03.4", "ID_0fe31b044"
    sources, volume = ct_series(head_hu())
    for index, ds in enumerate(sources):
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.SOPInstanceUID = ("1.2.826.0.1.3680043.8.498." + "1234567890." * 5 + str(index + 1) if index % 2
                             else f"a3f9c0de.{index:02d}")
    volume = replace(volume, slices=[SliceRef(ds.SOPClassUID, ds.SOPInstanceUID) for ds in sources],
                     frame_of_reference_uid=frame_of_reference)
    output = detector_output(volume, {"SDH": blob_mask()}, {"any": 0.9, "SDH": 0.9})
    findings = findings_for(sources, volume, output)
    results = dict(zip(findings.result_uids, build_results(sources, volume, output, findings)))
    sent = {ds.SOPInstanceUID for ds in sources}
    assert set(findings.key_slices) <= sent
    for kind, ds in results.items():
        path = tmp_path / f"{kind.replace(':', '_')}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert back.StudyInstanceUID == study, kind
        uids = {str(element.value) for element in back.iterall() if element.VR == "UI" and element.value}
        referenced = {str(element.value) for element in back.iterall()
                      if element.keyword == "ReferencedSOPInstanceUID"}
        assert referenced - set(findings.result_uids.values()) <= sent, kind  # only exact source UIDs
        if kind in ("sr", "seg", "kos"):
            assert series in uids and referenced & sent, kind
        source_uids = sent | {study, series, frame_of_reference}
        others = [e for e in dciodvfy_errors(path) if not any(uid in e for uid in source_uids)
                  and "invalid data values for Value Representations" not in e]  # dciodvfy's summary of those
        assert others == [], kind
    assert frame_of_reference in {str(e.value) for e in results["seg"].iterall() if e.VR == "UI"}
