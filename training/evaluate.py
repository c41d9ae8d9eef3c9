"""`ichnode evaluate --data SPEC --model DIR --out DIR`: score a detector on labelled scans.

Writes metrics.json, metrics.md, predictions.json and roc_<label>.png into the output folder.
Scan-level metrics use the detector's calibrated probabilities; the operating threshold is 0.5.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.stats import rankdata

from training.data import Scan
from worker.detector import LABELS, SUBTYPES, DetectorOutput, load_detector

log = logging.getLogger("ichnode.evaluate")

OPERATING_THRESHOLD = 0.5
RSNA_WEIGHTS = np.array([2.0, 1, 1, 1, 1, 1])  # RSNA 2019 weighted log loss: 'any' counts twice
TOP_SLICE_FRACTION = 0.1  # localisation: do the top 10% slices (paper 000) hit a positive slice?
BOOTSTRAP = 1000
HEATMAP_TOP_FRACTION = 0.05


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half); NaN without both classes."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_ci(y: np.ndarray, score: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the AUC over scans resampled with replacement."""
    rng = np.random.default_rng(seed)
    y, score = np.asarray(y), np.asarray(score)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        auc = roc_auc(y[idx], score[idx])
        if not math.isnan(auc):
            values.append(auc)
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from the highest threshold down."""
    y = np.asarray(y, dtype=bool)
    order = np.argsort(-np.asarray(score), kind="stable")
    tp = np.concatenate([[0], np.cumsum(y[order])])
    fp = np.concatenate([[0], np.cumsum(~y[order])])
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1)


def weighted_log_loss(y: np.ndarray, p: np.ndarray) -> float:
    """RSNA weighted multi-label log loss over rows of (n, 6) labels and probabilities."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((bce * RSNA_WEIGHTS).sum(axis=1).mean() / RSNA_WEIGHTS.sum())


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(pred, truth).sum() / denom)


def slice_hit(slice_scores: np.ndarray, slice_positive: np.ndarray, fraction: float = TOP_SLICE_FRACTION) -> bool:
    k = max(1, math.ceil(fraction * len(slice_scores)))
    return bool(slice_positive[np.argsort(-slice_scores)[:k]].any())


def heatmap_share_in_mask(heatmaps: np.ndarray, truth: np.ndarray, top: float = HEATMAP_TOP_FRACTION) -> float:
    """Of the `top` fraction of hottest voxels (over the slices that hold blood), the share inside
    the reference mask: does the heatmap point at the bleed?"""
    slices = truth.any(axis=(1, 2))
    heat, mask = heatmaps[slices].ravel(), truth[slices].ravel()
    k = max(1, int(round(top * heat.size)))
    hottest = np.argpartition(-heat, k - 1)[:k]
    return float(mask[hottest].mean())


VOLUME_BINS_ML = ((0.0, 5.0), (5.0, 30.0), (30.0, math.inf))


def auc_by_volume(y: np.ndarray, p: np.ndarray, volumes_ml: list[float | None]) -> dict[str, float | None]:
    """AUC(any) of the positives whose reference volume is in each bin against all negatives."""
    known = np.array([v is not None for v in volumes_ml])
    if not known.any():
        return {}
    ml = np.array([v if v is not None else np.nan for v in volumes_ml])
    result = {}
    for low, high in VOLUME_BINS_ML:
        keep = known & ((y == 0) | ((ml >= low) & (ml < high)))
        name = f"< {high:g} mL" if low == 0 else (f">= {low:g} mL" if math.isinf(high) else f"{low:g}-{high:g} mL")
        result[name] = _nan_to_none(roc_auc(y[keep], p[keep]))
    return result


def _nan_to_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def scan_matrices(scans: list[Scan], outputs: list[DetectorOutput]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities), both (scans, 6); soft labels count as positive from 0.5."""
    y = np.array([[float(s.labels.get(k, 0)) >= 0.5 for k in LABELS] for s in scans], dtype=float)
    return y, np.array([[o.probabilities[k] for k in LABELS] for o in outputs])


def score(scans: list[Scan], outputs: list[DetectorOutput]) -> dict:
    """All metrics for detector outputs against their scans' labels."""
    y, p = scan_matrices(scans, outputs)
    per_label = {}
    for j, label in enumerate(LABELS):
        pred = p[:, j] >= OPERATING_THRESHOLD
        pos, neg = y[:, j] == 1, y[:, j] == 0
        low, high = bootstrap_ci(y[:, j], p[:, j])
        per_label[label] = {
            "positives": int(pos.sum()),
            "auc": _nan_to_none(roc_auc(y[:, j], p[:, j])),
            "auc_ci95": [_nan_to_none(low), _nan_to_none(high)],
            "sensitivity": _nan_to_none(pred[pos].mean() if pos.any() else float("nan")),
            "specificity": _nan_to_none((~pred[neg]).mean() if neg.any() else float("nan")),
        }

    slice_y, slice_p, hits, attention_hits = [], [], [], []
    dices, heat_shares, volume_errors = [], [], []
    true_ml: dict[int, float | None] = {}  # scan index -> reference blood volume, where masks exist
    for s, o in zip(scans, outputs):
        if s.slice_labels is not None:
            slice_y.append(np.asarray(s.slice_labels, dtype=float))
            slice_p.append(o.slice_probabilities)
            positive = np.asarray(s.slice_labels)[:, 0] > 0
            if positive.any():
                hits.append(slice_hit(o.slice_scores, positive))
                attention_hits.append(bool(positive[int(o.member_outputs["attention_mil"]["top_attention_slice"])]))
        if s.masks is not None:
            truth = np.logical_or.reduce(list(s.masks.values()))
            pred = np.logical_or.reduce([o.masks[k] for k in SUBTYPES])
            if truth.any():
                dices.append(dice(pred, truth))
                heat_shares.append(heatmap_share_in_mask(o.heatmaps, truth))
            volume_errors.append(abs(o.volumes_ml["any"] - truth.sum() * s.volume.voxel_volume_ml))
            true_ml[len(true_ml)] = float(truth.sum() * s.volume.voxel_volume_ml)
        else:
            true_ml[len(true_ml)] = None

    summary = {
        "scans": len(scans),
        "positive_scans": int(y[:, 0].sum()),
        "auc_any": per_label["any"]["auc"],
        "auc_any_ci95": per_label["any"]["auc_ci95"],
        "sensitivity_any": per_label["any"]["sensitivity"],
        "specificity_any": per_label["any"]["specificity"],
        "operating_threshold": OPERATING_THRESHOLD,
        "scan_weighted_log_loss": _nan_to_none(weighted_log_loss(y, p)),
        "slice_weighted_log_loss": _nan_to_none(weighted_log_loss(np.concatenate(slice_y), np.concatenate(slice_p))) if slice_y else None,
        "dice_any": _nan_to_none(float(np.mean(dices))) if dices else None,
        "heatmap_top5pct_in_mask": _nan_to_none(float(np.mean(heat_shares))) if heat_shares else None,
        "volume_mae_ml": _nan_to_none(float(np.mean(volume_errors))) if volume_errors else None,
        "slice_top10pct_hit_rate": _nan_to_none(float(np.mean(hits))) if hits else None,
        "attention_top1_hit_rate": _nan_to_none(float(np.mean(attention_hits))) if attention_hits else None,
        "difficult_cases": int(sum(o.difficult for o in outputs)),
        "auc_any_by_volume_ml": auc_by_volume(y[:, 0], p[:, 0], [true_ml[i] for i in range(len(scans))]),
        "member_auc_any": {
            member: _nan_to_none(roc_auc(y[:, 0], [o.member_outputs[member]["any"] for o in outputs]))
            for member in outputs[0].member_outputs
        },
    }
    return {"summary": summary, "per_label": per_label}


def plot_roc(y: np.ndarray, score_: np.ndarray, title: str, path: Path, size: int = 360) -> None:
    """A plain ROC plot drawn with PIL (no plotting library needed)."""
    margin = 40
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    span = size - 2 * margin

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * span, size - margin - tpr * span

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
    fpr, tpr = roc_curve(y, score_)
    draw.line([xy(f, t) for f, t in zip(fpr, tpr)], fill=(200, 30, 30), width=2)
    draw.text((margin, 12), title, fill="black")
    draw.text((size // 2 - 50, size - margin + 12), "1 - specificity", fill="black")
    draw.text((4, margin - 16), "sensitivity", fill="black")
    img.save(path)


def _markdown(data: str, model: str, result: dict) -> str:
    s = result["summary"]
    lines = [
        f"# Evaluation: {data}",
        "",
        f"Model: {model}. Scans: {s['scans']} ({s['positive_scans']} with ICH). Operating threshold {OPERATING_THRESHOLD}.",
        "",
        "| label | positives | AUC | 95% CI | sensitivity | specificity |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in result["per_label"].items():
        lo, hi = m["auc_ci95"]
        lines.append(f"| {label} | {m['positives']} | {m['auc']} | {lo}-{hi} | {m['sensitivity']} | {m['specificity']} |")
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s.items() if k not in ("scans", "positive_scans", "member_auc_any", "auc_any_by_volume_ml")]
    if s["auc_any_by_volume_ml"]:
        lines += ["", "AUC(any) by reference blood volume (positives in the bin against all negatives): "
                  + ", ".join(f"{k} {v}" for k, v in s["auc_any_by_volume_ml"].items())]
    lines += ["", "AUC(any) of each member: " + ", ".join(f"{k} {v}" for k, v in s["member_auc_any"].items())]
    return "\n".join(lines) + "\n"


def evaluate_main(data: str, model: Path | None, out: Path) -> dict:
    """Run the detector in `model` (None: shipped) on the scans of `data`; write reports into out."""
    from training.datasets import load_scans

    scans = load_scans(data)
    if not scans:
        raise ValueError(f"no scans in {data!r}")
    detector = load_detector(model)
    outputs = []
    for i, scan in enumerate(scans, 1):
        outputs.append(detector.detect(scan.volume, brain_window_only=scan.brain_window_only))
        if i % 10 == 0 or i == len(scans):
            log.info("evaluated %d/%d scans", i, len(scans))
    result = score(scans, outputs)
    result["data"], result["model"] = data, f"{detector.name} {detector.version}"
    result["predictions"] = [
        {"scan_id": s.scan_id, "labels": {k: float(s.labels.get(k, 0)) for k in LABELS},
         "probabilities": o.probabilities, "members": o.member_outputs, "difficult": o.difficult}
        for s, o in zip(scans, outputs)
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in result.items() if k != "predictions"}, indent=2) + "\n")
    (out / "predictions.json").write_text(json.dumps(result["predictions"], indent=1) + "\n")
    (out / "metrics.md").write_text(_markdown(data, result["model"], result))
    y, p = scan_matrices(scans, outputs)
    for j, label in enumerate(LABELS):
        if 0 < y[:, j].sum() < len(y):
            auc = result["per_label"][label]["auc"]
            plot_roc(y[:, j], p[:, j], f"{label}: AUC {auc} ({data})", out / f"roc_{label}.png")
    log.info("%s: AUC(any) %s, written to %s", data, result["summary"]["auc_any"], out)
    return result
