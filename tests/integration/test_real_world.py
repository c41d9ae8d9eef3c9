"""Real-world DICOM (issue 10) sent to `ichnode serve` by DCMTK storescu (results to a storescp PACS)
and by Orthanc forwarding a study: what anonymisers, scanners and PACS actually send."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from tests.helpers import ANALYSIS_BUDGET, SC_CLASSES, SR_CLASSES, done, series_uid_of, study_uid_of, wait_for

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
