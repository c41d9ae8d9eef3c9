import os

import pytest

from node.spool import InvalidUID, Spool, check_uid


def test_write_is_durable_and_duplicates_are_kept_once(tmp_path):
    spool = Spool(tmp_path / "spool")
    path, new = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"first")
    assert new and path.read_bytes() == b"first"
    again, new_again = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"second")
    assert again == path and not new_again and path.read_bytes() == b"first"
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.5.dcm"]  # no temporary left behind
    assert spool.relative(path) == "1.2.3/1.2.3.4/1.2.3.4.5.dcm"


@pytest.mark.parametrize("uid", ["../../etc", "1.2/3", "1..2", "1.02", "", "1." * 40, "1.2.3 ", "abc"])
def test_invalid_uids_never_become_paths(tmp_path, uid):
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID):
        spool.write("1.2", "1.2.3", uid, b"x")
    with pytest.raises(InvalidUID):
        spool.write(uid, "1.2.3", "1.2.3.4", b"x")
    assert list((tmp_path / "spool").rglob("*")) == [] or all(p.is_dir() for p in (tmp_path / "spool").rglob("*"))


def test_valid_uid_grammar():
    assert check_uid("1.2.840.10008.5.1.4.1.1.2", "x")
    assert check_uid("0.1.0", "x")


def test_write_failure_leaves_no_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        spool.write("1.2", "1.2.3", "1.2.3.4", b"data")
    assert not spool.files()
