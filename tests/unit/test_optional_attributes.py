"""Nothing optional is required (issue 10, item 2): a phantom series without any one attribute that
the CT Image IOD does not make Type 1 (and without all of them at once) is chosen by selection,
analysed by the worker's pipeline, and gives result objects that dciodvfy finds no error in, an HL7
ORU and a webhook payload. The detector's output is computed once from the phantom's ground truth;
everything after it (loader, image checks, result objects, HL7, webhook) runs per variant."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import hl7
import pytest
from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map
from pydicom import dcmread

from ichnode.common.config import PriorityRule
from ichnode.common.result_folder import ResultFolder
from node.headers import instance_header
from node.hl7 import build_oru
from node.selection import eligibility
from node.store import Store
from node.webhooks import build_webhook_payload
from tests.helpers import GroundTruthDetector, dciodvfy_errors, detector_output
from training.phantom import make_study
from worker.pipeline import analyze_series
from worker.results.sources import PATIENT_AND_STUDY
from worker.volume import load_series

SEED, MATRIX, SLICES = 11, 128, 24
#: Needed for an image to be one at all; the intake refuses an instance without it.
ESSENTIAL = {"PixelData"}


def not_type_1(keywords: set[str]) -> list[str]:
    """Of `keywords`, those no module of the CT Image IOD (PS3.3 A.38.1) makes Type 1: Types 1C, 2,
    2C and 3 of the Patient, General Study, Patient Study, General Series, Frame of Reference,
    General Equipment, General Acquisition, General Image, Image Plane, Image Pixel, CT Image,
    VOI LUT, SOP Common ... modules, from the standard's tables as highdicom ships them."""
    tables = get_module_attribute_map()
    attributes = [a for m in get_iod_module_map()["ct-image"] for a in tables[m["key"]] if not a["path"]]
    type_1 = {a["keyword"] for a in attributes if a["type"] == "1"}
    return sorted({a["keyword"] for a in attributes} & keywords - type_1 - ESSENTIAL)


PHANTOM_KEYWORDS = set(make_study(SEED, matrix=16, n_slices=2).datasets[0].dir())
REMOVABLE = not_type_1(PHANTOM_KEYWORDS)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    study = make_study(SEED, subtypes=["IPH", "SDH"], matrix=MATRIX, n_slices=SLICES)
    folder = tmp_path_factory.mktemp("phantom")
    paths = []
    for index, ds in enumerate(study.datasets):
        paths.append(folder / f"{index}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    volume = load_series(paths).volume
    masks = {s: m for s, m in study.masks.items() if m.any()}
    output = detector_output(volume, masks, {"any": 0.95, "IPH": 0.9, "SDH": 0.85})
    return paths, GroundTruthDetector(output)


def test_the_list_covers_the_type_2_patient_study_series_and_image_attributes():
    assert {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
            "AccessionNumber", "ReferringPhysicianName", "SeriesNumber", "Manufacturer", "InstanceNumber",
            "SliceThickness", "KVP", "AcquisitionNumber", "PositionReferenceIndicator"} <= set(REMOVABLE)
    assert {"BodyPartExamined", "StudyDescription", "SeriesDescription", "ConvolutionKernel"} <= set(REMOVABLE)
    assert not {"StudyInstanceUID", "SOPInstanceUID", "ImagePositionPatient", "Rows", "PixelData"} & set(REMOVABLE)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools not installed")
@pytest.mark.parametrize("removed", [*([k] for k in REMOVABLE), REMOVABLE], ids=[*REMOVABLE, "all-at-once"])
def test_a_series_without_optional_attributes_is_analysed_and_its_results_are_valid(removed, phantom, tmp_path):
    sources, detector = phantom
    paths = []
    for source in sources:
        ds = dcmread(source)
        for keyword in removed:
            if keyword in ds:
                del ds[keyword]
        paths.append(tmp_path / source.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    headers = [instance_header(dcmread(p, stop_before_pixels=True)) for p in paths]
    assert eligibility(headers, min_slices=16, min_coverage_mm=80).reason is None

    analysis = analyze_series(paths, detector, PriorityRule(), ResultFolder(tmp_path / "results"))
    findings = analysis.findings
    assert findings.priority.level == "STAT" and len(analysis.result_files) >= 4
    for path in analysis.result_files:
        errors = dciodvfy_errors(path)
        assert not errors, f"{path.name} without {removed}: " + "\n".join(errors)
        result = dcmread(path)
        for keyword in set(removed) & set(PATIENT_AND_STUDY):
            assert result.get(keyword) in (None, ""), keyword  # absent at the source: empty (Type 2) or absent

    store = Store(tmp_path / "node.sqlite3")
    for header in headers:
        store.record_instance(header, "spool/x.dcm", "SCANNER")
    study = store.study(headers[0].study_instance_uid)
    message = hl7.parse(build_oru(findings, study, "ICHNODE"))
    assert str(message.segment("PID")(3)) == (study.patient_id or "")
    assert str(message.segment("OBR")(2)) == (study.accession_number or "")
    payload = json.loads(json.dumps(build_webhook_payload(findings, study, include_patient=True)))
    assert payload["patient"]["id"] == study.patient_id and payload["priority"]["level"] == "STAT"
    store.close()


def test_without_any_header_that_names_the_region_the_images_decide(phantom, tmp_path, caplog):
    """Anonymised: no BodyPartExamined and no descriptions. The worker's log says why it is a head."""
    sources, detector = phantom
    paths = []
    for source in sources:
        ds = dcmread(source)
        for keyword in ("BodyPartExamined", "SeriesDescription", "StudyDescription", "ProtocolName"):
            ds.pop(keyword, None)
        paths.append(tmp_path / source.name)
        ds.save_as(paths[-1], enforce_file_format=True)
    caplog.set_level("INFO", logger="ichnode.worker")
    analyze_series(paths, detector, PriorityRule(), ResultFolder(tmp_path / "results"))
    assert "headers do not name the head; images show a head: a skull ring around brain" in caplog.text
