"""`ichnode benchmark`: seconds to analyse one series with the shipped ensemble on this machine."""
from __future__ import annotations

import os
import sys
import time

import torch

from training.phantom import make_study
from worker.detector import load_detector
from worker.geometry import Volume

BENCHMARK_SEED = 424242
TARGET_SECONDS = 15.0


def benchmark_main(slices: int = 40, matrix: int = 512) -> dict:
    """Time a positive phantom series (slices x matrix x matrix) through load + detect.

    Runs one warm-up pass, then a timed one; prints a table per step/member on stdout.
    """
    if torch.get_num_threads() > 2:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    study = make_study(BENCHMARK_SEED, positive=True, matrix=matrix, n_slices=slices)
    volume = Volume.from_array(study.hu)
    start = time.perf_counter()
    detector = load_detector()
    load_seconds = time.perf_counter() - start
    detector.detect(volume)  # warm-up: first-call allocations and kernel selection
    timings: dict[str, float] = {}
    start = time.perf_counter()
    detector.detect(volume, timings)
    total = time.perf_counter() - start
    result = {
        "series": f"{slices} x {matrix} x {matrix}",
        "device": detector.device.type,
        "threads": torch.get_num_threads(),
        "model": f"{detector.name} {detector.version}",
        "load_seconds": round(load_seconds, 3),
        "steps_seconds": {k: round(v, 3) for k, v in timings.items()},
        "total_seconds": round(total, 3),
        "target_seconds": TARGET_SECONDS,
    }
    width = max(len(k) for k in timings) + 2
    print(f"{result['model']} on {result['device']} ({result['threads']} threads), series {result['series']}")
    for name, seconds in timings.items():
        print(f"  {name:<{width}}{seconds:8.3f} s")
    print(f"  {'total':<{width}}{total:8.3f} s  (target <= {TARGET_SECONDS:g} s)")
    sys.stdout.flush()
    return result
