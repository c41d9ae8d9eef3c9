"""`ichnode`: the command line that joins the node, the worker and the training tools.

Each command imports the parts it runs when it runs, so `ichnode serve`, `node` and `worker`
never import the training code.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ichnode.common.config import ENV_PREFIX, ConfigError, Settings, load_settings
from ichnode.common.log_privacy import keep_values_out_of_logs
from ichnode.common.uids import quiet_library_uid_complaints

if TYPE_CHECKING:
    from node.headers import InstanceHeader

log = logging.getLogger("ichnode")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # it logs every request at INFO
    quiet_library_uid_complaints()
    keep_values_out_of_logs()


def _settings(args) -> Settings:
    settings = load_settings(args.config)
    _setup_logging(settings.log_level)
    return settings


def worker_cpu_threads(settings: Settings, workers: int, cores: int) -> int:
    """Threads of each worker's model: `detector.cpu_threads`, else the cores shared out."""
    return settings.detector.cpu_threads or max(1, cores // workers)


def _worker_command(config_path: str | None, cpu_threads: int) -> Callable[[str], list[str]]:
    """`ichnode worker --name NAME` as `serve` starts it, with the same configuration file."""
    config = ["--config", str(Path(config_path).resolve())] if config_path else []
    return lambda name: [sys.executable, "-m", "ichnode.cli", "worker", "--name", name,
                         "--cpu-threads", str(cpu_threads), *config]


def cmd_serve(args) -> None:
    settings = _settings(args)
    from node.service import NodeService, WorkerPool
    from worker.detector import load_detector

    workers = settings.queue.workers if args.workers is None else args.workers
    pool = None
    if workers:
        load_detector(settings.detector.model_path, "cpu")  # fail fast on missing or corrupt weights
        pool = WorkerPool(workers, _worker_command(args.config or os.environ.get(ENV_PREFIX + "CONFIG"),
                                                   worker_cpu_threads(settings, workers, os.cpu_count() or 1)))
    NodeService(settings, pool).run()


def cmd_node(args) -> None:
    settings = _settings(args)
    from node.service import NodeService

    NodeService(settings).run()


def cmd_worker(args) -> None:
    settings = _settings(args)
    from worker.tasks import run_worker

    run_worker(settings, args.name, args.cpu_threads or settings.detector.cpu_threads)


def read_folder(folder: Path) -> dict[str, list[tuple[Path, InstanceHeader]]]:
    """Every DICOM file below folder with its instance header, by Series Instance UID."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.headers import instance_header

    by_series: dict[str, list[tuple[Path, InstanceHeader]]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = instance_header(dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, AttributeError, OSError) as exc:
            log.info("%s: not a usable DICOM instance (%s)", path, exc)
            continue
        by_series[header.series_instance_uid].append((path, header))
    return by_series


def cmd_analyze(args) -> int:
    from ichnode.common.analysis import Skipped
    from ichnode.common.result_folder import ResultFolder
    from node.selection import choose_series
    from worker.detector import load_detector
    from worker.pipeline import NotAnalysed, analyze_series
    from worker.volume import VolumeError

    settings = _settings(args)
    folder = ResultFolder(Path(args.out))
    folder.path.mkdir(parents=True, exist_ok=True)
    by_series = read_folder(Path(args.series_dir))
    headers = {uid: [header for _, header in files] for uid, files in by_series.items()}
    rule = settings.series
    chosen, skipped = choose_series(headers, rule.min_slices, rule.min_coverage_mm, rule.analyse_contrast)
    for uid, reason in skipped.items():
        log.info("series %s skipped: %s", uid, reason)
    if chosen is None:
        reason = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "no DICOM instances found"
        folder.findings_file.write_text(Skipped(skipped=reason).model_dump_json(indent=2))
        print(f"not analysed: {reason}", file=sys.stderr)
        return 1
    detector = load_detector(Path(args.model) if args.model else settings.detector.model_path, settings.detector.device)
    paths = [path for path, _ in by_series[chosen]]
    try:
        analysis = analyze_series(paths, detector, settings.priority, folder, rule.analyse_contrast)
    except (VolumeError, NotAnalysed) as exc:
        folder.findings_file.write_text(Skipped(skipped=str(exc)).model_dump_json(indent=2))
        print(f"not analysed: {exc}", file=sys.stderr)
        return 1
    findings = analysis.findings
    print(f"{findings.priority.level} p(any)={findings.probabilities['any']:.3f} "
          f"({analysis.seconds:.1f} s) -> {folder.findings_file}")
    return 0


def cmd_phantom(args) -> None:
    from training.phantom import phantom_main

    _setup_logging("INFO")
    phantom_main(Path(args.out), args.studies, args.seed, args.positive_fraction, args.matrix)


def cmd_export_dicom(args) -> None:
    from training.datasets import load_scans
    from training.dicom_series import write_scan_series

    _setup_logging("INFO")
    for scan in load_scans(args.data):
        print(write_scan_series(scan, Path(args.out)))


def cmd_train(args) -> None:
    from training.train import train_main

    _setup_logging("INFO")
    train_main(Path(args.config), args.set)


def cmd_evaluate(args, parser: argparse.ArgumentParser) -> None:
    _setup_logging("INFO")
    if args.cv_bag:
        from training.crossval import bag_cross_validations

        if not args.out:
            parser.error("evaluate --cv-bag needs --out (the bag's report folder)")
        try:
            bag_cross_validations([Path(r) for r in args.cv_bag], Path(args.out))
        except ValueError as e:  # a folder that is no cross-validation, or not of the same folds
            parser.error(str(e))
        return
    if args.cv:
        from training.crossval import crossval_main

        if not args.config:
            parser.error("evaluate --cv needs --config (a training config)")
        crossval_main(Path(args.config), args.set)
        return
    from training.evaluate import evaluate_main

    if not (args.data and args.out):
        parser.error("evaluate needs --data and --out (or --cv --config FILE)")
    evaluate_main(args.data, Path(args.model) if args.model else None, Path(args.out))


def _long_series(folder: Path, instances: int, matrix: int, slice_thickness: float | None = None) -> Path:
    """One series of `instances` CT images for the ingest and workers benchmarks: the slices of a
    phantom (at most 40: a phantom of hundreds of slices takes minutes to make) repeated along the
    slice direction, each instance with its own SOP Instance UID, number and position."""
    from pydicom.uid import generate_uid

    from training.phantom import make_study

    slices = make_study(1, positive=True, matrix=matrix, n_slices=min(instances, 40),
                        slice_thickness=slice_thickness).datasets
    first = [float(v) for v in slices[0].ImagePositionPatient]
    step = ([float(b) - float(a) for a, b in zip(slices[0].ImagePositionPatient, slices[1].ImagePositionPatient)]
            if len(slices) > 1 else [0.0, 0.0, float(slices[0].SliceThickness)])
    folder.mkdir()
    for index in range(instances):
        ds = slices[index % len(slices)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = index + 1
        ds.ImagePositionPatient = [round(start + index * delta, 4) for start, delta in zip(first, step)]
        if "ImagesInAcquisition" in ds:
            ds.ImagesInAcquisition = instances
        ds.save_as(folder / f"{index + 1:05d}.dcm", enforce_file_format=True)
    return folder


def cmd_benchmark(args) -> None:
    _setup_logging("WARNING")
    if args.part in ("detector", "all"):
        from training.benchmark import benchmark_main

        benchmark_main(slices=args.slices, matrix=args.matrix)
    if args.part in ("ingest", "latency", "workers", "all"):
        from node.benchmark import benchmark_ingest, benchmark_latency, benchmark_workers
        from training.phantom import make_study

        def write_series(folder: Path, seed: int, slices: int, positive: bool = True) -> Path:
            folder.mkdir()
            for ds in make_study(seed, positive=positive, matrix=args.matrix, n_slices=slices).datasets:
                ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
            return folder

        with tempfile.TemporaryDirectory() as tmp:
            if args.part in ("ingest", "all"):
                benchmark_ingest(_long_series(Path(tmp) / "ingest", args.instances, args.matrix), args.repeats,
                                 args.json)
            if args.part in ("latency", "all"):
                benchmark_latency(write_series(Path(tmp) / "warm-up", 2, args.slices),
                                  write_series(Path(tmp) / "latency", 3, args.slices), args.json)
            if args.part in ("workers", "all"):
                thin = (_long_series(Path(tmp) / "thin", args.thin_slices, args.matrix, slice_thickness=0.625)
                        if args.thin_slices else None)
                benchmark_workers(write_series(Path(tmp) / "workers-warm-up", 2, args.slices),
                                  [write_series(Path(tmp) / f"study{k}", 11 + k, args.slices, positive=k % 2 == 0)
                                   for k in range(args.studies)],
                                  thin, args.json, args.broker_url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ichnode", description=(
        "ICH triage node for head CT. Triage aid: NOT FOR DIAGNOSTIC USE."))
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="TOML config file (default: $ICHNODE_CONFIG, else built-in defaults)")
        return p

    p = with_config(sub.add_parser("serve", help="everything on one machine: listener, queue, workers, delivery, HTTP"))
    p.add_argument("--workers", type=int, help="worker processes to start (default: config key workers)")
    p.set_defaults(func=cmd_serve)
    with_config(sub.add_parser("node", help="the node alone (listener, assembly, delivery, HTTP); workers run elsewhere")).set_defaults(func=cmd_node)
    p = with_config(sub.add_parser("worker", help="one analysis worker (needs [queue] broker_url = redis://… to serve a remote node)"))
    p.add_argument("--name", default="worker", help="the worker's name among the queue's workers (default: worker)")
    p.add_argument("--cpu-threads", type=int, default=0,
                   help="CPU threads of the model (default: config key detector.cpu_threads, else every core)")
    p.set_defaults(func=cmd_worker)
    p = with_config(sub.add_parser("analyze", help="analyse a folder of DICOM files offline"))
    p.add_argument("series_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--model", help="model folder (default: the shipped ensemble)")
    p.set_defaults(func=cmd_analyze)
    p = sub.add_parser("phantom", help="write synthetic head CT studies with ground truth")
    p.add_argument("out")
    p.add_argument("--studies", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--matrix", type=int, default=512)
    p.set_defaults(func=cmd_phantom)
    p = sub.add_parser("export-dicom", help="write training scans as DICOM CT series, one folder per scan "
                       "(e.g. a CT-ICH patient, to run analyze on it)")
    p.add_argument("--data", required=True, help='e.g. "ctich:all,patients=49" or "phantom:seed=1,n=3"')
    p.add_argument("out")
    p.set_defaults(func=cmd_export_dicom)
    set_help = "SECTION.KEY=VALUE over the training config (TOML value), e.g. model.cnn.channels=5; repeatable"
    p = sub.add_parser("train", help="train the detector from a training config")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=set_help)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a model: AUC with CIs, sensitivity, Dice, volumes; or with --cv, "
                       "cross-validate a training config by patient (out-of-fold metrics, calibration, error gallery)")
    p.add_argument("--data", help='e.g. "phantom:seed=9999,n=60", "rsna-slices:heldout" or a folder')
    p.add_argument("--model", help="model folder (default: the shipped ensemble)")
    p.add_argument("--out", help="report folder")
    p.add_argument("--cv", action="store_true", help="k-fold cross-validation of --config (resumes when stopped)")
    p.add_argument("--cv-bag", nargs="+", metavar="RUN", help="cross-validation folders of the same folds (each "
                   "with metrics.json, oof_predictions.json), scored as one bag of their slice CNNs, into --out "
                   "(one folder: its report and calibration.json written again)")
    p.add_argument("--config", help="training config, with --cv")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=set_help + " (with --cv)")
    p.set_defaults(func=lambda args, p=p: cmd_evaluate(args, p))
    p = sub.add_parser("benchmark", help="time the detector per member; C-STORE ingest of ichnode against DCMTK "
                       "storescp and Orthanc; a series' latency per stage; studies per hour with 1 and 2 workers "
                       "(docs/PERFORMANCE.md)")
    p.add_argument("part", nargs="?", choices=("all", "detector", "ingest", "latency", "workers"), default="all")
    p.add_argument("--slices", type=int, default=40, help="detector and latency: slices of the series")
    p.add_argument("--matrix", type=int, default=512, help="rows and columns of every image")
    p.add_argument("--instances", type=int, default=400, help="ingest: instances of the series sent")
    p.add_argument("--repeats", type=int, default=3, help="ingest: runs per receiver and association count (median)")
    p.add_argument("--studies", type=int, default=6, help="workers: studies sent at once to 1, then 2 workers")
    p.add_argument("--broker-url", default="", help="workers: the queue, e.g. redis://127.0.0.1:6379/5 (default: embedded)")
    p.add_argument("--thin-slices", type=int, default=600,
                   help="workers: slices of the thin (0.625 mm) series timed through one worker; 0 leaves it out")
    p.add_argument("--json", action="store_true", help="ingest, latency and workers: the report as JSON")
    p.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"ichnode: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
