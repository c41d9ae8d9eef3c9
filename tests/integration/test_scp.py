"""The DICOM listener against real peers: DCMTK echoscu/storescu and pynetdicom."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, LegacyConvertedEnhancedCTImageStorage, RLELossless
from pynetdicom import AE, evt
from pynetdicom.sop_class import (CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage, Verification,
                                  XRayRadiationDoseSRStorage)

from ichnode.common.config import Destination, load_settings
from ichnode.common.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, quiet_library_uid_complaints
from node.delivery import send_dicom
from node.scp import start_listener
from node.spool import Spool
from node.store import Store
from tests.helpers import ct_instance, dcmtk, free_port, new_uid, wait_for


@pytest.fixture
def listener_with(tmp_path):
    """Starts a listener configured by environment variables; returns its [listener] settings, store and spool."""
    running: list[tuple] = []

    def start(**env: str):
        settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_PORT": str(free_port()),
                                          "ICHNODE_BIND": "127.0.0.1", "ICHNODE_ALLOWED_CALLING_AETS": "", **env})
        store = Store(settings.storage.database_path)
        spool = Spool(settings.storage.spool_dir)
        running.append((start_listener(settings.listener, spool, store), store))
        return settings.listener, store, spool

    yield start
    for server, store in running:
        server.shutdown()
        store.close()


@pytest.fixture
def listener(listener_with):
    """A running listener with the default configuration."""
    return listener_with()


def write(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def pynetdicom_store(scp, ds: Dataset, calling: str = "TESTSCU"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_echoscu_is_answered(listener):
    scp, _, _ = listener
    run = subprocess.run([dcmtk("echoscu"), "-aec", scp.ae_title, "127.0.0.1", str(scp.port)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr


def test_storescu_series_is_spooled_and_recorded_once(listener, tmp_path):
    scp, store, spool = listener
    series = new_uid()
    folder = tmp_path / "send"
    for i in range(3):
        write(ct_instance(series, i), folder)
    for _ in range(2):  # the second run sends the same SOP Instance UIDs again
        run = subprocess.run([dcmtk("storescu"), "-aec", scp.ae_title, "+sd", "127.0.0.1", str(scp.port),
                              str(folder)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
    assert len(spool.files()) == 3
    assert store.series(series).instance_count == 3
    assert store.series(series).state == "receiving"
    # the spooled file is the received data set, readable as DICOM with pixel data
    stored = dcmread(spool.files()[0])
    assert stored.SeriesInstanceUID == series and stored.pixel_array.shape == (16, 16)


@pytest.mark.parametrize("max_pdu", [1_048_576, 0])
def test_the_listener_offers_its_configured_maximum_pdu_length(listener_with, max_pdu):
    scp, _, _ = listener_with(ICHNODE_MAX_PDU_BYTES=str(max_pdu))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
    assert assoc.is_established
    try:
        assert assoc.acceptor.maximum_length == max_pdu
    finally:
        assoc.release()


def test_a_released_association_reports_the_ct_instances_it_brought_an_aborted_one_nothing(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_PORT": str(free_port()),
                                      "ICHNODE_BIND": "127.0.0.1"})
    store = Store(settings.storage.database_path)
    released: list[dict[str, int]] = []
    server = start_listener(settings.listener, Spool(settings.storage.spool_dir), store, released.append)
    try:
        series, folder = new_uid(), tmp_path / "send"
        for i in range(3):
            write(ct_instance(series, i), folder)
        write(ct_instance(new_uid(), 0, sop_class=SecondaryCaptureImageStorage), folder)  # not counted
        run = subprocess.run([dcmtk("storescu"), "-aec", "ICHNODE", "+sd", "127.0.0.1", str(settings.listener.port),
                              str(folder)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        wait_for(lambda: released, 10, what="the release")
        assert released == [{series: 3}]
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.listener.port, ae_title="ICHNODE")
        assert assoc.send_c_store(ct_instance(new_uid(), 0)).Status == 0
        assoc.abort()
        wait_for(lambda: store.series_in_state("receiving") and len(store.series_in_state("receiving")) == 2, 10)
        time.sleep(0.5)
        assert released == [{series: 3}]
    finally:
        server.shutdown()
        store.close()


def test_compressed_transfer_syntax_is_accepted(listener, tmp_path):
    scp, store, spool = listener
    ds = ct_instance(new_uid(), 0)
    ds.compress(RLELossless)
    path = write(ds, tmp_path / "rle")
    run = subprocess.run([dcmtk("storescu"), "-xr", "-aec", scp.ae_title, "127.0.0.1", str(scp.port),
                          str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    stored = dcmread(spool.files()[0])
    assert stored.file_meta.TransferSyntaxUID == RLELossless
    assert int(stored.pixel_array[0, 0]) == 40


def test_every_object_of_a_forwarded_study_is_answered_success_and_only_ct_is_spooled(listener, tmp_path, caplog):
    """A Philips study as forwarded: CT slices, a dose report and secondary captures of the dose screen."""
    scp, store, spool = listener
    ct_series, sc_series, sr_series = new_uid(), new_uid(), new_uid()
    folder = tmp_path / "study"
    for i in range(3):
        write(ct_instance(ct_series, i), folder)
        write(ct_instance(sc_series, i, sop_class=SecondaryCaptureImageStorage), folder)
    write(ct_instance(sr_series, 0, sop_class=XRayRadiationDoseSRStorage, pixels=False), folder)
    with caplog.at_level("INFO"):
        run = subprocess.run([dcmtk("storescu"), "-aec", scp.ae_title, "+sd", "127.0.0.1", str(scp.port),
                              str(folder)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "error" not in run.stderr.lower(), run.stderr
    study = ct_instance(ct_series, 0).StudyInstanceUID
    assert store.series(ct_series).instance_count == 3 and store.other_objects(study) == 4
    assert store.series(sc_series) is None and store.series(sr_series) is None  # never analysed
    assert len(spool.files()) == 3  # discarded by default: only counted
    logged = [r.getMessage() for r in caplog.records if "not CT images" in r.getMessage()]
    assert len(logged) == 2 and any("Secondary Capture Image Storage" in m for m in logged)  # once per series


def test_other_sop_class_is_refused_at_negotiation_when_not_accepting_all_storage(listener_with, tmp_path):
    scp, store, spool = listener_with(ICHNODE_ACCEPT_ALL_STORAGE="false")
    path = write(ct_instance(new_uid(), 0, sop_class=MRImageStorage), tmp_path / "mr")
    run = subprocess.run([dcmtk("storescu"), "-aec", scp.ae_title, "127.0.0.1", str(scp.port), str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "presentation context" in (run.stderr + run.stdout).lower()
    assert spool.files() == []


def test_legacy_converted_enhanced_ct_is_accepted(listener):
    scp, store, spool = listener
    series = new_uid()
    status = pynetdicom_store(scp, ct_instance(series, 0, sop_class=LegacyConvertedEnhancedCTImageStorage))
    assert status.Status == 0x0000
    assert store.series(series).instance_count == 1 and len(spool.files()) == 1


def test_dataset_without_pixel_data_gets_failure_status(listener):
    scp, store, spool = listener
    status = pynetdicom_store(scp, ct_instance(new_uid(), 0, pixels=False))
    assert status.Status == 0xA900
    assert "Pixel Data" in status.ErrorComment
    assert spool.files() == []


def test_dataset_without_series_uid_gets_failure_status(listener):
    scp, store, spool = listener
    ds = ct_instance(new_uid(), 0)
    del ds.SeriesInstanceUID
    status = pynetdicom_store(scp, ds)
    assert status.Status == 0xA900
    assert "SeriesInstanceUID" in status.ErrorComment
    assert spool.files() == []


def test_uids_outside_the_grammar_are_stored_as_received_with_one_warning_per_study(listener, tmp_path, caplog):
    """What anonymisers and RSNA send: hex, leading zeros, over 64 characters, letters, ID_..."""
    scp, store, spool = listener
    quiet_library_uid_complaints()  # as the command line does: pydicom would complain per instance
    study, series = uuid.uuid4().hex, "1.2.826.0.1.03.77"  # a new study: the warning is once per study and process
    sop_uids = ["1.2.826.0.1.3680043.8.498." + "1234567890." * 5 + "1", "1.2.3.abc", "ID_0fe31b044",
                "a3f9c0de41b2"]
    folder = tmp_path / "send"
    for i, sop_uid in enumerate(sop_uids):
        ds = ct_instance(series, i, study_uid=study)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        folder.mkdir(exist_ok=True)
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    with caplog.at_level("INFO"):
        run = subprocess.run([dcmtk("storescu"), "-aec", scp.ae_title, "+sd", "127.0.0.1", str(scp.port),
                              str(folder)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "error" not in run.stderr.lower(), run.stderr
    assert store.study(study).study_uid == study
    assert sorted(i.sop_uid for i in store.instances(series)) == sorted(sop_uids)
    assert all(i.header.study_instance_uid == study and i.header.series_instance_uid == series
               for i in store.instances(series))
    assert len(spool.files()) == 4 and not any(uid in str(path) for path in spool.files() for uid in
                                               [study, series, *sop_uids])
    about_uids = [r for r in caplog.records if r.levelname == "WARNING" and study in r.getMessage()]
    assert len(about_uids) == 1 and "outside the DICOM UID grammar" in about_uids[0].getMessage()
    assert not [r for r in caplog.records if "VR UI" in r.getMessage() or "Non-conformant" in r.getMessage()]


def test_an_empty_required_uid_is_refused(listener):
    scp, store, spool = listener
    status = pynetdicom_store(scp, ct_instance(new_uid(), 0, study_uid=""))
    assert status.Status == 0xA900 and "StudyInstanceUID" in status.ErrorComment
    assert spool.files() == []


def test_calling_ae_allow_list(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "d"), "ICHNODE_PORT": str(free_port()),
                                      "ICHNODE_BIND": "127.0.0.1", "ICHNODE_ALLOWED_CALLING_AETS": "SCANNER1"})
    store = Store(settings.storage.database_path)
    server = start_listener(settings.listener, Spool(settings.storage.spool_dir), store)
    try:
        refused = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "ICHNODE", "127.0.0.1",
                                  str(settings.listener.port)], capture_output=True, text=True, timeout=30)
        allowed = subprocess.run([dcmtk("echoscu"), "-aet", "SCANNER1", "-aec", "ICHNODE", "127.0.0.1",
                                  str(settings.listener.port)], capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        store.close()
    assert refused.returncode != 0 and "reject" in (refused.stderr + refused.stdout).lower()
    assert allowed.returncode == 0


def test_garbage_and_truncated_streams_do_not_take_the_listener_down(listener, tmp_path):
    scp, store, spool = listener
    with socket.create_connection(("127.0.0.1", scp.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
    # a real association that stops in the middle of a data set
    big = ct_instance(new_uid(), 0)
    path = write(big, tmp_path / "trunc")
    data = path.read_bytes()
    with socket.create_connection(("127.0.0.1", scp.port)) as sock:
        sock.sendall(b"\x01\x00" + data[:200])
    run = subprocess.run([dcmtk("echoscu"), "-aec", scp.ae_title, "127.0.0.1", str(scp.port)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0
    assert spool.files() == []


@pytest.mark.parametrize("check", [True, False])
def test_wrong_called_ae_title_is_rejected_unless_the_check_is_off(tmp_path, check):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path / "d"), "ICHNODE_PORT": str(free_port()),
                                      "ICHNODE_BIND": "127.0.0.1", "ICHNODE_CHECK_CALLED_AET": str(check).lower()})
    store = Store(settings.storage.database_path)
    server = start_listener(settings.listener, Spool(settings.storage.spool_dir), store)
    try:
        wrong = subprocess.run([dcmtk("echoscu"), "-aec", "OTHERPACS", "127.0.0.1", str(settings.listener.port)],
                               capture_output=True, text=True, timeout=30)
        right = subprocess.run([dcmtk("echoscu"), "-aec", "ICHNODE", "127.0.0.1", str(settings.listener.port)],
                               capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        store.close()
    assert right.returncode == 0
    if check:
        assert wrong.returncode != 0 and "called ae title not recognized" in (wrong.stderr + wrong.stdout).lower()
    else:
        assert wrong.returncode == 0


def storescu(scp, *paths: Path, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), *options, "-aec", scp.ae_title, "127.0.0.1", str(scp.port),
                           *map(str, paths)], capture_output=True, text=True, timeout=60)


def short_pixel_data(ds: Dataset) -> Dataset:
    """The same instance with its Pixel Data cut to 400 of 512 bytes: a well-formed element that
    holds less than Rows x Columns x Bits Allocated (DCMTK sends it as it is)."""
    ds.PixelData = ds.PixelData[:400]
    return ds


def test_truncated_pixel_data_gets_a_failure_status_naming_the_problem(listener, tmp_path):
    scp, store, spool = listener
    ds = ct_instance(new_uid(), 0)
    run = storescu(scp, write(short_pixel_data(ds), tmp_path / "cut"), options=("-d",))
    answer = run.stdout + run.stderr
    assert run.returncode != 0 and "[Pixel Data truncated: 400 of 512 bytes]" in answer, answer
    assert "0xc000" in answer.lower() or "Cannot understand" in answer
    assert spool.files() == [] and store.series(ds.SeriesInstanceUID) is None
    status = pynetdicom_store(scp, short_pixel_data(ct_instance(new_uid(), 0)))
    assert status.Status == 0xC000 and status.ErrorComment == "Pixel Data truncated: 400 of 512 bytes"


def test_a_corrupt_copy_is_refused_not_taken_for_a_duplicate_of_the_stored_one(listener, tmp_path):
    scp, store, spool = listener
    series = new_uid()
    good = write(ct_instance(series, 0), tmp_path / "good")
    corrupt = write(short_pixel_data(ct_instance(series, 0)), tmp_path / "corrupt")  # the same SOP Instance UID
    assert storescu(scp, good).returncode == 0
    assert storescu(scp, corrupt).returncode != 0  # a failure, where a duplicate would get success
    assert len(spool.files()) == 1 and dcmread(spool.files()[0]).pixel_array.shape == (16, 16)  # the good copy
    # and the other way round: a corrupt first copy leaves room for the good one
    other = new_uid()
    assert storescu(scp, write(short_pixel_data(ct_instance(other, 0)), tmp_path / "c2")).returncode != 0
    assert storescu(scp, write(ct_instance(other, 0), tmp_path / "g2")).returncode == 0
    assert store.series(other).instance_count == 1


def test_a_file_cut_in_its_pixel_data_gets_a_failure_status(listener, tmp_path):
    """DCMTK refuses to read such a file; pynetdicom sends what it holds."""
    scp, store, spool = listener
    path = write(ct_instance(new_uid(), 0), tmp_path / "whole")
    path.write_bytes(path.read_bytes()[:-100])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
    try:
        status = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert status.Status == 0xC000 and status.ErrorComment == "Pixel Data truncated: 412 of 512 bytes"
    assert spool.files() == []


def test_encapsulated_pixel_data_with_fewer_frames_than_declared_gets_a_failure_status(listener, tmp_path):
    scp, store, spool = listener
    ds = ct_instance(new_uid(), 0)
    ds.compress(RLELossless)
    ds.NumberOfFrames = 2  # one frame of fragments follows
    run = storescu(scp, write(ds, tmp_path / "rle"), options=("-xr", "-d"))
    answer = run.stdout + run.stderr
    assert run.returncode != 0 and "Pixel Data holds 1 frames, NumberOfFrames 2" in answer, answer
    assert spool.files() == []


def test_every_acknowledged_instance_survives_the_node_killed_while_receiving(node_factory, tmp_path):
    """SIGKILL in the middle of four concurrent associations: after a restart the store and the spool
    hold every instance the senders were answered success for (group commit answers only after the
    group's fsyncs and commit), whole."""
    node = node_factory("serve", ICHNODE_WORKERS="0").start()
    acknowledged: list[str] = []
    lock = threading.Lock()

    def send(series: str) -> None:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE")
        for index in range(200):
            if not assoc.is_established:
                return
            ds = ct_instance(series, index)
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                with lock:
                    acknowledged.append(str(ds.SOPInstanceUID))
        assoc.release()

    senders = [threading.Thread(target=send, args=(new_uid(),)) for _ in range(4)]
    for thread in senders:
        thread.start()
    wait_for(lambda: len(acknowledged) >= 80, 120, interval=0.01, what="80 acknowledged instances")
    os.killpg(node.procs[0].pid, signal.SIGKILL)
    for thread in senders:
        thread.join(60)
    assert 80 <= len(acknowledged) < 800  # killed while receiving

    again = node_factory("serve", ICHNODE_WORKERS="0").start()  # the same data dir
    assert again.data_dir == node.data_dir
    store = Store(node.data_dir / "ichnode.sqlite3")
    try:
        recorded = {i.sop_uid: i.path for study in store.studies() for s in store.study_series(study.study_uid)
                    for i in store.instances(s.series_uid)}
        assert set(acknowledged) <= set(recorded)
        for sop_uid in acknowledged:
            assert dcmread(node.data_dir / "spool" / recorded[sop_uid]).pixel_array.shape == (16, 16)
    finally:
        store.close()


def test_listener_and_delivery_name_the_node_implementation(listener, tmp_path):
    """PS3.7 D.3.3.2: the node's Implementation Class UID and Version Name in both directions."""
    scp, _, _ = listener
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title=scp.ae_title)
    assert assoc.is_established
    assert (assoc.acceptor.implementation_class_uid, assoc.acceptor.implementation_version_name) \
        == (IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    assoc.release()

    seen = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = pacs.start_server(("127.0.0.1", free_port()), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: (
        seen.append((event.assoc.requestor.implementation_class_uid,
                     event.assoc.requestor.implementation_version_name)), 0x0000)[1])])
    try:
        path = write(ct_instance(new_uid(), 0), tmp_path / "result")
        outcome = dict(send_dicom(scp, Destination.parse(f"PACS@127.0.0.1:{server.server_address[1]}"), [path]))
    finally:
        server.shutdown()
    assert outcome[path].error is None
    assert seen == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)]
