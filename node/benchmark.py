"""Benchmarks of the node against real peers (docs/PERFORMANCE.md).

`benchmark_latency`: a series sent by storescu to `ichnode serve` with one worker and DCMTK
storescp as the destination; the series' latency per stage (node/latency.py) as the API shows it
once every result is acknowledged, for a second series (the first one warms the worker up).

`benchmark_ingest`: the same series C-STOREd by DCMTK storescu into ichnode, DCMTK storescp,
Orthanc (when installed) and two reference receivers built on pynetdicom that do the least one can
(node/reference_scp.py: answer at once; write and fsync only), with 1 and with 4 concurrent
associations, in one run.

Every receiver starts fresh with empty storage for every measurement, and every DCMTK process
runs with `TCP_NODELAY=1` (without it DCMTK stalls about 45 ms per instance, Nagle against
delayed ACK, which would flatter whoever it is compared with). All of them, and every storescu,
run in one private network namespace with only loopback (Orthanc 1.10 cannot be bound to
127.0.0.1 alone); where that cannot be made (not root) the run stays on the host's loopback and
Orthanc is left out, saying so.

What each receiver does before answering success differs, and the report says it: ichnode fsyncs
each file and its folder and commits its index (node/intake.py); Orthanc with SyncStorageArea
fsyncs each file and commits its SQLite index; storescp writes the file and fsyncs nothing.
Measured per run: wall time from the first association to the last response, the receiver's CPU
time over that window (/proc/<pid>/stat, all its threads), and the instances it holds afterwards.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

import httpx
from pydicom import dcmread

from ichnode.common.analysis import WorkerStages

ORTHANC = Path("/usr/sbin/Orthanc")
CLONE_NEWNET = 0x40000000
ASSOCIATIONS = (1, 4)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextmanager
def private_network() -> Iterator[None]:
    """Run the block, and every process it starts, in a new network namespace with only loopback.
    Only the calling thread moves; it moves back at the end. Needs root (CAP_SYS_ADMIN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    host = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "cannot make a private network namespace: "
                          f"{os.strerror(ctypes.get_errno())} (needs root)")
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        yield
    finally:
        if libc.setns(host, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "cannot return to the host network namespace")
        os.close(host)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of the process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")
DCMTK_BIN = Path("/usr/bin")


def dcmtk(tool: str) -> str:
    """DCMTK's own `tool` (Debian's dcmtk package): pynetdicom installs Python commands of the same
    names (storescu, storescp, echoscu) on PATH, which an activated virtual environment puts first."""
    path = DCMTK_BIN / tool
    if not path.is_file():
        raise FileNotFoundError(f"DCMTK {tool} not found at {path}: install dcmtk (deploy/test.sh does)")
    return str(path)


@dataclass(frozen=True)
class Receiver:
    name: str
    ae_title: str
    durability: str  # what it does before answering success
    start: Callable[[Path, int], subprocess.Popen]  # (fresh folder, port) -> the running receiver
    stored: Callable[[Path], int]  # how many instances the folder holds afterwards


def _serve(folder: Path, port: int, workers: int = 0, http_port: int | None = None,
           **env: str) -> subprocess.Popen:
    """`ichnode serve` with its defaults, on loopback, data in `folder` (its log beside it)."""
    environ = dict(os.environ, ICHNODE_DATA_DIR=str(folder), ICHNODE_PORT=str(port), ICHNODE_BIND="127.0.0.1",
                   ICHNODE_HTTP_PORT=str(http_port or free_port()), ICHNODE_HTTP_BIND="127.0.0.1",
                   ICHNODE_LOG_LEVEL="WARNING", ICHNODE_AE_TITLE="ICHNODE", **env)
    environ.pop("ICHNODE_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "ichnode.cli", "serve", "--workers", str(workers)], env=environ,
                            stdout=(folder.parent / f"{folder.name}.log").open("wb"), stderr=subprocess.STDOUT)


def _storescp(folder: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "-od", str(folder), str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _reference(mode: str) -> Callable[[Path, int], subprocess.Popen]:
    def start(folder: Path, port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "node.reference_scp", str(port), str(folder), mode],
                                stdout=subprocess.DEVNULL, stderr=(folder.parent / f"{folder.name}.log").open("wb"))
    return start


def _answered(folder: Path) -> int:
    path = folder / "answered"
    return int(path.read_text()) if path.is_file() else 0


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait(what: str, predicate: Callable[[], object], timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def _orthanc(folder: Path, port: int) -> subprocess.Popen:
    config = folder / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "benchmark", "DicomServerEnabled": True, "DicomAet": "ORTHANC", "DicomPort": port,
        "HttpServerEnabled": False, "RemoteAccessAllowed": False, "SyncStorageArea": True,
        "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index")}))
    return subprocess.Popen([str(ORTHANC), str(config)], env=DCMTK_ENV, stdout=(folder / "orthanc.log").open("wb"),
                            stderr=subprocess.STDOUT)


def _files(folder: Path, pattern: str) -> int:
    return sum(1 for path in folder.glob(pattern) if path.is_file())


RECEIVERS = {
    "ichnode": Receiver("ichnode", "ICHNODE", "fsync of file and folder, index commit (WAL, synchronous=FULL)",
                        _serve, lambda folder: _files(folder, "spool/*/*/*.dcm")),
    "storescp": Receiver("storescp", "STORESCP", "file written, no fsync", _storescp,
                         lambda folder: _files(folder, "*")),
    "orthanc": Receiver("orthanc", "ORTHANC", "SyncStorageArea: fsync of file, SQLite index commit", _orthanc,
                        lambda folder: _files(folder, "storage/*/*/*")),
    # the ceiling of any receiver built on pynetdicom (node/reference_scp.py)
    "pynetdicom": Receiver("pynetdicom", "REFERENCE", "pynetdicom answering at once: nothing kept",
                           _reference("answer"), _answered),
    "pyn+fsync": Receiver("pyn+fsync", "REFERENCE", "pynetdicom, each data set written to a new file and fsynced; "
                          "nothing parsed or indexed", _reference("fsync"), lambda folder: _files(folder, "*.dcm")),
}


def _send(parts: list[Path], port: int, ae_title: str) -> float:
    """One storescu per folder in `parts`, all at once; seconds until the last one is done."""
    started = time.perf_counter()
    senders = [subprocess.Popen([dcmtk("storescu"), "-aec", ae_title, "+sd", "127.0.0.1", str(port), str(part)],
                                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for part in parts]
    errors = [sender.communicate()[1].decode(errors="replace") for sender in senders]
    seconds = time.perf_counter() - started
    failed = [e for sender, e in zip(senders, errors) if sender.returncode]
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-500:]}")
    return seconds


def _split(series: Path, parts: int, into: Path) -> list[Path]:
    """The series' files in `parts` folders (hard links), round robin, one per association."""
    folders = [into / f"association{i + 1}" for i in range(parts)]
    for folder in folders:
        folder.mkdir(parents=True)
    for index, path in enumerate(sorted(series.glob("*.dcm"))):
        os.link(path, folders[index % parts] / path.name)
    return folders


def _measure(receiver: Receiver, parts: list[Path], count: int, work: Path) -> dict:
    folder = work / receiver.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    port = free_port()
    proc = receiver.start(folder, port)
    try:
        _wait(f"{receiver.name} listening", lambda: _listening(port), 60, proc)
        time.sleep(1.0)  # let start-up work settle before the CPU count starts
        cpu = _cpu_seconds(proc.pid)
        seconds = _send(parts, port, receiver.ae_title)
        cpu = _cpu_seconds(proc.pid) - cpu
    finally:
        _stop(proc)
    stored = receiver.stored(folder)
    if stored != count:
        raise RuntimeError(f"{receiver.name} holds {stored} of {count} instances after the run")
    return {"seconds": seconds, "cpu_seconds": cpu}


def _median_row(runs: list[dict], count: int, megabytes: float) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    cpu = statistics.median(r["cpu_seconds"] for r in runs)
    return {"instances_per_s": round(count / seconds, 1), "mb_per_s": round(megabytes / seconds, 1),
            "cpu_ms_per_instance": round(1000 * cpu / count, 2), "seconds": [round(r["seconds"], 3) for r in runs],
            "cpu_seconds": [round(r["cpu_seconds"], 3) for r in runs]}


def benchmark_ingest(series: Path, repeats: int = 3, as_json: bool = False) -> dict:
    """C-STORE the files in `series` into every receiver, `repeats` times at each association count;
    prints (or, with `as_json`, prints as JSON) and returns the medians and ichnode's ratios."""
    files = sorted(series.glob("*.dcm"))
    count, megabytes = len(files), sum(p.stat().st_size for p in files) / 1e6
    receivers = [RECEIVERS[name] for name in ("ichnode", "storescp", "pynetdicom", "pyn+fsync")]
    notes: list[str] = []
    results: dict[str, dict[str, dict]] = {}
    with ExitStack() as stack:
        try:
            stack.enter_context(private_network())
            notes.append("all receivers and senders in one private network namespace (loopback only)")
            if ORTHANC.exists():
                receivers.append(RECEIVERS["orthanc"])
            else:
                notes.append(f"Orthanc not measured: {ORTHANC} not installed")
        except OSError as exc:
            notes.append(f"on the host's loopback; Orthanc not measured: {exc}")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ichnode-ingest-")))
        for associations in ASSOCIATIONS:
            parts = _split(series, associations, work / f"send{associations}")
            runs: dict[str, list[dict]] = {r.name: [] for r in receivers}
            for _ in range(repeats):  # interleaved, so a slow spell of the machine hits every receiver
                for receiver in receivers:
                    runs[receiver.name].append(_measure(receiver, parts, count, work / "receive"))
            results[str(associations)] = {name: _median_row(r, count, megabytes) for name, r in runs.items()}
    for by_receiver in results.values():
        ours = by_receiver["ichnode"]["instances_per_s"]
        for name, row in by_receiver.items():
            if name != "ichnode":
                row["ichnode_ratio"] = round(ours / row["instances_per_s"], 2)
    report = {"instances": count, "megabytes": round(megabytes, 1), "repeats": repeats,
              "durability": {r.name: r.durability for r in receivers}, "notes": notes, "associations": results}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return report


def _print(report: dict) -> None:
    print(f"C-STORE of {report['instances']} instances ({report['megabytes']} MB) by DCMTK storescu (TCP_NODELAY=1), "
          f"median of {report['repeats']}; each receiver fresh and empty")
    for note in report["notes"]:
        print(f"  {note}")
    print(f"{'associations':>12}  {'receiver':10} {'inst/s':>8} {'MB/s':>7} {'CPU ms/inst':>12} {'ichnode ratio':>14}")
    for associations, by_receiver in report["associations"].items():
        for name, row in by_receiver.items():
            ratio = f"{row['ichnode_ratio']:.2f}x" if "ichnode_ratio" in row else ""
            print(f"{associations:>12}  {name:10} {row['instances_per_s']:8.1f} {row['mb_per_s']:7.1f} "
                  f"{row['cpu_ms_per_instance']:12.2f} {ratio:>14}")
    for name, what in report["durability"].items():
        print(f"  {name}: {what}")


def _series_uid(folder: Path) -> str:
    return str(dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


def benchmark_latency(warm_up: Path, series: Path, as_json: bool = False) -> dict:
    """Send `warm_up`, then `series`, each by one storescu association, to `ichnode serve` (one
    worker, storescp as the DICOM destination, defaults otherwise); returns `series`' timings once
    every result is acknowledged."""
    with tempfile.TemporaryDirectory(prefix="ichnode-latency-") as tmp_name:
        work = Path(tmp_name)
        (work / "pacs").mkdir()
        pacs_port, port, http_port = free_port(), free_port(), free_port()
        pacs = _storescp(work / "pacs", pacs_port)
        node = _serve(work / "node", port, workers=1, http_port=http_port,
                      ICHNODE_DESTINATIONS=f"STORESCP@127.0.0.1:{pacs_port}")
        try:
            api = f"http://127.0.0.1:{http_port}"
            _wait("ichnode serve healthy", lambda: _get(f"{api}/healthz"), 120, node)
            for folder in (warm_up, series):
                _send([folder], port, "ICHNODE")
                uid = _series_uid(folder)
                timings = _wait(f"series {uid} analysed and delivered", lambda: _delivered(api, uid), 900, node)
        finally:
            _stop(node)
            _stop(pacs)
    report = {"instances": len(list(series.glob("*.dcm"))), **timings}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"Latency of a {report['instances']}-instance series (storescu -> ichnode serve, 1 worker -> "
              f"storescp), after a warm-up series; complete by {report['completed_by']}:")
        for stage, seconds in report["stages"].items():
            print(f"  {stage:16s} {seconds if seconds is not None else '-':>8} s")
    return report


def _get(url: str):
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.is_success else None


def _analysed(api: str, series_uid: str) -> dict | None:
    """The series as the API shows it once analysed; None before."""
    series = _get(f"{api}/api/series/{quote(series_uid, safe='')}")
    if series and series["state"] in ("failed", "skipped"):
        raise RuntimeError(f"series {series_uid} {series['state']}: {series['reason']}")
    return series if series and series["state"] == "done" else None


def _delivered(api: str, series_uid: str) -> dict | None:
    """The series' timings once it is analysed and every delivery is sent; None before."""
    series = _analysed(api, series_uid)
    if not series or not series["deliveries"] or not all(d["state"] == "sent" for d in series["deliveries"]):
        return None
    return {"completed_by": series["timings"]["completed_by"], "stages": series["timings"]["stages"]}


def _analyse_all(studies: list[Path], workers: int, timeout: float, warm_up: Path | None = None,
                 broker_url: str = "") -> tuple[float, list[dict]]:
    """Send every study at once (one storescu each) to a fresh `ichnode serve --workers N` with no
    destination; seconds from the first association to the last series analysed, and the series.
    `warm_up` is analysed first, untimed, so that the workers have loaded the model."""
    with tempfile.TemporaryDirectory(prefix="ichnode-workers-") as tmp_name:
        port, http_port = free_port(), free_port()
        node = _serve(Path(tmp_name) / "node", port, workers=workers, http_port=http_port,
                      ICHNODE_BROKER_URL=broker_url)
        api = f"http://127.0.0.1:{http_port}"
        try:
            _wait("ichnode serve healthy", lambda: _get(f"{api}/healthz"), 120, node)
            if warm_up is not None:
                _send([warm_up], port, "ICHNODE")
                _wait("warm-up series analysed", lambda: _analysed(api, _series_uid(warm_up)), timeout, node)
            started = time.perf_counter()
            _send(studies, port, "ICHNODE")
            series = [_wait(f"series of {folder.name} analysed", lambda f=folder: _analysed(api, _series_uid(f)),
                            timeout, node) for folder in studies]
            return time.perf_counter() - started, series
        finally:
            _stop(node)


def benchmark_workers(warm_up: Path, studies: list[Path], thin: Path | None, as_json: bool = False,
                      broker_url: str = "") -> dict:
    """Studies per hour with 1 and with 2 worker processes (every study sent at once, each by its own
    storescu, to a fresh `ichnode serve` whose queue is `broker_url`, empty for the embedded one,
    after `warm_up` has been analysed); then, when `thin` is given, that one long series through one
    worker: seconds and the worker's peak memory per stage, as the series API shows them."""
    report: dict = {"studies": len(studies), "slices_per_study": len(list(studies[0].glob("*.dcm"))),
                    "cpus": os.cpu_count(), "broker": broker_url or "embedded", "workers": {}}
    for workers in (1, 2):
        seconds, series = _analyse_all(studies, workers, timeout=1800, warm_up=warm_up, broker_url=broker_url)
        report["workers"][str(workers)] = {
            "seconds": round(seconds, 1),
            "studies_per_hour": round(3600 * len(studies) / seconds, 1),
            "worker_seconds_per_series": round(statistics.median(s["findings"]["seconds"] for s in series), 2),
        }
    report["speedup_2_workers"] = round(report["workers"]["2"]["studies_per_hour"]
                                        / report["workers"]["1"]["studies_per_hour"], 2)
    if thin is not None:
        _, (series,) = _analyse_all([thin], 1, timeout=3600, warm_up=warm_up, broker_url=broker_url)
        stages = series["timings"]["stages"]
        report["thin_series"] = {
            "instances": series["instances"],
            "seconds": {name: stages[name] for name in WorkerStages.model_fields},
            "peak_memory_mb": series["findings"]["peak_memory_mb"],
            "warnings": series["findings"]["warnings"],
        }
    if as_json:
        print(json.dumps(report, indent=2))
        return report
    print(f"{report['studies']} studies of {report['slices_per_study']} slices sent at once to ichnode serve "
          f"({report['cpus']} CPUs, broker {report['broker']}):")
    for workers, row in report["workers"].items():
        print(f"  {workers} worker(s): {row['seconds']:7.1f} s, {row['studies_per_hour']:7.1f} studies/hour "
              f"(worker {row['worker_seconds_per_series']} s per series)")
    print(f"  2 workers / 1 worker: {report['speedup_2_workers']:.2f}x")
    if thin_series := report.get("thin_series"):
        print(f"A {thin_series['instances']}-slice series through one worker:")
        for stage, seconds in thin_series["seconds"].items():
            peak = (thin_series["peak_memory_mb"] or {}).get(stage)
            print(f"  {stage:16s} {seconds:8.2f} s  peak {peak if peak is not None else '-'} MB")
    return report
