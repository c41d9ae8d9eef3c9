"""The intake's storage path in process: group commit across concurrent senders, answered only after
the group is durable, and the checks made on the received bytes without decoding pixel data."""
from __future__ import annotations

import sqlite3
import struct
import threading
from io import BytesIO

import pytest
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from ichnode.common.config import load_settings
from node.intake import Intake, Refused
from node.spool import Spool
from node.store import Store
from tests.helpers import ct_instance, new_uid, wait_for


@pytest.fixture
def intake(tmp_path):
    settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp_path)})
    store = Store(settings.storage.database_path)
    yield Intake(Spool(settings.storage.spool_dir), store, settings.listener), store
    store.close()


def part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_concurrent_instances_are_committed_as_one_group_and_none_is_answered_before_it(intake, monkeypatch):
    intake, store = intake
    series = new_uid()
    record_received = store.record_received
    groups: list[int] = []
    first_commit_may_finish = threading.Event()

    def committing(items):
        groups.append(len(items))
        if len(groups) == 1:
            first_commit_may_finish.wait(10)
        return record_received(items)

    monkeypatch.setattr(store, "record_received", committing)
    answered: list[str] = []

    def send(index: int) -> None:
        answered.append(intake.accept(part10(ct_instance(series, index)), "SCANNER").sop_instance_uid)

    first = threading.Thread(target=send, args=(0,))
    first.start()
    wait_for(lambda: groups == [1], 10, interval=0.01, what="the first commit")
    others = [threading.Thread(target=send, args=(i,)) for i in range(1, 5)]
    for thread in others:
        thread.start()
    wait_for(lambda: len(intake.group_commit._waiting) == 4, 10, interval=0.01, what="the others waiting")
    assert answered == []  # nothing answered while its commit is under way
    first_commit_may_finish.set()
    for thread in [first, *others]:
        thread.join(10)
    assert groups == [1, 4]
    assert sorted(answered) == sorted(f"{series}.{i + 1}" for i in range(5))
    assert store.series(series).instance_count == 5


def test_a_failed_commit_refuses_every_instance_of_its_group_as_out_of_resources(intake, monkeypatch):
    intake, store = intake

    def broken(items):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "record_received", broken)
    with pytest.raises(Refused) as refused:
        intake.accept(part10(ct_instance(new_uid(), 0)), "SCANNER")
    assert refused.value.status == 0xA700 and "disk I/O error" in refused.value.reason


def test_a_folder_that_cannot_be_fsynced_refuses_the_instance_even_though_its_row_is_committed(intake, monkeypatch):
    intake, store = intake

    def full_disk(dirs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("node.intake.sync_dirs", full_disk)
    ds = ct_instance(new_uid(), 0)
    with pytest.raises(Refused) as refused:
        intake.accept(part10(ds), "SCANNER")
    assert refused.value.status == 0xA700 and "No space left" in refused.value.reason
    monkeypatch.undo()
    assert intake.accept(part10(ds), "SCANNER")  # sent again: stored, and answered success this time
    assert store.series(ds.SeriesInstanceUID).instance_count == 1


@pytest.mark.parametrize("transfer_syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_other_transfer_syntaxes_are_checked_the_same_way(intake, transfer_syntax):
    intake, store = intake
    ds = ct_instance(new_uid(), 0)
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    assert intake.accept(part10(ds), "SCANNER").transfer_syntax == transfer_syntax
    cut = ct_instance(new_uid(), 0)
    cut.file_meta.TransferSyntaxUID = transfer_syntax
    cut.Rows = 17  # Pixel Data holds 16 x 16
    with pytest.raises(Refused) as refused:
        intake.accept(part10(cut), "SCANNER")
    assert refused.value.status == 0xC000 and "truncated" in refused.value.reason


def test_an_element_after_pixel_data_cut_short_is_refused(intake):
    intake, store = intake
    whole = part10(ct_instance(new_uid(), 0))
    padding = struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, 100) + b"\0" * 10  # declares 100 bytes, 10 follow
    with pytest.raises(Refused) as refused:
        intake.accept(whole + padding, "SCANNER")
    assert refused.value.status == 0xC000 and "declares 100 bytes" in refused.value.reason
    assert intake.accept(whole + padding[:12] + b"\0" * 100, "SCANNER")  # whole: accepted
