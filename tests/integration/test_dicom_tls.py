"""DICOM TLS (PS3.15 B.1) with DCMTK as the real peers: storescu +tls to the listener, delivery to
storescp +tls, certificates made here with openssl (issue 11, item 5)."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from ichnode.common.config import load_settings
from node.delivery import Deliverer
from node.store import Store
from tests.helpers import StoreSCP, audited_listener, ct_instance, dcmtk, free_port, new_uid, result_files


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(folder: Path, name: str) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=folder)


def make_cert(folder: Path, name: str, ca: str) -> None:
    """`name`.key and `name`.crt, signed by `ca`, for localhost and 127.0.0.1."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", cwd=folder)
    (folder / f"{name}.ext").write_text("subjectAltName = DNS:localhost, IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A hospital CA with the node's, a modality's and a PACS's certificates; a stranger's CA with one."""
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    for name in ("node", "modality", "pacs"):
        make_cert(folder, name, "ca")
    make_ca(folder, "rogue-ca")
    make_cert(folder, "stranger", "rogue-ca")
    return folder


@pytest.fixture
def tls_listener(tmp_path, pki):
    with audited_listener({
            "ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_BIND": "127.0.0.1", "ICHNODE_PORT": str(free_port()),
            "ICHNODE_TLS_PORT": str(free_port()), "ICHNODE_PLAIN_PORT_ENABLED": "false",
            "ICHNODE_TLS_CERT": str(pki / "node.crt"), "ICHNODE_TLS_KEY": str(pki / "node.key"),
            "ICHNODE_TLS_CA": str(pki / "ca.crt")}) as running:
        yield running


def storescu_tls(port: int, files: Path, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aec", "ICHNODE", *tls, "127.0.0.1", str(port), str(files)],
                          capture_output=True, text=True, timeout=60)


def one_instance(tmp_path: Path) -> tuple[str, Path]:
    ds = ct_instance(new_uid(), 0)
    path = tmp_path / "one.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID), path


def test_storescu_tls_with_a_trusted_certificate_is_stored(tls_listener, pki, tmp_path):
    settings, store, trail = tls_listener
    sop_uid, path = one_instance(tmp_path)
    sent = storescu_tls(settings.listener.tls_port, path,
                        "+tls", str(pki / "modality.key"), str(pki / "modality.crt"), "+cf", str(pki / "ca.crt"))
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert store.spooled_paths()  # the instance is in the spool and recorded
    with socket.socket() as plain:  # plain_port_enabled = false: nothing listens on the plain port
        assert plain.connect_ex(("127.0.0.1", settings.listener.port)) != 0
    events = [json.loads(line) for line in trail.read_text().splitlines()]
    association = next(e for e in events if e["event"] == "Association")
    assert association["tls"] is True and association["outcome"] == 0


@pytest.mark.parametrize("client", ["anonymous", "stranger"])
def test_client_without_a_certificate_from_tls_ca_is_refused(tls_listener, pki, tmp_path, client):
    settings, store, trail = tls_listener
    _, path = one_instance(tmp_path)
    credentials = (["+tla"] if client == "anonymous"
                   else ["+tls", str(pki / "stranger.key"), str(pki / "stranger.crt")])
    sent = storescu_tls(settings.listener.tls_port, path, *credentials, "+cf", str(pki / "ca.crt"))
    assert sent.returncode != 0
    assert not store.spooled_paths()
    alerts = [json.loads(line) for line in trail.read_text().splitlines() if "Security Alert" in line]
    assert alerts and alerts[0]["alert"] == "TLS handshake failed"


def test_plain_storescu_is_not_spoken_to_on_the_tls_port(tls_listener, tmp_path):
    settings, store, _ = tls_listener
    _, path = one_instance(tmp_path)
    assert storescu_tls(settings.listener.tls_port, path).returncode != 0
    assert not store.spooled_paths()


def pacs_settings(tmp_path: Path, pki: Path, ca: str):
    return load_settings(environ={
        "ICHNODE_DATA_DIR": str(tmp_path / "data"), "ICHNODE_TLS_CERT": str(pki / "node.crt"),
        "ICHNODE_TLS_KEY": str(pki / "node.key"), "ICHNODE_TLS_CA": str(pki / f"{ca}.crt")})


def test_delivery_to_storescp_over_tls(tmp_path, pki):
    pacs = StoreSCP(tmp_path / "pacs", tls=("+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"),
                                            "+cf", str(pki / "ca.crt"))).start()  # asks for our certificate
    try:
        settings = pacs_settings(tmp_path, pki, "ca")
        store = Store(settings.storage.database_path)
        series, paths = result_files(settings.storage, count=2)
        for path in paths:
            store.enqueue_delivery(series, 1, "dicom", pacs.destination, path)
        assert Deliverer(store, settings).run_once() == 2
        assert len(pacs.received()) == 2
        store.close()
    finally:
        pacs.stop()


def test_delivery_refuses_a_pacs_certificate_it_cannot_verify(tmp_path, pki):
    pacs = StoreSCP(tmp_path / "pacs", tls=("+tls", str(pki / "pacs.key"), str(pki / "pacs.crt"),
                                            "+cf", str(pki / "ca.crt"))).start()
    try:
        settings = pacs_settings(tmp_path, pki, "rogue-ca")  # trusts only the stranger's CA
        store = Store(settings.storage.database_path)
        series, paths = result_files(settings.storage, count=1)
        store.enqueue_delivery(series, 1, "dicom", pacs.destination, paths[0])
        assert Deliverer(store, settings).run_once() == 0
        (item,) = store.deliveries(series)
        assert item.state == "pending" and item.last_error
        assert not pacs.received()
        store.close()
    finally:
        pacs.stop()
