"""What several test modules share: real peers (DCMTK storescp, an MLLP listener, an HTTP
receiver, headless Chromium, Orthanc), the node as a process, and the records the node keeps. Fixtures
that wrap them are in conftest.py; test modules import from here, never from each other."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import hl7
import httpx
import numpy as np
import pytest
from dicomweb_client import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from ichnode.common.analysis import ModelIdentity, SeriesFindings
from ichnode.common.config import PriorityRule, Settings, StorageSection, load_settings
from ichnode.common.vocabulary import LABELS, SUBTYPES
# Orthanc and its private network namespace, DCMTK's binaries and free ports, as the benchmark uses them
from node.benchmark import ORTHANC, free_port, private_network
from node.benchmark import dcmtk as benchmark_dcmtk
from node import audit
from node.headers import InstanceHeader
from node.scp import start_listener
from node.spool import Spool
from node.store import Store, StudyRow
from node.worklist import make_worklist_router, mount_web
from worker.detector import DetectorOutput
from worker.geometry import Volume
from worker.priority import assign_priority

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("ICHNODE_TEST_REDIS", "redis://127.0.0.1:6379/15")
ANALYSIS_BUDGET = 120  # quiet period + 60 s on a 2-core machine, plus worker start-up
# SOP classes of the result objects, as a PACS or archive receives them
SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22"}
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


# --- tools and processes --------------------------------------------------------------------

def dcmtk(tool: str) -> str:
    """DCMTK's own binary (node.benchmark.dcmtk); a clear failure where it is not installed."""
    try:
        return benchmark_dcmtk(tool)
    except FileNotFoundError as exc:
        pytest.fail(f"{exc}; run deploy/test.sh")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def analyze(folder: Path, out: Path) -> subprocess.CompletedProcess:
    """`ichnode analyze folder --out out` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ichnode.cli", "analyze", str(folder), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy reports for one file (warnings are not errors)."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]


def chromium(tmp_path: Path, *args: str) -> str:
    """Headless Chromium's stdout for `args` (e.g. --dump-dom URL)."""
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=8000", *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# --- DICOM data -----------------------------------------------------------------------------

def write_phantom(folder: Path, seed: int, **kwargs) -> Path:
    """A phantom study's DICOM files in folder/phantom-<seed>/; returns that folder."""
    from training.phantom import make_study

    study = make_study(seed, **kwargs)
    out = folder / f"phantom-{seed}"
    out.mkdir(parents=True, exist_ok=True)
    for ds in study.datasets:
        ds.save_as(out / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return out


def series_uid_of(folder: Path) -> str:
    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    return str(dcmread(first, stop_before_pixels=True).SeriesInstanceUID)


def study_uid_of(folder: Path) -> str:
    first = next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm")
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def new_uid() -> str:
    """A short unique UID (2.25 + UUID digits), leaving room for instance suffixes."""
    return "2.25." + str(uuid.uuid4().int)[:30]


def ct_instance(series_uid: str, index: int, sop_class=CTImageStorage, pixels: bool = True,
                study_uid: str = "1.2.826.0.1.3680043.8.498.1") -> Dataset:
    """A small CT (or other `sop_class`) instance with 16 x 16 pixels, slice `index` of a series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{series_uid}.{index + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT" if sop_class == CTImageStorage else "MR"
    ds.PatientID = "P1"
    ds.PatientName = "Test^Patient"
    ds.ImagePositionPatient = [0, 0, index * 5.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InstanceNumber = index + 1
    if pixels:
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = (np.full((16, 16), 40 + index, dtype=np.int16)).tobytes()
    return ds


@contextmanager
def audited_listener(environ: dict[str, str]):
    """A running DICOM listener configured by `environ`, with its store and audit trail; yields
    (settings, store, audit trail) and stops all three after the block."""
    settings = load_settings(environ=environ)
    settings.storage.data_dir.mkdir(parents=True)
    trail = audit.open_audit_trail(settings)
    store = Store(settings.storage.database_path)
    listener = start_listener(settings.listener, Spool(settings.storage.spool_dir), store)
    try:
        yield settings, store, trail
    finally:
        listener.shutdown()
        store.close()
        audit.close_audit_trail()


def result_files(storage: StorageSection, count=3) -> tuple[str, list[str]]:
    """`count` small objects in a new series' result folder, as the worker leaves them; returns the
    series UID and their paths relative to data_dir (outbox payloads)."""
    series = new_uid()
    folder = storage.result_folder(series)
    folder.path.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = ct_instance(series, i)
        path = folder.object_file(ds.Modality, ds.SOPInstanceUID)
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path.relative_to(storage.data_dir)))
    return series, paths


def detector_output(
    volume: Volume, masks: dict[str, np.ndarray], probabilities: dict[str, float], version="1.0.0"
) -> DetectorOutput:
    """What a detector would say given ground-truth ``masks``: hot heatmap and scores on them."""
    union = np.zeros(volume.hu.shape, bool)
    for mask in masks.values():
        union |= mask
    slice_scores = np.where(union.any(axis=(1, 2)), 0.9, 0.05)
    slice_probabilities = np.zeros((len(slice_scores), len(LABELS)))
    slice_probabilities[:, 0] = slice_scores
    for subtype, mask in masks.items():
        slice_probabilities[:, LABELS.index(subtype)] = np.where(mask.any(axis=(1, 2)), 0.8, 0.02)
    volumes = {s: float(m.sum() * volume.voxel_volume_ml) for s, m in masks.items()}
    volumes["any"] = float(union.sum() * volume.voxel_volume_ml)
    return DetectorOutput(
        probabilities={k: probabilities.get(k, 0.02) for k in LABELS},
        slice_scores=slice_scores,
        slice_probabilities=slice_probabilities,
        heatmaps=union.astype(np.float32),
        masks={s: masks.get(s, np.zeros(volume.hu.shape, bool)) for s in SUBTYPES},
        volumes_ml=volumes,
        difficult=False,
        model_name="ichnet",
        model_version=version,
        parameters={"operating_threshold": "0.5"},
    )


class GroundTruthDetector:
    """A detector that gives one answer computed beforehand (e.g. detector_output of a phantom's masks)."""

    def __init__(self, output):
        self.output = output

    def detect(self, volume, timings=None, brain_window_only=False):
        assert volume.hu.shape == self.output.heatmaps.shape
        return self.output


#: What enhanced_ct copies from the first slice.
ENHANCED_CT_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "BodyPartExamined", "Manufacturer", "PatientPosition",
)


def enhanced_ct(single_frames: list[Dataset]) -> Dataset:
    """The Enhanced CT equivalent of single-frame slices: geometry in the functional groups; the
    patient, study and series attributes of the first slice."""
    first = single_frames[0]
    ds = Dataset()
    for keyword in ENHANCED_CT_COPIED:
        if keyword in first:
            ds[keyword] = first[keyword]
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.FrameOfReferenceUID = first.FrameOfReferenceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(single_frames)

    def group(**attributes) -> Sequence:
        item = Dataset()
        for name, value in attributes.items():
            setattr(item, name, value)
        return Sequence([item])

    shared = Dataset()
    shared.PlaneOrientationSequence = group(ImageOrientationPatient=first.ImageOrientationPatient)
    shared.PixelMeasuresSequence = group(PixelSpacing=first.PixelSpacing, SliceThickness=first.get("SliceThickness", 5.0))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for single in single_frames:
        item = Dataset()
        item.PlanePositionSequence = group(ImagePositionPatient=single.ImagePositionPatient)
        item.PixelValueTransformationSequence = group(
            RescaleSlope=single.RescaleSlope, RescaleIntercept=single.RescaleIntercept
        )
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    for keyword in (
        "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
        "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    ):
        setattr(ds, keyword, first.get(keyword))
    ds.PixelData = b"".join(single.PixelData for single in single_frames)
    return ds


# --- the node's records ---------------------------------------------------------------------

STUDY_UID = "1.2.3"


def header(series: str, index: int, *, kernel="H30s", body_part="HEAD", hint=None, z=None, modality="CT",
           study: str = STUDY_UID, **fields) -> InstanceHeader:
    """The header of slice `index` of an axial 5 mm head CT series, as the listener records it."""
    return InstanceHeader(**{
        "sop_instance_uid": f"{series}.{index + 1}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": study, "series_instance_uid": series, "modality": modality,
        "body_part": body_part, "series_description": "Head", "protocol_name": None, "kernel": kernel,
        "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"], "contrast_agent": None,
        "images_in_acquisition": hint, "instance_number": index + 1,
        "image_position": [0.0, 0.0, 5.0 * index if z is None else z], "image_orientation": [1, 0, 0, 0, 1, 0],
        "slice_thickness": 5.0, "rows": 512, "columns": 512, "number_of_frames": 1,
        "patient_id": "P", "patient_name": "X^Y", "accession_number": "A1", "study_date": "20260101",
        "study_description": "CT HEAD", **fields,
    })


def findings_for(study_uid: str, series_uid: str, p_any: float, volume: float = 0.0) -> SeriesFindings:
    """What the worker hands back for a series with this p(any); priority from the real rule."""
    probabilities = {"any": p_any, "EDH": 0.01, "IPH": round(p_any * 0.9, 4), "IVH": 0.02, "SAH": 0.03, "SDH": 0.04}
    volumes = {"any": volume, "IPH": volume}
    difficult = 0.4 <= p_any <= 0.6
    return SeriesFindings(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        probabilities=probabilities,
        volumes_ml=volumes,
        slice_scores=[0.1, p_any, 0.2],
        key_slices=[f"{series_uid}.9.1", f"{series_uid}.9.2"],
        priority=assign_priority(PriorityRule(), probabilities, volumes, difficult),
        difficult=difficult,
        model=ModelIdentity(name="ich-ensemble", version="1.0.0"),
    )


def study_row(**values) -> StudyRow:
    """A study as the store keeps it; `values` override the defaults."""
    return StudyRow(**{
        "study_uid": STUDY_UID, "patient_id": None, "patient_name": None, "accession_number": None,
        "study_date": None, "study_description": None, "received_at": time.time(),
        "acknowledged_at": None, "acknowledged_by": None, **values,
    })


#: A study whose patient and order values hold HL7 delimiters.
HL7_STUDY = study_row(patient_id="PID|42", patient_name="O'NEIL^MARY&ANN^^DR^PHD", accession_number="ACC-7^X",
                      study_date="20261123")


#: A study with patient identifiers, which webhooks carry only when configured to.
WEBHOOK_STUDY = study_row(patient_id="PID-4711", patient_name="DOE^JANE", accession_number="ACC-99")


def oru_observations(message: hl7.Message) -> dict[str, str]:
    """OBX-3 identifier -> OBX-5 value of an ORU^R01."""
    return {seg.extract_field(1, 3, 1, 1): seg.extract_field(1, 5, 1, 1) for seg in message.segments("OBX")}


class Site:
    """The worklist API on a real Store, with studies put in through the same calls the node makes."""

    def __init__(self, tmp_path: Path):
        self.settings = Settings(storage=StorageSection(data_dir=tmp_path))
        self.storage = self.settings.storage
        self.store = Store(self.storage.database_path)
        self.app = FastAPI()
        self.app.include_router(make_worklist_router(self.store, self.storage))
        mount_web(self.app)
        self.client = TestClient(self.app)
        self._next = 0

    def receive(self, study_uid: str, series_uid: str, name: str = "DOE^JANE", accession: str = "A1") -> None:
        self._next += 1
        received = InstanceHeader(
            sop_instance_uid=f"{series_uid}.{self._next}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=study_uid, series_instance_uid=series_uid, modality="CT",
            patient_id=f"PID-{study_uid}", patient_name=name, accession_number=accession,
        )
        assert self.store.record_instance(received, f"spool/{self._next}.dcm", "SCANNER")

    def analysed(self, study_uid: str, series_uid: str, p_any: float, volume: float = 0.0,
                 thumbnails: tuple[bytes, ...] = (), name: str = "DOE^JANE") -> None:
        self.receive(study_uid, series_uid, name)
        generation = self.store.mark_queued(series_uid, f"task-{series_uid}")
        findings = findings_for(study_uid, series_uid, p_any, volume)
        assert self.store.mark_result(series_uid, generation, "done", findings, None)
        folder = self.storage.result_folder(series_uid)
        folder.path.mkdir(parents=True, exist_ok=True)
        for n, png in enumerate(thumbnails):
            folder.thumbnail(n).write_bytes(png)

    def worklist(self, **params) -> list[dict]:
        response = self.client.get("/api/worklist", params=params)
        assert response.status_code == 200, response.text
        return response.json()


# --- peers ----------------------------------------------------------------------------------

class StoreSCP:
    """DCMTK storescp as a result destination (a stand-in PACS)."""

    def __init__(self, folder: Path, port: int | None = None, ae_title: str = "PACS", tls: tuple[str, ...] = (),
                 extra: tuple[str, ...] = ()):
        """`tls`: storescp's TLS options (e.g. ``+tls key cert +cf ca``); the destination is then tls:.
        `extra`: more storescp options, e.g. ("-xf", config, profile)."""
        self.folder = folder
        self.port = port or free_port()
        self.ae_title = ae_title
        self.tls = tls
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.log = folder.parent / f"storescp-{self.port}.log"
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def destination(self) -> str:
        return f"{'tls:' if self.tls else ''}{self.ae_title}@127.0.0.1:{self.port}"

    def start(self) -> "StoreSCP":
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), "+B", *self.tls, *self.extra,
             str(self.port)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(lambda: listening(self.port), 10, what=f"storescp on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def received_headers(self) -> list[Dataset]:
        """Headers of the files storescp has finished writing (a file still arriving is skipped)."""
        headers = []
        for path in self.received():
            try:
                headers.append(dcmread(path, stop_before_pixels=True))
            except Exception:
                continue
        return headers


class MllpListener:
    """A one-thread MLLP peer on an ephemeral port; `reply(message)` gives the raw ACK or None."""

    def __init__(self, reply):
        self.reply = reply
        self.received: list[hl7.Message] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:  # one message per connection, as the node sends them, until closed
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                buffer = b""
                while b"\x1c\x0d" not in buffer:
                    buffer += conn.recv(65536)
                assert buffer.startswith(b"\x0b")
                message = hl7.parse(buffer[1:buffer.index(b"\x1c\x0d")].decode("utf-8"))
                self.received.append(message)
                answer = self.reply(message)
                if answer is None:  # say nothing until the sender gives up
                    conn.recv(1)
                    continue
                conn.sendall(b"\x0b" + answer.encode("utf-8") + b"\x1c\x0d")

    def close(self):
        self.server.close()
        self.thread.join(5)


def ack(code: str, *extra: str, control_id: str | None = None):
    """An MLLP listener's reply: an ACK with MSA-1 `code`, then MSA-3 and more segments from `extra`."""
    def reply(message: hl7.Message) -> str:
        sent_id = control_id or str(message.segment("MSH")(10))
        return "\r".join(["MSH|^~\\&|RIS|HOSP|ICHNODE||20261123120000||ACK^R01^ACK|9|P|2.5.1",
                          "|".join(["MSA", code, sent_id, *extra[:1]]), *extra[1:]]) + "\r"
    return reply


class Receiver:
    """An HTTP server on an ephemeral port that records POSTs and answers with `status`."""

    def __init__(self, status: int = 204, body: str = "", headers: dict | None = None):
        self.requests: list[dict] = []
        self.release = threading.Event()  # set to let a held request finish
        self.hold = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"headers": dict(self.headers), "body": json.loads(raw)})
                if receiver.hold:
                    receiver.release.wait(5)
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/ich"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class NodeProcess:
    """`ichnode <command>` as a real process with its own data dir and ports."""

    def __init__(self, tmp: Path, command: str = "serve", **env: str):
        self.port = free_port()
        self.http_port = free_port()
        self.data_dir = tmp / "node-data"
        self.log = tmp / f"ichnode-{command}-{self.port}.log"
        self.command = command
        self.env = dict(os.environ,
                        ICHNODE_PORT=str(self.port), ICHNODE_HTTP_PORT=str(self.http_port),
                        ICHNODE_DATA_DIR=str(self.data_dir), ICHNODE_AE_TITLE="ICHNODE",
                        ICHNODE_BIND="127.0.0.1", ICHNODE_HTTP_BIND="127.0.0.1", ICHNODE_QUIET_SECONDS="3")
        self.env.pop("ICHNODE_CONFIG", None)
        self.env.update(env)
        self.procs: list[subprocess.Popen] = []

    def start(self, wait: bool = True) -> "NodeProcess":
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "ichnode.cli", self.command], cwd=ROOT, env=self.env,
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True))
        if wait:
            wait_for(lambda: self.healthy() or self._exited(), 60, what="the node's /healthz")
            assert not self._exited(), f"ichnode {self.command} exited:\n{self.log.read_text()[-3000:]}"
        return self

    def start_worker(self) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "ichnode.cli", "worker"], cwd=ROOT, env=self.env,
                                stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def _exited(self) -> bool:
        return self.procs[0].poll() is not None

    def healthy(self) -> bool:
        try:
            return self.get("/healthz")["status"] == "ok"
        except Exception:
            return False

    def get_text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as response:
            return response.read().decode()

    def get(self, path: str):
        return json.loads(self.get_text(path))

    def series(self, series_uid: str) -> dict:
        return self.get(f"/api/series/{quote(series_uid, safe='')}")

    def storescu(self, folder: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [dcmtk("storescu"), "-aec", "ICHNODE", "+sd", "+r", *extra, "127.0.0.1", str(self.port), str(folder)],
            capture_output=True, text=True, timeout=120)

    def pynetdicom_storescu(self, folder: Path) -> subprocess.CompletedProcess:
        """The README's pynetdicom command line."""
        return subprocess.run(
            [sys.executable, "-m", "pynetdicom", "storescu", "127.0.0.1", str(self.port), str(folder),
             "-aec", "ICHNODE", "-r"], capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def done(node: NodeProcess, series_uid: str, generation: int = 1) -> dict | None:
    """The series from the node's API once analysed (in `generation` or later); fails fast when
    it failed or was skipped."""
    try:
        series = node.series(series_uid)
    except Exception:
        return None
    if series["state"] in ("failed", "skipped"):
        raise AssertionError(f"series {series['state']}: {series['reason']}\n{node.logs()[-3000:]}")
    return series if series["state"] == "done" and series["generation"] >= generation else None


# --- Orthanc, in a private network namespace ---------------------------------------------------

ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_USER, ORTHANC_PASSWORD = "ichnode", "orthanc-test-password"


class Orthanc:
    """Orthanc with the DICOMweb plugin, HTTP basic authentication and no DICOM listener (it can still
    send by C-STORE to the modalities its REST API is given)."""

    def __init__(self, folder: Path, **settings):
        """`settings`: more Orthanc configuration options (e.g. MaximumStorageSize)."""
        for path in (ORTHANC, ORTHANC_DICOMWEB):
            if not path.exists():
                pytest.fail(f"{path} missing: run deploy/test.sh (it installs orthanc and orthanc-dicomweb)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "orthanc.log"
        config = folder / "orthanc.json"
        config.write_text(json.dumps({
            "Name": "ichnode-test", "HttpPort": self.port, "DicomServerEnabled": False,
            "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "storage"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
            "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD},
            "Plugins": [str(ORTHANC_DICOMWEB)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **settings}))
        self.proc = subprocess.Popen([str(ORTHANC), str(config)], stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: self.answers() or self.proc.poll() is not None, 30, what="Orthanc's HTTP server")
        assert self.proc.poll() is None, f"Orthanc exited:\n{self.log.read_text()[-3000:]}"

    def rest(self, method: str, path: str, **kwargs) -> httpx.Response:
        """A call to Orthanc's REST API (e.g. POST /instances, POST /modalities/<name>/store)."""
        return httpx.request(method, f"http://127.0.0.1:{self.port}{path}", auth=(ORTHANC_USER, ORTHANC_PASSWORD),
                             timeout=120, **kwargs)

    def answers(self) -> bool:
        try:
            return self.rest("GET", "/system").is_success
        except httpx.TransportError:
            return False

    def instances(self, study_uid: str) -> dict[str, str]:
        """QIDO-RS: the study's instances, SOP Instance UID -> SOP Class UID."""
        client = DICOMwebClient(self.url, session=create_session_from_user_pass(ORTHANC_USER, ORTHANC_PASSWORD))
        found = client.search_for_instances(study_instance_uid=study_uid)
        return {item["00080018"]["Value"][0]: item["00080016"]["Value"][0] for item in found}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
