"""`ichnode benchmark ingest` end to end with the real peers (storescu, storescp, Orthanc): every
receiver measured at both association counts, each holding every instance afterwards."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_ingest_benchmark_reports_every_receiver_at_one_and_four_associations():
    run = subprocess.run([sys.executable, "-m", "ichnode.cli", "benchmark", "ingest", "--instances", "8",
                          "--matrix", "64", "--repeats", "1", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["instances"] == 8 and report["repeats"] == 1
    assert any("private network namespace" in note for note in report["notes"])
    for associations in ("1", "4"):
        rows = report["associations"][associations]
        assert set(rows) == {"ichnode", "storescp", "orthanc", "pynetdicom", "pyn+fsync"}
        for row in rows.values():
            assert row["instances_per_s"] > 0 and row["mb_per_s"] >= 0 and row["cpu_ms_per_instance"] >= 0
        assert "ichnode_ratio" not in rows["ichnode"]
        assert rows["orthanc"]["ichnode_ratio"] == round(
            rows["ichnode"]["instances_per_s"] / rows["orthanc"]["instances_per_s"], 2)
    assert "fsync" in report["durability"]["ichnode"] and "no fsync" in report["durability"]["storescp"]


def test_workers_benchmark_reports_studies_per_hour_with_one_and_two_workers_and_peaks_per_stage():
    run = subprocess.run([sys.executable, "-m", "ichnode.cli", "benchmark", "workers", "--studies", "2", "--slices", "16",
                          "--matrix", "128", "--thin-slices", "132", "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["studies"] == 2 and report["slices_per_study"] == 16
    for workers in ("1", "2"):
        assert report["workers"][workers]["studies_per_hour"] > 0
    assert report["speedup_2_workers"] == round(
        report["workers"]["2"]["studies_per_hour"] / report["workers"]["1"]["studies_per_hour"], 2)
    thin = report["thin_series"]
    assert thin["instances"] == 132 and set(thin["seconds"]) == set(thin["peak_memory_mb"]) == {
        "load", "detector", "result_objects"}
