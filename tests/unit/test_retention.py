import time

from pydicom.uid import XRayRadiationDoseSRStorage

from ichnode.common.config import load_settings
from node.retention import purge_expired
from node.spool import Spool
from node.store import Store
from tests.helpers import findings_for, header


def test_files_of_finished_and_delivered_series_go_after_retention(tmp_path):
    storage = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_RETENTION_DAYS": "7"}).storage
    store, spool = Store(storage.database_path), Spool(storage.spool_dir)
    for series in ("1.2.3.4", "1.2.3.5", "1.2.3.6"):
        path, _ = spool.write("1.2.3", series, f"{series}.1", b"dicom")
        store.record_instance(header(series, 0), spool.relative(path), "SCANNER")
        folder = storage.result_folder(series)
        folder.path.mkdir(parents=True)
        folder.findings_file.write_text("{}")
        store.mark_queued(series, f"t-{series}")
        store.mark_result(series, 1, "done", findings_for("1.2.3", series, 0.1), None)
    store.enqueue_delivery("1.2.3.5", 1, "dicom", "PACS@h:104", "results/1.2.3.5/x.dcm")  # not yet delivered
    store.record_instance(header("1.2.3.6", 1), "late", "SCANNER")  # receiving again: in use

    assert purge_expired(store, spool, storage, now=time.time() + 6 * 86400) == 0
    assert purge_expired(store, spool, storage, now=time.time() + 8 * 86400) == 1
    assert not spool.series_dir("1.2.3", "1.2.3.4").exists() and not storage.result_folder("1.2.3.4").path.exists()
    assert spool.series_dir("1.2.3", "1.2.3.5").exists() and storage.result_folder("1.2.3.6").path.exists()
    assert store.series("1.2.3.4").findings == findings_for("1.2.3", "1.2.3.4", 0.1)  # the worklist keeps it
    assert purge_expired(store, spool, storage, now=time.time() + 8 * 86400) == 0  # purged once


def test_zero_keeps_everything(tmp_path):
    storage = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_RETENTION_DAYS": "0"}).storage
    store, spool = Store(storage.database_path), Spool(storage.spool_dir)
    store.record_instance(header("1.2.3.4", 0), "p", "SCANNER")
    store.mark_skipped("1.2.3.4", "why")
    assert purge_expired(store, spool, storage, now=time.time() + 1e9) == 0


def test_kept_objects_of_other_sop_classes_go_after_retention_and_stay_counted(tmp_path):
    storage = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path), "ICHNODE_RETENTION_DAYS": "7"}).storage
    store, spool = Store(storage.database_path), Spool(storage.spool_dir)
    dose_report = header("1.2.3.9", 0, sop_class_uid=XRayRadiationDoseSRStorage, modality="SR")
    path, _ = spool.write("1.2.3", "1.2.3.9", dose_report.sop_instance_uid, b"dicom")
    assert store.record_other_object(dose_report, spool.relative(path), "SCANNER")
    assert store.spooled_paths() == {spool.relative(path)}
    purge_expired(store, spool, storage, now=time.time() + 6 * 86400)
    assert path.exists()
    purge_expired(store, spool, storage, now=time.time() + 8 * 86400)
    assert not path.exists() and store.spooled_paths() == set() and store.other_objects("1.2.3") == 1
