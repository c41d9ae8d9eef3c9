import time

from node.config import load_settings
from node.retention import purge_expired
from node.spool import Spool
from node.store import Store
from tests.test_assembler import header


def test_files_of_finished_and_delivered_series_go_after_retention(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_RETENTION_DAYS": "7"})
    store, spool = Store(settings.database_path), Spool(settings.spool_dir)
    for series in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
        path, _ = spool.write("1.2.3", series, f"{series}.1", b"dicom")
        store.record_instance(header(series, 0), spool.relative(path), "SCANNER")
        (settings.results_dir / series).mkdir(parents=True)
        (settings.results_dir / series / "findings.json").write_text("{}")
        store.mark_queued(series, f"t-{series}")
        store.mark_result(series, 1, "done", {"probabilities": {"any": 0.1}}, None)
    store.enqueue_delivery("1.2.3.5", 1, "dicom", "PACS@h:104", "results/1.2.3.5/x.dcm")  # not yet delivered
    store.record_instance(header("1.2.3.6", 1), "late", "SCANNER")  # receiving again: in use

    assert purge_expired(store, spool, settings, now=time.time() + 6 * 86400) == 0
    assert purge_expired(store, spool, settings, now=time.time() + 8 * 86400) == 1
    assert not spool.series_dir("1.2.3", "1.2.3.4").exists() and not (settings.results_dir / "1.2.3.4").exists()
    assert spool.series_dir("1.2.3", "1.2.3.5").exists() and (settings.results_dir / "1.2.3.6").exists()
    assert store.series("1.2.3.4")["findings"] == {"probabilities": {"any": 0.1}}  # the worklist keeps it
    assert purge_expired(store, spool, settings, now=time.time() + 8 * 86400) == 0  # purged once


def test_zero_keeps_everything(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_RETENTION_DAYS": "0"})
    store, spool = Store(settings.database_path), Spool(settings.spool_dir)
    store.record_instance(header("1.2.3.4", 0), "p", "SCANNER")
    store.mark_skipped("1.2.3.4", "why")
    assert purge_expired(store, spool, settings, now=time.time() + 1e9) == 0
