"""The persistent outbox against a real DCMTK storescp: down, back up, and across a restart."""
from __future__ import annotations

import time

from ichnode.common.config import load_settings
from node.delivery import Deliverer
from node.store import Store
from tests.helpers import StoreSCP, free_port, result_files


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
