"""End to end with real processes and peers: storescu -> ichnode -> worker -> storescp."""
from __future__ import annotations

import os
import signal
import subprocess

from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from tests.helpers import (
    ANALYSIS_BUDGET,
    KOS_CLASS,
    SC_CLASSES,
    SEG_CLASS,
    SR_CLASSES,
    dcmtk,
    done,
    series_uid_of,
    study_uid_of,
    wait_for,
)


def received_classes(pacs, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ds in pacs.received_headers():
        if ds.StudyInstanceUID == study_uid:
            counts[str(ds.SOPClassUID)] = counts.get(str(ds.SOPClassUID), 0) + 1
    return counts


def has_results(pacs, study_uid: str):
    classes = received_classes(pacs, study_uid)
    return classes if (set(classes) & SR_CLASSES and set(classes) & SC_CLASSES) else None


def test_serve_embedded_broker_end_to_end(node_factory, storescp, positive_series, tmp_path):
    node = node_factory("serve", ICHNODE_DESTINATIONS=storescp.destination, ICHNODE_WORKERS="1").start()
    echo = subprocess.run([dcmtk("echoscu"), "-aec", "ICHNODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    sent = node.storescu(positive_series)
    assert sent.returncode == 0, sent.stderr
    series_uid, study_uid = series_uid_of(positive_series), study_uid_of(positive_series)

    series = wait_for(lambda: done(node, series_uid), ANALYSIS_BUDGET, what="analysis")
    findings = series["findings"]
    assert set(findings["probabilities"]) == {"any", "EDH", "IPH", "IVH", "SAH", "SDH"}
    assert len(findings["slice_scores"]) == 40 and findings["key_slices"]
    assert findings["priority"]["level"] in ("STAT", "URGENT", "ROUTINE")
    peaks = findings["peak_memory_mb"]  # the worker's peak resident memory per stage (worker/memory.py)
    assert set(peaks) == {"load", "detector", "result_objects"} and all(mb > 50 for mb in peaks.values()), peaks
    classes = wait_for(lambda: has_results(storescp, study_uid), 60, what="SR and SC at the destination")
    assert SEG_CLASS in classes and KOS_CLASS in classes
    study = node.get(f"/api/studies/{study_uid}")
    assert study["series"][0]["timings"]["analysed"]

    # the latency of the analysis per stage, once every result is acknowledged, in the API and /metrics
    wait_for(lambda: all(d["state"] == "sent" for d in node.series(series_uid)["deliveries"]), 60, what="delivery")
    timings = node.series(series_uid)["timings"]
    stages = timings["stages"]
    assert all(stages[name] is not None and stages[name] >= 0 for name in (
        "completion_wait", "queue", "load", "detector", "result_objects", "delivery", "total")), stages
    assert stages["total"] >= stages["completion_wait"] + stages["detector"] + stages["delivery"]
    assert timings["completed_by"] in ("count_hint", "association_release", "quiet")
    metrics = node.get_text("/metrics")
    for stage in ("completion_wait", "queue", "load", "detector", "result_objects", "delivery", "total"):
        assert f'ichnode_series_stage_seconds_count{{stage="{stage}"}} 1.0' in metrics, stage
    assert f'ichnode_series_completed_total{{by="{timings["completed_by"]}"}} 1.0' in metrics

    # the same instances again are duplicates: no new analysis
    assert node.storescu(positive_series).returncode == 0
    assert node.series(series_uid)["instances"] == 40

    # a late instance: analysed again, results keep their UIDs (PACS replaces them)
    late = tmp_path / "late"
    late.mkdir()
    source = dcmread(sorted(positive_series.iterdir())[-1])
    source.SOPInstanceUID = generate_uid()
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    source.InstanceNumber = 41
    source.ImagePositionPatient = [float(v) for v in source.ImagePositionPatient[:2]] + [
        float(source.ImagePositionPatient[2]) + float(source.get("SpacingBetweenSlices") or source.SliceThickness)]
    source.save_as(late / "late.dcm", enforce_file_format=True)
    assert node.storescu(late).returncode == 0
    again = wait_for(lambda: done(node, series_uid, generation=2), ANALYSIS_BUDGET, what="re-analysis")
    assert again["instances"] == 41
    assert again["findings"]["result_uids"] == findings["result_uids"]
    wait_for(lambda: all(d["state"] == "sent" for d in node.series(series_uid)["deliveries"]), 60,
             what="generation 2 delivered")


def test_redis_node_and_separate_worker(node_factory, storescp, negative_series, redis_url):
    node = node_factory("node", ICHNODE_DESTINATIONS=storescp.destination, ICHNODE_BROKER_URL=redis_url).start()
    node.start_worker()
    sent = node.pynetdicom_storescu(negative_series)
    assert sent.returncode == 0 and "Store failed" not in sent.stderr, sent.stderr
    series_uid, study_uid = series_uid_of(negative_series), study_uid_of(negative_series)
    assert node.series(series_uid)["instances"] == 40
    wait_for(lambda: done(node, series_uid), ANALYSIS_BUDGET, what="analysis over Redis")
    wait_for(lambda: has_results(storescp, study_uid), 60, what="SR and SC at the destination")


def test_worker_killed_mid_task_gets_the_series_analysed(node_factory, storescp, negative_series, redis_url):
    node = node_factory("node", ICHNODE_DESTINATIONS=storescp.destination, ICHNODE_BROKER_URL=redis_url,
                        ICHNODE_TASK_TIMEOUT_SECONDS="20").start()
    worker = node.start_worker()
    assert node.storescu(negative_series).returncode == 0
    series_uid = series_uid_of(negative_series)
    wait_for(lambda: node.series(series_uid)["state"] == "analysing", ANALYSIS_BUDGET, interval=0.05,
             what="the task to start")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(10)
    node.start_worker()
    series = wait_for(lambda: done(node, series_uid), ANALYSIS_BUDGET, what="analysis after the worker died")
    assert series["generation"] >= 1


def copy_series(source, folder, count: int, series_uid: str, change=None):
    """The first count instances of source as a new series (new UIDs), each changed by change(ds, i)."""
    folder.mkdir()
    for i, path in enumerate(sorted(source.iterdir())[:count]):
        ds = dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if change:
            change(ds, i)
        ds.save_as(folder / path.name, enforce_file_format=True)
    return folder


def test_bad_series_are_skipped_or_analysed_with_reasons(node_factory, tmp_path, positive_series):
    node = node_factory("serve", ICHNODE_WORKERS="1").start()

    def chest(ds, i):
        ds.BodyPartExamined, ds.SeriesDescription, ds.ProtocolName, ds.StudyDescription = "CHEST", "Thorax", "", ""
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.543.100"

    def corrupt_sixth(ds, i):
        if i == 5:
            ds.compress(RLELossless)
            ds.PixelData = encapsulate([b"\x01\x00\x00\x00\x40\x00\x00\x00" + bytes(56) + b"\xff\x12"])

    short = copy_series(positive_series, tmp_path / "short", 3, "1.2.826.0.1.3680043.10.543.3")
    thorax = copy_series(positive_series, tmp_path / "chest", 40, "1.2.826.0.1.3680043.10.543.4", chest)
    corrupt = copy_series(positive_series, tmp_path / "corrupt", 40, "1.2.826.0.1.3680043.10.543.5", corrupt_sixth)
    for folder in (short, thorax):
        assert node.storescu(folder).returncode == 0
    assert node.storescu(corrupt, "-xr").returncode == 0

    def state(uid, wanted):
        series = node.series(uid)
        return series if series["state"] == wanted else None

    skipped = wait_for(lambda: state("1.2.826.0.1.3680043.10.543.3", "skipped"), 30, what="skip of 3 slices")
    assert "slice" in skipped["reason"]
    assert skipped["findings"] == {"skipped": skipped["reason"]}
    not_head = wait_for(lambda: state("1.2.826.0.1.3680043.10.543.4", "skipped"), 30, what="skip of a chest")
    assert "CHEST" in not_head["reason"]
    analysed = wait_for(lambda: state("1.2.826.0.1.3680043.10.543.5", "done"), ANALYSIS_BUDGET,
                        what="analysis without the corrupt instance")
    assert any("corrupt pixel data" in w for w in analysed["findings"]["warnings"])
    assert analysed["instances"] == 40 and len(analysed["findings"]["slice_scores"]) == 39


def test_sigterm_to_serve_stops_its_workers(node_factory):
    node = node_factory("serve", ICHNODE_WORKERS="1").start()
    serve = node.procs[0]
    children = wait_for(lambda: subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True,
                                               text=True).stdout.split(), 30, what="the worker process")
    serve.send_signal(signal.SIGTERM)  # to serve alone, as a process manager that signals the main PID
    serve.wait(60)
    for pid in children:
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower(),
                 30, what=f"worker {pid} to stop")
    assert "shutting down" in node.logs()


def test_serve_worker_killed_mid_task_with_the_embedded_broker(node_factory, negative_series):
    node = node_factory("serve", ICHNODE_WORKERS="1").start()
    serve = node.procs[0]
    assert node.storescu(negative_series).returncode == 0
    series_uid = series_uid_of(negative_series)
    wait_for(lambda: node.series(series_uid)["state"] == "analysing", ANALYSIS_BUDGET, interval=0.05,
             what="the task to start")
    (worker,) = subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(worker), signal.SIGKILL)
    series = wait_for(lambda: done(node, series_uid), ANALYSIS_BUDGET, what="analysis after the worker died")
    assert series["generation"] == 2
    assert "re-queued" in node.logs()
