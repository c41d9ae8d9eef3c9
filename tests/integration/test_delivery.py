"""The persistent outbox against real peers: a DCMTK storescp down, back up and across a restart; one
that does not accept Segmentation Storage; a peer answering failure statuses; per-destination SOP classes."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt

from ichnode.common.config import load_settings
from node.api import create_app
from node.delivery import Deliverer, plan_deliveries
from node.metrics import exposition
from node.store import Store
from tests.helpers import StoreSCP, ct_instance, findings_for, free_port, header, new_uid, result_files


def test_destination_down_then_back_gets_everything_even_across_a_restart(tmp_path):
    port = free_port()
    pacs = StoreSCP(tmp_path / "pacs", port=port)
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"),
                                      "ICHNODE_DESTINATIONS": pacs.destination})
    store = Store(settings.storage.database_path)
    series, paths = result_files(settings.storage)
    for path in paths:
        store.enqueue_delivery(series, 1, "dicom", pacs.destination, path)
        store.enqueue_delivery(series, 1, "dicom", pacs.destination, path)  # planned twice: kept once
    deliverer = Deliverer(store, settings)

    assert deliverer.run_once() == 0  # the PACS is down
    items = store.deliveries(series)
    assert len(items) == 3
    assert all(i.state == "pending" and i.attempts == 1 and "no association" in i.last_error for i in items)
    first_retry = items[0].next_attempt_at
    assert first_retry > time.time()
    assert deliverer.run_once() == 0  # nothing is due before its backoff ends
    assert deliverer.run_once(now=first_retry + 1) == 0  # still down: backoff grows
    assert store.deliveries(series)[0].next_attempt_at - first_retry > 1.5

    store.close()  # the node restarts; the outbox is on disk
    store = Store(settings.storage.database_path)
    deliverer = Deliverer(store, settings)
    pacs.start()
    try:
        assert deliverer.run_once(now=time.time() + 3600) == 3
    finally:
        pacs.stop()
    assert all(i.state == "sent" for i in store.deliveries(series))
    assert len(pacs.received()) == 3
    store.close()


def test_missing_result_file_is_reported_not_dropped(tmp_path, storescp):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data")})
    store = Store(settings.storage.database_path)
    store.enqueue_delivery("1.2", 1, "dicom", storescp.destination, "results/1.2/gone.dcm")
    Deliverer(store, settings).run_once()
    (item,) = store.deliveries("1.2")
    assert item.state == "pending" and "missing" in item.last_error
    store.close()


SR, SEG, SC, KOS = (Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage,
                    KeyObjectSelectionDocumentStorage)


def results_of_classes(storage, classes) -> tuple[str, dict[str, str]]:
    """One small object of each SOP class in a new series' result folder; returns the series UID and
    SOP class -> path relative to data_dir."""
    series = new_uid()
    folder = storage.result_folder(series)
    folder.path.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, sop_class in enumerate(classes):
        ds = ct_instance(series, i, sop_class=sop_class, pixels=False)
        path = folder.object_file(f"O{i}", ds.SOPInstanceUID)
        ds.save_as(path, enforce_file_format=True)
        paths[sop_class] = str(path.relative_to(storage.data_dir))
    return series, paths


def storescp_without_seg(folder: Path) -> StoreSCP:
    """DCMTK storescp whose configuration accepts SR, KOS and SC but not Segmentation Storage."""
    config = folder / "storescp.cfg"
    folder.mkdir(parents=True)
    contexts = "\n".join(f"PresentationContext{n} = {uid}\\Uncompressed" for n, uid in enumerate(
        ["1.2.840.10008.1.1", SR, SC, KOS], start=1))
    config.write_text("[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
                      "TransferSyntax2 = LittleEndianImplicit\n[[PresentationContexts]]\n[NoSegmentation]\n"
                      f"{contexts}\n[[Profiles]]\n[Default]\nPresentationContexts = NoSegmentation\n")
    return StoreSCP(folder / "received", extra=("-xf", str(config), "Default"))


def test_a_pacs_refusing_seg_gets_the_others_once_and_seg_fails_with_its_reason(tmp_path, caplog):
    pacs = storescp_without_seg(tmp_path / "pacs").start()
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data")})
    store = Store(settings.storage.database_path)
    series, paths = results_of_classes(settings.storage, [SR, SEG, SC, KOS])
    for path in paths.values():
        store.enqueue_delivery(series, 1, "dicom", pacs.destination, path)
    deliverer = Deliverer(store, settings)
    try:
        assert deliverer.run_once() == 3
        for later in (60, 3600, 86400):  # later rounds send nothing again
            assert deliverer.run_once(now=time.time() + later) == 0
    finally:
        pacs.stop()
    assert sorted(str(ds.SOPClassUID) for ds in pacs.received_headers()) == sorted([SR, SC, KOS])  # once each

    items = {item.payload: item for item in store.deliveries(series)}
    seg = items[paths[SEG]]
    assert seg.state == "failed" and seg.attempts == 1
    assert "refused SOP class Segmentation Storage" in seg.last_error and "Abstract Syntax Not Supported" in \
        seg.last_error
    assert all(items[paths[c]].state == "sent" for c in (SR, SC, KOS))
    shown = {d["object"]: d for d in TestClient(create_app(store, settings)).get("/api/deliveries").json()}
    assert shown[paths[SEG]]["state"] == "failed" and "Segmentation Storage" in shown[paths[SEG]]["last_error"]
    assert (f'ichnode_deliveries_failed_total{{cause="SOP class refused: Segmentation Storage",'
            f'target="{pacs.destination}"}}') in exposition()
    assert any("failed for good" in r.getMessage() and "Segmentation Storage" in r.getMessage()
               for r in caplog.records)
    store.close()


class StatusPeer:
    """A pynetdicom storage SCP answering each SOP class with a fixed status (0x0000 when not listed)."""

    def __init__(self, statuses: dict[str, int]):
        self.statuses = statuses
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="PEER")
        for sop_class in (SR, SEG, SC, KOS):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.store)])
        self.destination = f"PEER@127.0.0.1:{self.port}"

    def store(self, event):
        sop_class = str(event.request.AffectedSOPClassUID)
        self.received.append(sop_class)
        return self.statuses.get(sop_class, 0x0000)

    def stop(self):
        self.server.shutdown()


def test_failure_statuses_fail_at_once_or_after_max_attempts_and_nothing_stored_is_sent_twice(tmp_path):
    peer = StatusPeer({SEG: 0xA700, SC: 0xA900})  # out of resources (may pass); data set does not match (final)
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_DELIVERY_MAX_ATTEMPTS": "3"})
    store = Store(settings.storage.database_path)
    series, paths = results_of_classes(settings.storage, [SR, SEG, SC, KOS])
    for path in paths.values():
        store.enqueue_delivery(series, 1, "dicom", peer.destination, path)
    deliverer = Deliverer(store, settings)
    try:
        for hour in range(6):
            deliverer.run_once(now=time.time() + 3600 * hour)
    finally:
        peer.stop()
    items = {item.payload: item for item in store.deliveries(series)}
    assert items[paths[SC]].state == "failed" and items[paths[SC]].attempts == 1
    assert "C-STORE status 0xA900" in items[paths[SC]].last_error
    assert items[paths[SEG]].state == "failed" and items[paths[SEG]].attempts == 3
    assert "0xA700" in items[paths[SEG]].last_error
    assert peer.received.count(SR) == 1 and peer.received.count(KOS) == 1  # acknowledged: never again
    assert peer.received.count(SEG) == 3 and peer.received.count(SC) == 1
    store.close()


def test_a_destination_with_sop_classes_is_planned_only_those(tmp_path):
    settings = load_settings(environ={
        "ICHNODE_DATA_DIR": str(tmp_path / "data"),
        "ICHNODE_DESTINATIONS": "ARCHIVE@127.0.0.1:1104,PACS@127.0.0.1:104?sop_classes=Comprehensive3DSRStorage"
                                f"+KeyObjectSelectionDocumentStorage+{SC}"})
    store = Store(settings.storage.database_path)
    series, paths = results_of_classes(settings.storage, [SR, SEG, SC, KOS])
    store.record_instance(header(series, 0, study="1.2.3"), "spool/x.dcm", "SCANNER")
    findings = findings_for("1.2.3", series, 0.9).model_copy(update={"result_files": list(paths.values())})
    plan_deliveries(store, settings, store.series(series), 1, findings)
    planned = {(item.target, item.payload) for item in store.deliveries(series)}
    assert {p for t, p in planned if t == "ARCHIVE@127.0.0.1:1104"} == set(paths.values())
    assert {p for t, p in planned if t == "PACS@127.0.0.1:104"} == {paths[SR], paths[SC], paths[KOS]}
    store.close()
