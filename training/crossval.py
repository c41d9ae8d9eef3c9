"""`ichnode evaluate --cv --config FILE`: patient-level k-fold cross-validation of the whole recipe.

The patients of `[cv] data` (the 50 CT-ICH patients) are split into `folds` groups, stratified by
whether the scan shows a bleed. For each fold the complete training recipe of `training.train`
runs without that fold's patients (the slice CNN pre-training, which sees no CT-ICH patient, is
shared by all folds) and predicts the fold's scans: every patient gets an out-of-fold prediction.
From those predictions alone:
- member weights (a small grid, best out-of-fold AUC(any)) and per-label Platt calibration,
  written to `calibration.json`, which `ichnode train` applies to the shipped model;
- the operating point: URGENT at the highest threshold with out-of-fold sensitivity >= 0.90,
  STAT at the lowest with specificity >= 0.95;
- AUC(any) with bootstrap 95% CI, sensitivity and specificity at both thresholds, per-subtype and
  per-member AUCs, AUC by extent (positive slices), all bleeds against the bleed-free children
  and adults apart (where ages are known), and a nested estimate in which weights and
  calibration of each fold come from the other folds only (so the choice itself is validated);
- ROC plots and an error gallery: contact sheets of the worst false positives and false negatives,
  key slices in the brain window beside the heatmap of the fold model that missed them.
`[cv] members` may restrict the folds to some members (the slice CNN alone: a fold in a third of
the time): the others are not trained there and get weight 0. The report also gives the slice
CNN's scan AUC for several `slice_top_k` and each CNN of a bag alone, and the out-of-fold file
keeps every slice's logit and every member's scan logit per label, so such choices (and the
calibration of several runs' models together) can be judged later without training again.
`ichnode evaluate --cv-bag RUN RUN ... --out DIR` scores several such runs of the same folds as one
bag of their slice CNNs (`bag_cross_validations`); given one run, it writes that run's report again.
Each fold's predictions are written as soon as they exist, and every stage checkpoints, so a
stopped run resumes; a fold whose model exists but whose predictions were removed is only predicted
again (after a change of inference code).
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from training import datasets
from training.config import TrainingConfig, load_training_config
from training.data import CHILD_AGE_YEARS, Scan, is_child
from training.evaluate import bootstrap_ci, dice, heatmap_share_in_mask, plot_roc, roc_auc
from training.train import (
    Example,
    TrainingData,
    fit_combiner,
    load_training_data,
    member_logits,
    setup,
    train_ensemble,
)
from worker.detector import LABELS, load_detector
from worker.detector.ensemble import SCAN_MEMBERS, Ensemble, top_k_mean
from worker.detector.members import Combiner
from worker.detector.store import MANIFEST, load_model, save_model, write_json

log = logging.getLogger("ichnode.crossval")

URGENT_SENSITIVITY = 0.90
STAT_SPECIFICITY = 0.95
WEIGHT_GRID = (0.0, 0.5, 1.0)
GALLERY_CASES = 4  # worst false positives, and as many false negatives
GALLERY_SLICES = 4
EXTENT_BINS = ((1, 2), (3, 5), (6, 999))  # positive slices per scan: a size estimate without masks
TOP_K_REPORTED = (1, 2, 3, 5, 8)  # slice_top_k values whose scan AUC the report shows


def stratified_folds(scans: list[Scan], folds: int, seed: int) -> list[list[str]]:
    """Patient ids in `folds` groups, positives and negatives each spread evenly."""
    positive = sorted({s.patient_id for s in scans if s.labels.get("any", 0) >= 0.5})
    negative = sorted({s.patient_id for s in scans} - set(positive))
    groups: list[list[str]] = [[] for _ in range(folds)]
    for ids, offset in ((positive, 0), (negative, len(positive))):
        parts = datasets.split_by_patient(ids, [1.0] * folds, seed=seed)
        for k, part in enumerate(parts):
            groups[(k + offset) % folds].extend(part)
    return [sorted(g) for g in groups]


def _predict_fold(cfg: TrainingConfig, data: TrainingData, heldout: list[Example], k: int, device: torch.device) -> list[dict]:
    model_dir = cfg.fold_model_dir(k)
    if (model_dir / MANIFEST).is_file():  # trained earlier: predict again (after a change of inference)
        ensemble, _ = load_model(model_dir, device)
    else:
        ensemble, _ = train_ensemble(
            cfg, data, device, cfg.cv_checkpoints / f"fold-{k}", cfg.cv_checkpoints / "slice_CNN_pretraining.pt",
            tuple(cfg.cv.members),
        )
        fit_combiner(ensemble, data.validation or data.train, device)  # a usable detector for the gallery
        save_model(ensemble, model_dir, f"{cfg.output.name}-fold-{k}", cfg.output.version,
                   {"fold": k, "heldout": sorted(e.patient_id for e in heldout)}, {})
    predictions = []
    for e in heldout:
        scan_logits, slice_logits = member_logits(ensemble, e, device)
        predictions.append({
            "scan_id": e.scan_id,
            "patient_id": e.patient_id,
            "fold": k,
            "labels": e.scan_labels.tolist(),
            "slice_labels": e.slice_labels[:, 0].tolist() if e.slice_labels is not None else None,
            "member_logits": scan_logits.tolist(),  # (6, members)
            "slice_cnn_logits": slice_logits[:, 0].tolist(),
            "slice_cnn_logits_by_replica": replica_slice_logits(ensemble, e, device) if ensemble.cfg.cnn_bag_channels else None,
        })
    return predictions


@torch.no_grad()
def replica_slice_logits(ensemble: Ensemble, e: Example, device: torch.device) -> list[list[float]]:
    """Each slice CNN of a bag alone: its mirrored logit(any) per slice (what the bag gains)."""
    images = e.images.float().to(device)
    return [
        torch.cat([Ensemble.mirrored(cnn, chunk)[0][:, 0] for chunk in torch.split(images, ensemble.cfg.batch_slices)]).cpu().tolist()
        for cnn in ensemble.slice_cnns
    ]


def _weighted(logits: np.ndarray, w: np.ndarray) -> np.ndarray:
    """(n, 6, members) x (members,) -> (n, 6) weighted mean logit."""
    return (logits * (w / w.sum())).sum(axis=-1)


def choose_weights(logits: np.ndarray, y: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """The grid weights with the best AUC(any); ties go to fewer members, then to the most even weighting.

    allowed: (members,) bool, the members that may get a weight (default all)."""
    best, best_key = None, None
    for w in itertools.product(WEIGHT_GRID, repeat=logits.shape[-1]):
        w = np.asarray(w)
        if w.sum() == 0 or (allowed is not None and (w[~allowed] > 0).any()):
            continue
        auc = roc_auc(y[:, 0], _weighted(logits, w)[:, 0])
        key = (round(auc, 6), -int((w > 0).sum()), -np.ptp(w[w > 0] / w.max()))  # ties: fewer members, then even
        if best_key is None or key > best_key:
            best, best_key = w, key
    return best


def calibrated_combiner(logits: np.ndarray, y: np.ndarray, w: np.ndarray) -> Combiner:
    """The detector's own combiner, weighted by w and Platt-calibrated on these scans."""
    combiner = Combiner(logits.shape[-1])
    combiner.fit(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32),
                 torch.as_tensor(w, dtype=torch.float32))
    return combiner


def _probabilities(combiner: Combiner, logits: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return combiner(torch.as_tensor(logits, dtype=torch.float32)).numpy().astype(np.float64)


def operating_point(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """(urgent, stat) thresholds on p(any), rounded to 0.01 on the safe side."""
    positives = np.sort(p[y == 1])[::-1]
    negatives = np.sort(p[y == 0])[::-1]
    urgent = positives[max(0, math.ceil(URGENT_SENSITIVITY * len(positives)) - 1)]
    urgent = math.floor(urgent * 100) / 100
    allowed_fp = int(math.floor((1 - STAT_SPECIFICITY) * len(negatives)))
    stat = negatives[allowed_fp] if allowed_fp < len(negatives) else 0.0
    stat = min(0.99, round(math.floor(stat * 100) / 100 + 0.01, 2))  # 0.69, not 0.6900000000000001
    return urgent, max(stat, urgent)


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    pred = p >= threshold
    return {
        "threshold": threshold,
        "sensitivity": round(float(pred[y == 1].mean()), 4),
        "specificity": round(float((~pred[y == 0]).mean()), 4),
        "flagged": int(pred.sum()),
    }


def _auc_entry(y: np.ndarray, score: np.ndarray) -> dict:
    auc = roc_auc(y, score)
    low, high = bootstrap_ci(y, score)
    r = lambda v: None if math.isnan(v) else round(v, 4)  # noqa: E731
    return {"positives": int(y.sum()), "scans": len(y), "auc": r(auc), "auc_ci95": [r(low), r(high)]}


def nested_probabilities(logits: np.ndarray, y: np.ndarray, folds: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """p(any) of each scan with weights and calibration chosen on the other folds only."""
    p = np.zeros(len(y))
    for k in np.unique(folds):
        rest = folds != k
        w = choose_weights(logits[rest], y[rest], allowed)
        p[~rest] = _probabilities(calibrated_combiner(logits[rest], y[rest], w), logits[~rest])[:, 0]
    return p


def top_k_scores(slice_logits: list[list[float]], k: int) -> np.ndarray:
    """Per scan, the slice CNN's scan score (`top_k_mean`) from its out-of-fold slice logits."""
    return np.array([float(top_k_mean(torch.tensor(s, dtype=torch.float64), k)) for s in slice_logits])


def slice_cnn_figures(predictions: list[dict], y_any: np.ndarray, slice_y: np.ndarray) -> dict:
    """The slice CNN's scan AUC(any) by `slice_top_k`, and each CNN of a bag alone (scan AUC at
    each k, slice AUC against slice_y, the labels of the scans that have them): how much the
    choice of k and the bagging move the ranking."""
    by_k = {str(k): _auc_entry(y_any, top_k_scores([pr["slice_cnn_logits"] for pr in predictions], k)) for k in TOP_K_REPORTED}
    labelled = [pr for pr in predictions if pr["slice_labels"] is not None]
    replicas = len(predictions[0].get("slice_cnn_logits_by_replica") or [])
    by_replica = []
    for r in range(replicas):
        logits = [pr["slice_cnn_logits_by_replica"][r] for pr in predictions]
        by_replica.append({
            "scan_auc_by_top_k": {str(k): _auc_entry(y_any, top_k_scores(logits, k))["auc"] for k in TOP_K_REPORTED},
            "slice_level_auc_any": _auc_entry(slice_y, np.concatenate([pr["slice_cnn_logits_by_replica"][r] for pr in labelled]))["auc"],
        })
    return {"scan_auc_by_top_k": by_k, "by_replica": by_replica}


def negatives_by_age(y_any: np.ndarray, p_any: np.ndarray, ages: Sequence[float | None]) -> dict:
    """AUC(any) of all bleeding scans against the bleed-free scans of each age group (where the
    age is known): whether the ranking is lost to one group's clean heads (the model card's
    "Children": CT-ICH's bleed-free children score above its bleed-free adults)."""
    child = np.array([is_child(a) for a in ages])
    adult = np.array([a is not None and a >= CHILD_AGE_YEARS for a in ages])
    groups = {f"bleed-free, under {CHILD_AGE_YEARS:g} years": child, f"bleed-free, {CHILD_AGE_YEARS:g} years and over": adult}
    return {name: _auc_entry(y_any[(y_any == 1) | group], p_any[(y_any == 1) | group])
            for name, group in groups.items() if (group & (y_any == 0)).any() and (y_any == 1).any()}


def summarise(predictions: list[dict], top_k: int, members: tuple[str, ...] = SCAN_MEMBERS,
              ages: Sequence[float | None] | None = None) -> tuple[dict, dict, np.ndarray]:
    """(metrics, calibration, calibrated out-of-fold probabilities (n, 6)); only `members` may get
    weight; `ages`: each prediction's patient age in years (None: unknown), for `negatives_by_age`."""
    y = np.array([[float(v >= 0.5) for v in pr["labels"]] for pr in predictions])
    logits = np.array([pr["member_logits"] for pr in predictions])  # (n, 6, members)
    folds = np.array([pr["fold"] for pr in predictions])
    allowed = np.array([m in members for m in SCAN_MEMBERS])
    w = choose_weights(logits, y, allowed)
    combiner = calibrated_combiner(logits, y, w)
    p = _probabilities(combiner, logits)
    urgent, stat = operating_point(y[:, 0], p[:, 0])
    nested = nested_probabilities(logits, y, folds, allowed)
    labelled = [pr for pr in predictions if pr["slice_labels"] is not None]
    slice_y = np.concatenate([pr["slice_labels"] for pr in labelled])
    slice_s = np.concatenate([pr["slice_cnn_logits"] for pr in labelled])
    extent = np.array([int(np.sum(pr["slice_labels"])) if pr["slice_labels"] is not None else 0 for pr in predictions])
    by_extent = {}
    for low, high in EXTENT_BINS:
        keep = (y[:, 0] == 0) | ((extent >= low) & (extent <= high))
        if ((extent >= low) & (extent <= high) & (y[:, 0] == 1)).any():
            by_extent[f"{low}-{high} positive slices" if high < 999 else f">= {low} positive slices"] = _auc_entry(y[keep, 0], p[keep, 0])
    metrics = {
        "scans": len(y),
        "positive_scans": int(y[:, 0].sum()),
        "folds": int(folds.max()) + 1,
        "auc_any": _auc_entry(y[:, 0], p[:, 0]),
        "auc_any_nested": _auc_entry(y[:, 0], nested),
        "urgent": _rates(y[:, 0], p[:, 0], urgent),
        "stat": _rates(y[:, 0], p[:, 0], stat),
        "nested_at_urgent": _rates(y[:, 0], nested, urgent),
        "per_label": {label: _auc_entry(y[:, j], p[:, j]) for j, label in enumerate(LABELS)},
        "per_member": {m: _auc_entry(y[:, 0], logits[:, 0, j]) for j, m in enumerate(SCAN_MEMBERS) if allowed[j]},
        "slice_cnn": slice_cnn_figures(predictions, y[:, 0], slice_y),
        "by_extent": by_extent,
        "negatives_by_age": negatives_by_age(y[:, 0], p[:, 0], ages or [None] * len(y)),
        "slice_level_auc_any": _auc_entry(slice_y, slice_s),
        "weights": dict(zip(SCAN_MEMBERS, w.tolist())),
        "members_trained": list(members),
        "slice_top_k": top_k,
    }
    calibration = {
        "members": list(SCAN_MEMBERS),
        "weights": w.tolist(),
        "platt": {label: list(term) for label, term in zip(LABELS, combiner.terms())},
        "urgent_probability": urgent,
        "stat_probability": stat,
        "scans": len(y),
    }
    return metrics, calibration, p


def _markdown(command: str, m: dict) -> str:
    def auc(e: dict) -> str:
        lo, hi = e["auc_ci95"]
        return f"{e['auc']} [{lo}-{hi}]"

    lines = [
        f"# Cross-validation: {m['folds']}-fold by patient, {m['scans']} scans ({m['positive_scans']} with ICH)",
        "",
        f"Config: `{command}`. Out-of-fold predictions only; 95% intervals are percentile bootstraps over scans.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| AUC(any) | {auc(m['auc_any'])} |",
        f"| AUC(any), weights and calibration chosen inside each fold (nested) | {auc(m['auc_any_nested'])} |",
        f"| URGENT threshold {m['urgent']['threshold']}: sensitivity / specificity | {m['urgent']['sensitivity']} / {m['urgent']['specificity']} |",
        f"| STAT threshold {m['stat']['threshold']}: sensitivity / specificity | {m['stat']['sensitivity']} / {m['stat']['specificity']} |",
        f"| nested, at the URGENT threshold: sensitivity / specificity | {m['nested_at_urgent']['sensitivity']} / {m['nested_at_urgent']['specificity']} |",
        f"| slice level AUC(any), slice CNN | {auc(m['slice_level_auc_any'])} |",
        "",
        "| label | positives | AUC [95% CI] |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {e['positives']} | {auc(e)} |" for k, e in m["per_label"].items()]
    lines += ["", "| member (alone) | weight | AUC(any) [95% CI] |", "|---|---|---|"]
    lines += [f"| {k} | {m['weights'][k]} | {auc(e)} |" for k, e in m["per_member"].items()]
    untrained = [k for k in m["weights"] if k not in m["members_trained"]]
    if untrained:
        lines += ["", f"Not trained in the folds (weight 0): {', '.join(untrained)}."]
    lines += ["", f"Slice CNN scan score, mean of the k highest slice logits (used: k = {m['slice_top_k']}):", "",
              "| k | AUC(any) [95% CI] |", "|---|---|"]
    lines += [f"| {k} | {auc(e)} |" for k, e in m["slice_cnn"]["scan_auc_by_top_k"].items()]
    if len(m["slice_cnn"]["by_replica"]) > 1:
        lines += ["", "Each CNN of the bag alone (scan AUC(any) at k = 1, 2, 3, 5, 8; slice-level AUC):", ""]
        lines += [f"- CNN {r + 1}: {', '.join(str(v) for v in e['scan_auc_by_top_k'].values())}; slice level {e['slice_level_auc_any']}"
                  for r, e in enumerate(m["slice_cnn"]["by_replica"])]
    lines += ["", "| extent (positives against all negatives) | positives | AUC [95% CI] |", "|---|---|---|"]
    lines += [f"| {k} | {e['positives']} | {auc(e)} |" for k, e in m["by_extent"].items()]
    if m.get("negatives_by_age"):
        lines += ["", "| all bleeds against the scans that are | scans | AUC [95% CI] |", "|---|---|---|"]
        lines += [f"| {k} | {e['scans'] - e['positives']} | {auc(e)} |" for k, e in m["negatives_by_age"].items()]
    hu = m.get("real_hu_slices")
    if hu:
        lines += ["", f"True-HU CT-ICH slices with radiologists' masks ({hu['slices']}, each by its patient's fold model): "
                  f"Dice(any) {hu['dice_any']}, share of the hottest 5% heatmap pixels inside the mask "
                  f"{hu['heatmap_top5pct_in_mask']}, mean slice score {hu['slice_score_mean']}."]
    if m.get("gallery"):
        lines += ["", "Error gallery: `gallery/` (worst false positives `fp-*.png`, false negatives `fn-*.png`)."]
    return "\n".join(lines) + "\n"


def _contact_sheet(scan: Scan, output, slices: list[int], title: str, path: Path, tile: int = 192) -> None:
    """Key slices: brain window (left) and heatmap overlay (right), one row per slice."""
    sheet = Image.new("RGB", (2 * tile, tile * len(slices) + 24), "black")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="white")
    for row, i in enumerate(slices):
        brain = np.clip((scan.volume.hu[i] - 0.0) / 80.0, 0, 1)
        grey = Image.fromarray((brain * 255).astype(np.uint8)).resize((tile, tile)).convert("RGB")
        heat = np.clip(output.heatmaps[i], 0, 1)
        rgb = np.stack([brain * (1 - heat) + heat, brain * (1 - heat), brain * (1 - heat)], axis=-1)
        overlay = Image.fromarray((rgb * 255).astype(np.uint8)).resize((tile, tile))
        y0 = 24 + row * tile
        sheet.paste(grey, (0, y0))
        sheet.paste(overlay, (tile, y0))
        labelled = scan.slice_labels is not None and scan.slice_labels[i, 0] > 0
        draw.text((4, y0 + 4), f"slice {i + 1}{' ICH' if labelled else ''}  p={output.slice_scores[i]:.2f}", fill="yellow")
    sheet.save(path)


class FoldDetectors:
    """The detector each fold trained, loaded once: it predicts the patients it never saw."""

    def __init__(self, cfg: TrainingConfig, groups: list[list[str]]) -> None:
        self.cfg = cfg
        self.fold_of = {patient: k for k, group in enumerate(groups) for patient in group}
        self._loaded: dict[int, object] = {}

    def for_patient(self, patient_id: str):
        k = self.fold_of[patient_id]
        if k not in self._loaded:
            self._loaded[k] = load_detector(self.cfg.fold_model_dir(k), device="cpu")
        return self._loaded[k]


def real_hu_slices(detectors: FoldDetectors) -> dict:
    """Dice and heatmap-in-mask share on the true-HU CT-ICH slices, each by its patient's fold model."""
    scans = [s for s in datasets.ctich_hu_slices() if s.patient_id in detectors.fold_of]
    outputs = [detectors.for_patient(s.patient_id).detect(s.volume) for s in scans]
    per_slice = [
        {"scan_id": s.scan_id, "dice": round(dice(np.logical_or.reduce(list(o.masks.values())), s.masks["any"]), 4),
         "heatmap_top5pct_in_mask": round(heatmap_share_in_mask(o.heatmaps, s.masks["any"]), 4),
         "p_any": round(o.probabilities["any"], 4), "slice_score": round(float(o.slice_scores[0]), 4)}
        for s, o in zip(scans, outputs)
    ]
    mean = lambda key: round(float(np.mean([r[key] for r in per_slice])), 4) if per_slice else None  # noqa: E731
    return {"slices": len(per_slice), "dice_any": mean("dice"), "heatmap_top5pct_in_mask": mean("heatmap_top5pct_in_mask"),
            "slice_score_mean": mean("slice_score"), "per_slice": per_slice}


def error_gallery(scans: dict[str, Scan], predictions: list[dict], p: np.ndarray, detectors: FoldDetectors, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # an earlier run's cases
        old.unlink()
    y = np.array([pr["labels"][0] >= 0.5 for pr in predictions])
    order = np.argsort(p[:, 0])
    fps = [i for i in order[::-1] if not y[i]][:GALLERY_CASES]
    fns = [i for i in order if y[i]][:GALLERY_CASES]
    written = []
    for kind, cases in (("fp", fps), ("fn", fns)):
        for rank, i in enumerate(cases, 1):
            pr = predictions[i]
            scan = scans[pr["scan_id"]]
            output = detectors.for_patient(scan.patient_id).detect(scan.volume)
            if kind == "fn" and scan.slice_labels is not None:
                candidates = np.flatnonzero(scan.slice_labels[:, 0] > 0)
            else:
                candidates = np.arange(len(scan.volume.hu))
            key = sorted(candidates[np.argsort(-output.slice_scores[candidates])][:GALLERY_SLICES].tolist())
            name = f"{kind}-{rank}-{pr['scan_id']}.png"
            what = "false positive" if kind == "fp" else "false negative"
            _contact_sheet(scan, output, key, f"{what}: {pr['scan_id']} p(any)={p[i, 0]:.2f} (fold {pr['fold']})", out / name)
            written.append(name)
    return written


def crossval_main(config_path: Path, overrides: Sequence[str] = ()) -> dict:
    cfg = load_training_config(config_path, overrides)
    device = setup(cfg)
    out = cfg.cv_dir
    (out / "folds").mkdir(parents=True, exist_ok=True)
    if cfg.cv.data not in cfg.data.train:
        raise ValueError(f"{config_path}: [cv] data {cfg.cv.data!r} must be one of [data] train")
    if not cfg.data.validation:
        raise ValueError(f"{config_path}: cross-validation needs [data] validation scans (none of the folds' patients)")
    data, by_spec = load_training_data(cfg)
    cv_scans = by_spec[cfg.cv.data]
    groups = stratified_folds(cv_scans, cfg.cv.folds, cfg.cv.seed)
    examples = {e.scan_id: e for e in data.train}
    predictions: list[dict] = []
    for k, patients in enumerate(groups):
        path = out / "folds" / f"fold-{k}.json"
        if path.is_file():
            log.info("fold %d/%d: predictions exist in %s", k + 1, len(groups), path)
        else:
            log.info("fold %d/%d: training without %d patients", k + 1, len(groups), len(patients))
            heldout = [examples[s.scan_id] for s in cv_scans if s.patient_id in patients]
            write_json(path, _predict_fold(cfg, data.without_patients(set(patients)), heldout, k, device))
        predictions.extend(json.loads(path.read_text()))
    scans = {s.scan_id: s for s in cv_scans}
    ages = [scans[pr["scan_id"]].age_years for pr in predictions]
    metrics, calibration, p = summarise(predictions, cfg.ensemble().slice_top_k, tuple(cfg.cv.members), ages)
    detectors = FoldDetectors(cfg, groups)
    metrics["gallery"] = error_gallery(scans, predictions, p, detectors, out / "gallery")
    if "unet_ensemble" in cfg.cv.members:
        metrics["real_hu_slices"] = real_hu_slices(detectors)
    else:
        log.info("Dice on the true-HU slices not measured: the folds trained no U-Nets ([cv] members)")
    write_report(out, " ".join([str(config_path), *(f"--set {o}" for o in overrides)]), predictions, ages,
                 metrics, calibration, p)
    return metrics


def write_report(out: Path, command: str, predictions: list[dict], ages: Sequence[float | None], metrics: dict,
                 calibration: dict, p: np.ndarray) -> None:
    """calibration.json, metrics.json and .md, oof_predictions.json and the ROC plots into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "calibration.json", calibration)
    write_json(out / "metrics.json", metrics)
    write_json(out / "oof_predictions.json", [
        {"scan_id": pr["scan_id"], "fold": pr["fold"], "age_years": ages[i], "labels": dict(zip(LABELS, pr["labels"])),
         "probabilities": dict(zip(LABELS, map(float, p[i]))),
         "member_logits": {label: dict(zip(SCAN_MEMBERS, row)) for label, row in zip(LABELS, pr["member_logits"])},
         "slice_labels_any": pr["slice_labels"], "slice_cnn_logits": pr["slice_cnn_logits"],
         "slice_cnn_logits_by_replica": pr.get("slice_cnn_logits_by_replica")}
        for i, pr in enumerate(predictions)
    ])
    (out / "metrics.md").write_text(_markdown(command, metrics))
    y = np.array([[float(v >= 0.5) for v in pr["labels"]] for pr in predictions])
    for j, label in enumerate(LABELS):
        if 0 < y[:, j].sum() < len(y):
            plot_roc(y[:, j], p[:, j], f"{label}: CV AUC {metrics['per_label'][label]['auc']}", out / f"roc_{label}.png")
    log.info("cross-validation: AUC(any) %s (nested %s), written to %s",
             metrics["auc_any"]["auc"], metrics["auc_any_nested"]["auc"], out)


def _read_run(run: Path) -> tuple[dict, dict[str, dict]]:
    """One cross-validation's folder: its metrics and its out-of-fold rows by scan id."""
    try:
        metrics = json.loads((run / "metrics.json").read_text())
        rows = json.loads((run / "oof_predictions.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{run}: not a cross-validation's folder (metrics.json, oof_predictions.json): {e}") from e
    missing = ({"fold", "labels", "member_logits", "slice_cnn_logits", "slice_labels_any"} - set(rows[0])) \
        | ({"slice_top_k", "members_trained"} - set(metrics))
    if missing:
        raise ValueError(f"{run}: written by an older cross-validation, without {sorted(missing)}")
    return metrics, {r["scan_id"]: r for r in rows}


def bag_cross_validations(runs: Sequence[Path], out: Path) -> dict:
    """`ichnode evaluate --cv-bag RUN [RUN ...] --out DIR`: several cross-validations of the same
    folds (independent trainings: other seeds, other pre-trainings) scored as one slice CNN bag;
    one run is scored again as it stands (its report and `calibration.json` written anew).

    Per scan, the slice logits of every CNN of the runs (a bag run's CNN by CNN) are averaged with
    equal weight, as a bag's CNNs are at inference, and its scan logit for "any" is the mean of the
    `slice_top_k` highest of them; the subtypes' and the other members' scan logits, whose slice
    logits the runs do not keep, are the runs' mean. Then
    weights, calibration, operating point and every figure come from these out-of-fold predictions
    as in a single run (no error gallery: that needs the fold models), and `calibration.json` serves
    `ichnode train` for a bag of those CNNs (`[model] cnn_bag_channels`, `[stages]
    cnn_bag_pretraining = "per_cnn"`)."""
    if not runs:
        raise ValueError("--cv-bag needs a cross-validation folder")
    read = [_read_run(r) for r in runs]
    top_k, members = read[0][0]["slice_top_k"], tuple(read[0][0]["members_trained"])
    first = read[0][1]
    for run, (metrics, rows) in zip(runs, read):
        if (metrics["slice_top_k"], tuple(metrics["members_trained"])) != (top_k, members):
            raise ValueError(f"{run}: slice_top_k or [cv] members differ from {runs[0]}'s")
        if {(s, r["fold"]) for s, r in rows.items()} != {(s, r["fold"]) for s, r in first.items()}:
            raise ValueError(f"{run}: not the same scans in the same folds as {runs[0]}")
    predictions = []
    for scan_id, row in first.items():
        each = [rows[scan_id] for _, rows in read]
        cnns = [np.asarray(c, dtype=np.float64)
                for r in each for c in (r.get("slice_cnn_logits_by_replica") or [r["slice_cnn_logits"]])]
        bagged = np.mean(cnns, axis=0)
        logits = np.mean([[[r["member_logits"][label][m] for m in SCAN_MEMBERS] for label in LABELS] for r in each], axis=0)
        logits[0, SCAN_MEMBERS.index("slice_cnn")] = float(top_k_mean(torch.from_numpy(bagged), top_k))
        predictions.append({
            "scan_id": scan_id, "fold": row["fold"], "labels": [row["labels"][label] for label in LABELS],
            "member_logits": logits.tolist(), "slice_labels": row["slice_labels_any"],
            "slice_cnn_logits": bagged.tolist(), "slice_cnn_logits_by_replica": [c.tolist() for c in cnns],
        })
    ages = [row.get("age_years") for row in first.values()]
    metrics, calibration, p = summarise(predictions, top_k, members, ages)
    metrics["bagged_runs"] = [str(r) for r in runs]
    write_report(out, "ichnode evaluate --cv-bag " + " ".join(map(str, runs)), predictions, ages, metrics, calibration, p)
    return metrics
