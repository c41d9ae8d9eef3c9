"""Listener benchmark: C-STORE of one series into ichnode vs DCMTK storescp, in the same run.

Both receive the same files from DCMTK storescu over loopback and both write every instance to
disk; ichnode also fsyncs each file and records it in its store before answering, which is the
price of "nothing received is lost". Reported: median seconds and instances per second.
"""
from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ichnode.common.config import load_settings
from node.scp import start_listener
from node.spool import Spool
from node.store import Store

DCMTK = Path("/usr/bin")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _send(folder: Path, port: int, aet: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(DCMTK / "storescu"), "-aec", aet, "+sd", "127.0.0.1", str(port), str(folder)],
                   check=True, capture_output=True)
    return time.perf_counter() - started


def _wait_listening(port: int) -> None:
    import socket

    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def benchmark_listener(series: Path, repeats: int = 3) -> dict:
    """C-STORE the DICOM files in the folder `series` into both listeners `repeats` times."""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        count = len(list(series.glob("*.dcm")))
        timings: dict[str, list[float]] = {"ichnode": [], "dcmtk storescp": []}
        for run in range(repeats):
            settings = load_settings(environ={"ICHNODE_DATA_DIR": str(tmp / f"node{run}"),
                                              "ICHNODE_PORT": str(_free_port()), "ICHNODE_BIND": "127.0.0.1"})
            store = Store(settings.storage.database_path)
            server = start_listener(settings.listener, Spool(settings.storage.spool_dir), store)
            try:
                timings["ichnode"].append(_send(series, settings.listener.port, settings.listener.ae_title))
            finally:
                server.shutdown()
                store.close()
            port = _free_port()
            out = tmp / f"storescp{run}"
            out.mkdir()
            peer = subprocess.Popen([str(DCMTK / "storescp"), "-od", str(out), str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_listening(port)
                timings["dcmtk storescp"].append(_send(series, port, "STORESCP"))
            finally:
                peer.terminate()
                peer.wait(10)
    report = {name: {"median_s": round(statistics.median(t), 3), "instances_per_s": round(count / statistics.median(t), 1)}
              for name, t in timings.items()}
    print(f"C-STORE of {count} instances from DCMTK storescu, median of {repeats}:")
    for name, row in report.items():
        print(f"  {name:16s} {row['median_s']:7.3f} s  {row['instances_per_s']:8.1f} instances/s")
    return report
