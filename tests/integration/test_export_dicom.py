"""`ichnode export-dicom`: a CT-ICH patient (JPG windows) as a valid DICOM CT series the node analyses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.helpers import ROOT, analyze, dciodvfy_errors
from training import datasets
from training.dicom_series import write_scan_series
from worker.detector import load_detector
from worker.volume import load_series

CTICH = datasets.SHARED_DATA / "ct-ich"
needs_ctich = pytest.mark.skipif(not CTICH.is_dir(), reason="CT-ICH data not present")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """CT-ICH patient 49 (epidural and intraparenchymal bleeds), exported by the command line."""
    out = tmp_path_factory.mktemp("export")
    run = subprocess.run(
        [sys.executable, "-m", "ichnode.cli", "export-dicom", "--data", f"ctich:all,patients=49,root={CTICH}", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(out / "ctich-049")]
    return out / "ctich-049"


@needs_ctich
def test_ctich_export_is_valid_and_loads_back_to_the_same_hu_and_geometry(exported, tmp_path):
    scan = datasets.ctich_scans(CTICH, patients=[49])[0]
    paths = sorted(exported.glob("*.dcm"))
    assert len(paths) == len(scan.volume.hu)
    if shutil.which("dciodvfy"):
        for path in paths:
            errors = dciodvfy_errors(path)
            assert not errors, f"{path.name}: " + "\n".join(errors)

    loaded = load_series(paths)
    assert loaded.warnings == []
    volume = loaded.volume
    assert np.abs(volume.hu - scan.volume.hu).max() <= 0.5  # same slices, same order, HU rounded
    assert volume.spacing_mm == pytest.approx(scan.volume.spacing_mm)
    assert volume.orientation == pytest.approx(scan.volume.orientation)
    assert np.allclose(volume.positions, scan.volume.positions)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert [ref.sop_instance_uid for ref in volume.slices] == [ds.SOPInstanceUID for ds in headers]
    assert [ds.InstanceNumber for ds in headers] == list(range(1, len(paths) + 1))

    first = headers[0]
    assert list(first.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert first.PatientID == "ctich-049" and "ctich-049" in str(first.PatientName)
    assert first.StudyDescription and first.SeriesDescription
    for text in (first.ImageComments, first.DerivationDescription):
        assert "pseudo-HU" in text and "8-bit" in text
    again = write_scan_series(scan, tmp_path)  # UIDs derive from the scan id
    assert [pydicom.dcmread(p).SOPInstanceUID for p in sorted(again.glob("*.dcm"))] == [ds.SOPInstanceUID for ds in headers]


@needs_ctich
def test_analyze_of_the_exported_patient_gives_the_library_paths_probabilities(exported, tmp_path):
    run = analyze(exported, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert set(findings["probabilities"]) == {"any", "EDH", "IPH", "IVH", "SAH", "SDH"}
    # DICOM export -> node loader -> detector equals dataset adapter -> detector (HU rounded to integers)
    direct = load_detector().detect(datasets.ctich_scans(CTICH, patients=[49])[0].volume)
    assert findings["probabilities"] == pytest.approx(direct.probabilities, abs=0.01)
    first = pydicom.dcmread(next(exported.glob("*.dcm")), stop_before_pixels=True)
    assert findings["series_instance_uid"] == first.SeriesInstanceUID
    assert len(findings["slice_scores"]) == len(list(exported.glob("*.dcm")))


@needs_ctich
def test_ctich_spec_selects_patients():
    assert [s.scan_id for s in datasets.load_scans(f"ctich:all,patients=57+49,root={CTICH}")] == ["ctich-049", "ctich-057"]
    with pytest.raises(ValueError, match="patients="):
        datasets.load_scans(f"ctich:heldout,patients=49,root={CTICH}")
