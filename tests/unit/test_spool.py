import os

import pytest

from ichnode.common.uids import is_conformant, path_name
from node.spool import Spool

#: UIDs seen in the wild: hex (an anonymiser's digest), leading zeros, over 64 characters, letters,
#: RSNA's `ID_...`, and values that would be paths if they were used as names.
NONCONFORMANT_UIDS = ["63b4b5296cbcf3c5fcd0e380bf99c7cb", "1.2.03.4", "1.2.826.0." + "1234567890." * 6 + "7",
                      "1.2.3.abc", "ID_0fe31b044", "../../etc", "1.2/3", "..", "1.2.3 ", "ÜID"]


def test_write_is_durable_and_duplicates_are_kept_once(tmp_path):
    spool = Spool(tmp_path / "spool")
    path, new = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"first")
    assert new and path.read_bytes() == b"first"
    again, new_again = spool.write("1.2.3", "1.2.3.4", "1.2.3.4.5", b"second")
    assert again == path and not new_again and path.read_bytes() == b"first"
    assert [p.name for p in path.parent.iterdir()] == [f"{path_name('1.2.3.4.5')}.dcm"]  # no temporary left behind
    assert spool.relative(path) == f"{path_name('1.2.3')}/{path_name('1.2.3.4')}/{path_name('1.2.3.4.5')}.dcm"


@pytest.mark.parametrize("uid", NONCONFORMANT_UIDS)
def test_any_uid_is_stored_under_its_digest_and_never_becomes_a_path(tmp_path, uid):
    spool = Spool(tmp_path / "spool")
    path, new = spool.write(uid, uid, uid, b"x")
    assert new and path.read_bytes() == b"x" and path.is_relative_to(spool.root)
    assert uid not in str(path.relative_to(tmp_path))
    assert path.relative_to(spool.root).parts == (path_name(uid), path_name(uid), f"{path_name(uid)}.dcm")
    assert spool.write(uid, uid, uid, b"y") == (path, False)
    assert not is_conformant(uid)


def test_uid_grammar_and_distinct_names():
    assert is_conformant("1.2.840.10008.5.1.4.1.1.2") and is_conformant("0.1.0")
    assert not is_conformant("1." * 32 + "1")  # 65 characters
    names = {path_name(uid) for uid in NONCONFORMANT_UIDS + ["1.2.3", "1.2.3.4"]}
    assert len(names) == len(NONCONFORMANT_UIDS) + 2 and all(len(n) == 32 and n.isalnum() for n in names)


def test_write_failure_leaves_no_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        spool.write("1.2", "1.2.3", "1.2.3.4", b"data")
    assert not spool.files()
