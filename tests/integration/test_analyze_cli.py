"""`ichnode analyze`: the offline pipeline on a folder, writing result objects and findings.json."""
from __future__ import annotations

import json

from pydicom import dcmread

from tests.helpers import analyze


def test_analyze_writes_findings_json_and_result_objects(positive_series, tmp_path):
    run = analyze(positive_series, tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert {"study_instance_uid", "series_instance_uid", "probabilities", "volumes_ml", "slice_scores",
            "key_slices", "priority", "model"} <= set(findings)
    assert set(findings["probabilities"]) == {"any", "EDH", "IPH", "IVH", "SAH", "SDH"}
    assert all(0.0 <= p <= 1.0 for p in findings["probabilities"].values())
    assert len(findings["slice_scores"]) == 40
    assert {"level", "score"} <= set(findings["priority"]) and {"name", "version"} <= set(findings["model"])
    sources = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in positive_series.iterdir()}
    assert set(findings["key_slices"]) <= sources
    modalities = sorted(str(dcmread(p, stop_before_pixels=True).Modality) for p in (tmp_path / "out").glob("*.dcm"))
    assert "SR" in modalities and "SEG" in modalities and "KO" in modalities


def test_analyze_skips_a_folder_without_an_eligible_series(positive_series, tmp_path):
    folder = tmp_path / "chest"
    folder.mkdir()
    for path in sorted(positive_series.iterdir())[:20]:
        ds = dcmread(path)
        ds.BodyPartExamined = "CHEST"
        ds.SeriesDescription = "Thorax"
        ds.ProtocolName = "Thorax"
        ds.StudyDescription = "CT THORAX"
        ds.save_as(folder / path.name, enforce_file_format=True)
    run = analyze(folder, tmp_path / "out")
    assert run.returncode == 1
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert set(findings) == {"skipped"} and "CHEST" in findings["skipped"]
