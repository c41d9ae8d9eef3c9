"""Real-world DICOM (issue 10) sent to `ichnode serve` by DCMTK storescu (results to a storescp PACS)
and by Orthanc forwarding a study: what anonymisers, scanners and PACS actually send."""
from __future__ import annotations

import copy
import math
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEGLosslessSV1, SecondaryCaptureImageStorage, generate_uid

from tests.helpers import (
    ANALYSIS_BUDGET,
    SC_CLASSES,
    SEG_CLASS,
    SR_CLASSES,
    NodeProcess,
    StoreSCP,
    dciodvfy_errors,
    dcmtk,
    done,
    enhanced_ct,
    series_uid_of,
    study_uid_of,
    wait_for,
)
from training.phantom import make_study

# an anonymiser's hex digests, a leading zero, a long root, RSNA's slice ids
HEX_STUDY, LEADING_ZERO_SERIES = "63b4b5296cbcf3c5fcd0e380bf99c7cb", "1.2.826.0.1.3680043.8.498.077"
LONG_ROOT = "1.2.826.0.1.3680043.8.498." + "1234567890." * 4  # + the slice number: over 64 characters

pytestmark = pytest.mark.filterwarnings("ignore:.*for VR UI")  # pydicom's, when the tests write such UIDs


def with_uids(sources: list[Path], folder: Path, study: str, series: str, sop_uid) -> dict[str, str]:
    """Copies of the instances in `sources` under other UIDs (`sop_uid(index)` for each), written as
    0.dcm, 1.dcm ...; returns each new SOP Instance UID's original."""
    folder.mkdir(parents=True)
    originals = {}
    for index, path in enumerate(sources):
        ds = dcmread(path)
        originals[sop_uid(index)] = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid(index)
        ds.save_as(folder / f"{index}.dcm", enforce_file_format=True)
    return originals


def test_uids_outside_the_grammar_are_analysed_and_the_results_reference_them_unchanged(
        node_factory, storescp, positive_series, tmp_path):
    node = node_factory("serve", ICHNODE_DESTINATIONS=storescp.destination, ICHNODE_WORKERS="1").start()
    slices = sorted(positive_series.iterdir())
    sent = with_uids(slices, tmp_path / "hex", HEX_STUDY, LEADING_ZERO_SERIES,
                     lambda i: f"{LONG_ROOT}{i + 1}" if i % 2 else f"{i:x}f3c5fcd0e380bf99c7cb")
    with_uids(slices[:1], tmp_path / "rsna", "ID_e3f1a0b2c4", "ID_9d8c7b6a5f", lambda i: "ID_0fe31b044")  # one slice
    for folder in (tmp_path / "hex", tmp_path / "rsna"):
        run = node.storescu(folder)
        assert run.returncode == 0 and "error" not in run.stderr.lower(), run.stderr

    series = wait_for(lambda: done(node, LEADING_ZERO_SERIES), ANALYSIS_BUDGET, what="analysis of the hex study")
    assert series["instances"] == 40 and set(series["findings"]["key_slices"]) <= set(sent)
    skipped = wait_for(lambda: (lambda s: s if s["state"] == "skipped" else None)(node.series("ID_9d8c7b6a5f")),
                       60, what="the RSNA slice to be skipped")
    assert skipped["instances"] == 1 and skipped["reason"].startswith("1 slice") and "need >= 16" in skipped["reason"]

    def results_at_pacs():
        received = [ds for ds in storescp.received_headers() if ds.StudyInstanceUID == HEX_STUDY]
        classes = {str(ds.SOPClassUID) for ds in received}
        return received if classes & SR_CLASSES and classes & SC_CLASSES and len(received) >= 4 else None

    received = wait_for(results_at_pacs, 60, what="the results at the PACS")
    for ds in received:
        referenced = {str(e.value) for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
        assert referenced - set(series["findings"]["result_uids"].values()) <= set(sent)
    referencing_the_series = {str(ds.SOPClassUID) for ds in received
                              if LEADING_ZERO_SERIES in {str(e.value) for e in ds.iterall() if e.VR == "UI"}}
    assert referencing_the_series & SR_CLASSES  # the SR's evidence names the source series as received
    log = node.logs()
    assert log.count(f"study '{HEX_STUDY}'") == 1 and "outside the DICOM UID grammar" in log
    assert "VR UI" not in log and "Non-conformant" not in log
    assert not any(uid in str(path) for path in (node.data_dir / "spool").rglob("*")
                   for uid in [HEX_STUDY, LEADING_ZERO_SERIES, *sent])


def test_an_orthanc_study_forward_with_a_secondary_capture_succeeds_and_the_ct_is_analysed(
        orthanc, node_factory, positive_series, tmp_path):
    """Orthanc as the sender: `POST /modalities/ichnode/store` of a study that also holds a Secondary Capture."""
    node = node_factory("serve", ICHNODE_WORKERS="1").start()
    capture = dcmread(sorted(positive_series.iterdir())[0])
    capture.SOPClassUID = capture.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    capture.SeriesInstanceUID, capture.SOPInstanceUID = generate_uid(), generate_uid()
    capture.file_meta.MediaStorageSOPInstanceUID = capture.SOPInstanceUID
    capture.Modality, capture.ConversionType = "OT", "WSD"
    capture.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    for path in [tmp_path / "sc.dcm", *sorted(positive_series.iterdir())]:
        uploaded = orthanc.rest("POST", "/instances", content=path.read_bytes())
        assert uploaded.is_success, uploaded.text
    study = uploaded.json()["ParentStudy"]
    assert orthanc.rest("PUT", "/modalities/ichnode", json={"AET": "ICHNODE", "Host": "127.0.0.1",
                                                            "Port": node.port}).is_success
    forwarded = orthanc.rest("POST", "/modalities/ichnode/store", json={"Resources": [study], "Synchronous": True})
    assert forwarded.is_success, forwarded.text  # Orthanc's job succeeds: every instance answered success

    series = wait_for(lambda: done(node, series_uid_of(positive_series)), ANALYSIS_BUDGET, what="analysis")
    assert series["instances"] == 40
    study_view = node.get(f"/api/studies/{study_uid_of(positive_series)}")
    assert study_view["other_objects"] == 1 and len(study_view["series"]) == 1
    assert 'ichnode_other_objects_total{action="discarded",sop_class="Secondary Capture Image Storage"} 1.0' in \
        node.get_text("/metrics")


# --- one node run for the rest of the real-world classes --------------------------------------------------------
#
# Every class is its own study (or series), made by the tests from phantom series with pydicom (and DCMTK's
# dcmcjpeg for JPEG lossless), sent by DCMTK storescu to one `ichnode serve` whose results go to a storescp PACS.
# Most variants hold the same pixel data as the reference series (P, sent shuffled in the mixed study), so the
# detector, which is deterministic, must give them the same probability: a pixel-level mistake (MONOCHROME1
# inverted, padding taken for bone, a second stack mixed in) would change it.

REFERENCE_SEED, GE_SEED, THIN_SEED, CQ500_SEED = 22, 23, 31, 29
SLICES = 16  # 5 mm: 80 mm, the smallest series selection takes by default; keeps the detector's CPU time low
#: Type 2 attributes of the Patient, General Study, General Series, General Equipment, General Image, Image
#: Plane and CT Image modules (PS3.3 C.7.1.1, C.7.2.1, C.7.3.1, C.7.5.1, C.7.6.1, C.7.6.2, C.8.2.1) that
#: anonymisers and some scanners leave out; tests/unit/test_optional_attributes.py takes each one in turn.
TYPE_2_REMOVED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
    "AccessionNumber", "ReferringPhysicianName", "SeriesNumber", "Manufacturer", "InstanceNumber",
    "SliceThickness", "KVP", "AcquisitionNumber", "PositionReferenceIndicator",
)
#: The whole batch: eight series analysed one after another by one worker on a busy 2-core machine.
BATCH_BUDGET = 8 * ANALYSIS_BUDGET


def ds_copies(datasets, study: str | None = None, series: str | None = None, **changes) -> list:
    """Deep copies of `datasets` under new (or the given) study and series UIDs and new SOP Instance UIDs."""
    study, series = study or generate_uid(), series or generate_uid()
    copies = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        copies.append(ds)
    return copies


def save(datasets, folder: Path, names=None) -> Path:
    folder.mkdir(parents=True)
    for index, ds in enumerate(datasets):
        ds.save_as(folder / (names[index] if names else f"{index:03d}.dcm"), enforce_file_format=True)
    return folder


def gantry_tilt_uneven(datasets, tilt_deg: float, gaps_mm: tuple[float, float]) -> list:
    """A GE-style tilted acquisition: positions sheared along the column direction by the tilt, the gaps along
    the normal alternating between `gaps_mm`, ImageOrientationPatient left axial."""
    z = np.concatenate([[0.0], np.cumsum([gaps_mm[k % 2] for k in range(len(datasets) - 1)])])
    first = np.array([float(v) for v in datasets[0].ImagePositionPatient])
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    column = np.array([float(v) for v in datasets[0].ImageOrientationPatient[3:]])
    for ds, along in zip(datasets, z):
        position = first + along * normal + along * math.tan(math.radians(tilt_deg)) * column
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.GantryDetectorTilt = f"{tilt_deg:g}"
    return datasets


def monochrome1_12_bit(datasets, hu: np.ndarray) -> list:
    """MONOCHROME1, 12 bits stored unsigned (HU + 1024), air at the edge of the field of view written as the
    Pixel Padding Value 4095 (which, taken for a pixel, would be 3071 HU)."""
    for ds, plane in zip(datasets, hu):
        stored = (plane + 1024).astype(np.uint16)
        stored[plane <= -1024] = 4095
        ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME1", 0
        ds.BitsStored, ds.HighBit, ds.PixelPaddingValue = 12, 11, 4095
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
        ds.PixelData = stored.tobytes()
    return datasets


def second_stack(datasets) -> list:
    """Every other slice again as a 64 x 64 reconstruction of twice the pixel size, under new SOP Instance UIDs:
    another geometry in the same series, interleaved by Instance Number."""
    extra = ds_copies(datasets[::2], study=datasets[0].StudyInstanceUID, series=datasets[0].SeriesInstanceUID)
    for ds in extra:
        ds.PixelData = np.frombuffer(ds.PixelData, dtype=np.uint16 if ds.PixelRepresentation == 0 else np.int16
                                     ).reshape(ds.Rows, ds.Columns)[::2, ::2].copy().tobytes()
        ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2
        ds.PixelSpacing = [f"{2 * float(v):.6f}" for v in ds.PixelSpacing]
        ds.InstanceNumber = int(ds.InstanceNumber) + 1000
    return extra


def dcmcjpeg_lossless(folder: Path, out: Path) -> Path:
    """Every file of `folder` encoded JPEG Lossless, first-order prediction (SV1) by DCMTK's dcmcjpeg."""
    out.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        subprocess.run([dcmtk("dcmcjpeg"), "+e1", str(path), str(out / path.name)], check=True, timeout=60)
    return out


@dataclass
class Sent:
    """A class of real-world DICOM as sent: the folder, its series, storescu's options and its run."""

    folder: Path
    series: str
    study: str
    options: tuple[str, ...] = ()
    run: subprocess.CompletedProcess | None = None


@pytest.fixture(scope="module")
def real_world(tmp_path_factory):
    """The node (one worker) after every class below was sent by storescu; the PACS that got the results."""
    tmp = tmp_path_factory.mktemp("real-world")
    reference = make_study(REFERENCE_SEED, positive=True, matrix=128, n_slices=SLICES, slice_thickness=5.0)
    datasets, hu = reference.datasets, reference.hu
    cases: dict[str, Sent] = {}

    def case(name: str, copies: list, *options: str, names=None, encode=None, study: str = "") -> None:
        """A series to send: on its own, or in the folder of `study`, sent in one run as a scanner does."""
        folder = save(copies, tmp / study / name, names)
        folder = tmp / study if study else encode(folder) if encode else folder
        cases[name] = Sent(folder, str(copies[0].SeriesInstanceUID), str(copies[0].StudyInstanceUID), options)

    # a study as a scanner sends it: localizer, thick soft-tissue (the reference, shuffled and reversed), bone
    # kernel, thin soft-tissue, two dose screens, and a second exam (cervical spine) of the same visit
    study = generate_uid()
    mixed = ds_copies(datasets, study=study)
    for ds, number in zip(mixed, random.Random(3).sample(range(1, SLICES + 1), SLICES)):
        ds.InstanceNumber = number  # shuffled
    localizer = ds_copies(datasets[:1], study=study, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
                          SeriesDescription="Topogram 0.6 T20f")
    bone = ds_copies(datasets, study=study, ConvolutionKernel="H70h", SeriesDescription="Head 5mm bone")
    thin = ds_copies(make_study(THIN_SEED, matrix=64, n_slices=64, slice_thickness=1.25).datasets, study=study)
    spine = ds_copies(datasets, study=study, BodyPartExamined="CSPINE", SeriesDescription="C-Spine 2mm",
                      AccessionNumber="A-SPINE-2")
    dose = ds_copies(datasets[:2], study=study, SOPClassUID=SecondaryCaptureImageStorage, Modality="OT",
                     SeriesDescription="Dose Report", ConversionType="WSD")
    for ds in dose:
        ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    for name, series in (("localizer", localizer), ("bone", bone), ("thin", thin), ("spine", spine),
                         ("dose", dose)):
        case(name, series, study="mixed-study")
    case("reference", mixed, names=[f"{SLICES - k:03d}.dcm" for k in range(SLICES)], study="mixed-study")  # reversed

    ge = make_study(GE_SEED, positive=True, matrix=128, n_slices=SLICES, slice_thickness=5.0).datasets
    ge = gantry_tilt_uneven(ds_copies(ge), 18.5, (4.0, 7.0))
    for ds in ge:
        del ds.PatientBirthDate
    case("ge-tilt", ge)
    anonymised = ds_copies(datasets)
    for ds in anonymised:
        for keyword in (*TYPE_2_REMOVED, "BodyPartExamined", "SeriesDescription", "StudyDescription"):
            ds.pop(keyword, None)
    case("anonymised", anonymised)
    case("monochrome1", monochrome1_12_bit(ds_copies(datasets), hu))
    interleaved = ds_copies(datasets)
    case("interleaved", sorted(interleaved + second_stack(interleaved), key=lambda ds: float(ds.SliceLocation)))
    case("enhanced", [enhanced_ct(ds_copies(datasets))])
    case("jpeg-lossless", ds_copies(datasets), "-xs",
         encode=lambda folder: dcmcjpeg_lossless(folder, tmp / "jpeg-lossless-encoded"))
    gaps = ds_copies(datasets)
    gaps[9].PixelData = gaps[9].PixelData[:-1000]  # cut short: refused with 0xC000
    # the sixth slice never sent; storescu -nh goes on after a failure, -d prints its Error Comment
    case("truncated", gaps[:5] + gaps[6:], "-nh", "-d")
    cq500 = ds_copies(make_study(CQ500_SEED, matrix=128, n_slices=238, slice_thickness=0.625).datasets,
                      SeriesDescription="4cc sec 150cc D3D on", StudyDescription="", ProtocolName="")
    for ds in cq500:
        del ds.BodyPartExamined
    case("cq500", cq500, "-xs", encode=lambda folder: dcmcjpeg_lossless(folder, tmp / "cq500-encoded"))

    pacs = StoreSCP(tmp / "pacs").start()
    # 8 s quiet: storescu pauses of a few seconds on a busy machine must not cut a series; 12 slices: the
    # truncated case holds 14 of 16
    node = NodeProcess(tmp, "serve", ICHNODE_DESTINATIONS=pacs.destination, ICHNODE_WORKERS="1",
                       ICHNODE_QUIET_SECONDS="8", ICHNODE_MIN_SLICES="12").start()
    try:
        runs: dict[Path, subprocess.CompletedProcess] = {}
        for sent in cases.values():
            if sent.folder not in runs:
                runs[sent.folder] = node.storescu(sent.folder, *sent.options)
            sent.run = runs[sent.folder]
        yield node, pacs, cases
    finally:
        node.stop()
        pacs.stop()


def settled(node: NodeProcess, sent: Sent) -> dict:
    """The series once analysed, skipped or failed (it was analysed in turn with the rest of the batch)."""
    def state():
        try:
            series = node.series(sent.series)
        except Exception:
            return None
        return series if series["state"] in ("done", "skipped", "failed") else None
    return wait_for(state, BATCH_BUDGET, what=f"series {sent.series}")


def analysed(node: NodeProcess, sent: Sent) -> dict:
    series = settled(node, sent)
    assert series["state"] == "done", f"{series['state']}: {series['reason']}"
    return series["findings"]


def same_detection(node: NodeProcess, cases: dict[str, Sent], name: str) -> dict:
    """The findings of `name`, which hold the same pixels as the reference, checked to be the reference's."""
    findings, reference = analysed(node, cases[name]), analysed(node, cases["reference"])
    assert findings["probabilities"] == pytest.approx(reference["probabilities"], abs=1e-4)
    assert findings["slice_scores"] == pytest.approx(reference["slice_scores"], abs=1e-4)
    return findings


def results_at(node: NodeProcess, pacs: StoreSCP, sent: Sent) -> list[Path]:
    """The series' result files at the PACS, once the node has every one acknowledged."""
    def delivered():
        deliveries = node.series(sent.series)["deliveries"]
        return deliveries and all(d["state"] == "sent" for d in deliveries)
    wait_for(delivered, 60, what=f"the results of series {sent.series} at the PACS")
    return [header.filename for header in pacs.received_headers() if header.StudyInstanceUID == sent.study]


def test_a_scanners_study_analyses_its_thick_soft_tissue_series_and_skips_the_others_saying_why(real_world):
    """Localizer, bone kernel, thin and thick soft-tissue series and two dose screens in one study; the thick
    series arrives in reverse file order with shuffled Instance Numbers."""
    node, _, cases = real_world
    reference = cases["reference"]
    assert all(cases[name].run.returncode == 0 for name in ("reference", "localizer", "bone", "thin", "dose"))
    findings = analysed(node, reference)
    assert len(findings["slice_scores"]) == SLICES and findings["probabilities"]["any"] > 0.5  # a positive phantom
    assert settled(node, cases["localizer"])["reason"] == "localizer (ImageType LOCALIZER)"
    for name, kind in (("bone", "sharp kernel H70h, 5.0 mm"), ("thin", "64 slices")):
        reason = settled(node, cases[name])["reason"]
        assert reason.startswith(f"another series was chosen: {reference.series} (soft-tissue kernel"), reason
        assert kind in reason.split("this one: ")[1], reason
    study = node.get(f"/api/studies/{reference.study}")
    assert study["other_objects"] == 2  # the dose screens: answered success, counted, not analysed


def test_a_second_exam_in_the_same_study_is_skipped(real_world):
    node, _, cases = real_world
    assert settled(node, cases["spine"])["reason"] == "not a head series (BodyPartExamined 'CSPINE')"


def test_a_tilted_gantry_with_uneven_spacing_and_no_birth_date_is_analysed(real_world):
    """GE head CT: gantry tilt 18.5 degrees, slices 4 and 7 mm apart in turn, no Patient's Birth Date."""
    node, pacs, cases = real_world
    sent = cases["ge-tilt"]
    assert sent.run.returncode == 0, sent.run.stderr
    warnings = "\n".join(analysed(node, sent)["warnings"])
    assert "gantry tilt 18.5° (GantryDetectorTilt 18.5°)" in warnings
    assert "uneven spacing: gaps 4.00-7.00 mm" in warnings
    for path in results_at(node, pacs, sent):
        assert dciodvfy_errors(path) == [], path


def test_without_type_2_attributes_and_region_the_images_decide_and_the_results_are_valid(real_world):
    """Anonymised: the Type 2 patient, study, series and image attributes gone, and BodyPartExamined,
    SeriesDescription and StudyDescription too. Recognised as a head from its images; valid results."""
    node, pacs, cases = real_world
    sent = cases["anonymised"]
    assert sent.run.returncode == 0, sent.run.stderr
    same_detection(node, cases, "anonymised")
    assert f"series {sent.series}: headers do not name the head; images show a head: a skull ring" in node.logs()
    for path in results_at(node, pacs, sent):
        assert dciodvfy_errors(path) == [], path
        assert dcmread(path).PatientID == ""  # Type 2: present and empty, as at the source


def test_monochrome1_12_bit_unsigned_with_a_padding_value_reads_as_the_same_hounsfield_units(real_world):
    node, _, cases = real_world
    assert cases["monochrome1"].run.returncode == 0
    same_detection(node, cases, "monochrome1")


def test_a_second_stack_interleaved_in_the_series_is_left_out(real_world):
    node, _, cases = real_world
    findings = same_detection(node, cases, "interleaved")
    assert any(w.startswith(f"{SLICES // 2} image(s) with another geometry left out: matrix (64, 64)")
               for w in findings["warnings"]), findings["warnings"]


def test_enhanced_ct_multi_frame_is_analysed_and_the_segmentation_points_at_its_frames(real_world):
    node, pacs, cases = real_world
    sent = cases["enhanced"]
    assert sent.run.returncode == 0, sent.run.stderr
    findings = same_detection(node, cases, "enhanced")
    source = dcmread(next(sent.folder.iterdir()), stop_before_pixels=True).SOPInstanceUID
    assert set(findings["key_slices"]) == {source}
    segmentations = [dcmread(p) for p in results_at(node, pacs, sent) if dcmread(p).SOPClassUID == SEG_CLASS]
    assert len(segmentations) == 1
    frames = {int(e.value) for e in segmentations[0].iterall() if e.keyword == "ReferencedFrameNumber"}
    assert frames and frames <= set(range(1, SLICES + 1))


def test_jpeg_lossless_sent_with_storescu_xs_is_stored_as_received_and_analysed(real_world):
    node, _, cases = real_world
    sent = cases["jpeg-lossless"]
    assert sent.run.returncode == 0, sent.run.stderr
    assert dcmread(next(sent.folder.iterdir())).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    same_detection(node, cases, "jpeg-lossless")
    spooled = [dcmread(p, stop_before_pixels=True) for p in (node.data_dir / "spool").rglob("*.dcm")]
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in spooled if ds.SeriesInstanceUID == sent.series} == {
        JPEGLosslessSV1}


def test_truncated_pixel_data_is_refused_and_the_series_analysed_with_the_gaps_named(real_world):
    """One slice cut short (refused with 0xC000) and one never sent: the rest analysed, two missing slices
    said. (storescu stops at the first failure unless given -nh.)"""
    node, _, cases = real_world
    sent = cases["truncated"]
    answer = sent.run.stdout + sent.run.stderr
    statuses = [line for line in answer.splitlines() if "DIMSE Status" in line]
    assert len(statuses) == SLICES - 1 and sum("0xc000" in line.lower() for line in statuses) == 1, statuses
    assert "[Pixel Data truncated: 31768 of 32768 bytes]" in answer
    series = settled(node, sent)
    assert series["state"] == "done" and series["instances"] == SLICES - 2
    assert any(w.startswith("2 missing slice(s)") for w in series["findings"]["warnings"])


def test_a_cq500_style_thin_series_without_body_part_is_skipped_as_contrast_enhanced(real_world):
    """238 slices of 0.625 mm, JPEG lossless by storescu -xs, no BodyPartExamined, described
    "4cc sec 150cc D3D on": contrast by its description (analysed only with series.analyse_contrast)."""
    node, _, cases = real_world
    sent = cases["cq500"]
    assert sent.run.returncode == 0, sent.run.stderr
    series = settled(node, sent)
    assert series["instances"] == 238
    assert series["reason"] == "contrast-enhanced (SeriesDescription '4cc sec 150cc D3D on')"
