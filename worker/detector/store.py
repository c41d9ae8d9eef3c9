"""Weights on disk: `ensemble.pt` (config + state dict, and the number of replicas of a fold bag)
plus `manifest.json` naming and hashing it.

The manifest (name, version, sha256 of every weight file, training data, metrics) is checked at
load so that a node with missing or corrupt weights fails at start-up, not on the first study.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from worker.detector.ensemble import Ensemble, EnsembleConfig, FoldBag
from worker.detector.interface import ModelLoadError

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
WEIGHTS_FILE = "ensemble.pt"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, data: object) -> None:
    """JSON written aside and renamed into place: readers never see half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def save_model(ensemble: Ensemble | FoldBag, out_dir: Path, name: str, version: str, training_data: dict, metrics: dict) -> Path:
    """Write the weights and their manifest into out_dir; returns the manifest path.

    Both files are written aside and renamed into place, so a running node never reads a
    half-written pair.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    tmp_weights = weights.with_suffix(".tmp")
    state = {k: v.detach().cpu() for k, v in ensemble.state_dict().items()}
    blob = {"config": ensemble.cfg.to_dict(), "state_dict": state}
    if isinstance(ensemble, FoldBag):
        blob["replicas"] = len(ensemble.replicas)
    torch.save(blob, tmp_weights)
    manifest = {
        "name": name,
        "version": version,
        "files": {WEIGHTS_FILE: sha256(tmp_weights)},
        "config": ensemble.cfg.to_dict(),
        "training_data": training_data,
        "metrics": metrics,
    }
    path = out_dir / MANIFEST
    os.replace(tmp_weights, weights)
    write_json(path, manifest)
    return path


def update_metrics(model_dir: Path, metrics: dict) -> None:
    """Add evaluation results to an existing manifest (the manifest itself is not hashed)."""
    path = model_dir / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["metrics"].update(metrics)
    write_json(path, manifest)


def read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST
    if not path.is_file():
        raise ModelLoadError(f"{path}: manifest missing (expected {MANIFEST} next to the weights)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: manifest unreadable: {exc}") from exc
    for key in ("name", "version", "files"):
        if key not in manifest:
            raise ModelLoadError(f"{path}: manifest has no '{key}'")
    return manifest


def load_model(model_dir: Path, device: torch.device) -> tuple[Ensemble | FoldBag, dict]:
    """Check every file against the manifest, then build the ensemble in eval mode on device."""
    manifest = read_manifest(model_dir)
    for name, digest in manifest["files"].items():
        path = model_dir / name
        if not path.is_file():
            raise ModelLoadError(f"{path}: weight file missing")
        actual = sha256(path)
        if actual != digest:
            raise ModelLoadError(f"{path}: corrupt weight file (sha256 {actual[:12]}..., manifest says {digest[:12]}...)")
    weights = model_dir / WEIGHTS_FILE
    if WEIGHTS_FILE not in manifest["files"]:
        raise ModelLoadError(f"{model_dir / MANIFEST}: does not list {WEIGHTS_FILE}")
    try:
        blob = torch.load(weights, map_location="cpu", weights_only=True)
        cfg = EnsembleConfig.from_dict(blob["config"])
        ensemble = FoldBag(cfg, int(blob["replicas"])) if "replicas" in blob else Ensemble(cfg)
        ensemble.load_state_dict(blob["state_dict"])
    except Exception as exc:  # any failure here means the file cannot serve as our model
        raise ModelLoadError(f"{weights}: cannot load weights: {exc}") from exc
    return ensemble.to(device).eval(), manifest
