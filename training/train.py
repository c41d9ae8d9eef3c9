"""`ichnode train --config FILE`: train the ensemble detector from a TOML config.

Stages (the training scans are `[data] train`; single slices `[data] slices` feed the slice CNN):
0. slice CNN pre-training on the single slices and phantoms only (no CT-ICH patient, so the
   cross-validation folds share it);
1. slice CNN on every slice label (balanced positive/negative slices, augmented; with
   `[stages] cnn_synthetic_bleeds`, also on that many bleeds synthesised into real bleed-free
   slices, the same draw the U-Nets start from; with `cnn_fracture_weight`, also a training-only
   head on the skull-fracture label CT-ICH gives each slice), and each further
   CNN of the bag (`[model] cnn_bag_channels`) the same way from the pre-training of its input
   (stage 0 runs once per number of input channels), or from its own (`[stages]
   cnn_bag_pretraining = "per_cnn"`); with `[stages] cnn_batch_norm = "patients"` each CNN's
   batch-norm statistics are then re-estimated on the real patients' slices (`reestimate_batch_norm`);
2. PCA of the CNN features, then the BiLSTM over whole scans (slice labels, or the scan label
   against the max over slices when a scan has no slice labels);
3. attention MIL on scan labels only (from report text through training.labels when asked);
4. all-ICH U-Net with subtype head, then the SDH, SAH and small-lesion specialists fine-tuned from it,
   on phantom masks, slice labels, and bleeds synthesised into real bleed-free slices
   (`training.synthetic_bleeds`: exact masks on real anatomy);
5. pixel weight fusion of the U-Nets on the validation scans (Dice loss, paper 003);
6. the combiner: member weights and calibration from a cross-validation run's out-of-fold
   predictions (`[evaluate] calibration`), else equal weights calibrated on the validation scans;
then the weights and manifest are written and the `[evaluate]` data sets are scored.
With `[output] fold_bag` no model is trained here: the cross-validation's fold models, which
together saw every patient, are averaged into one `FoldBag` and given the same calibration.
Every stage checkpoints into `[run] checkpoints` and a stopped run resumes where it was.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from training.augment import AugmentConfig, Mixing, augment, warp_masks
from training.config import StagesSection, TrainingConfig, load_training_config
from training.data import Scan, is_child
from training.datasets import load_scans
from training.synthetic_bleeds import synthetic_examples
from worker.detector import LABELS, SUBTYPES
from worker.detector.detector import resolve_device
from worker.detector.ensemble import SCAN_MEMBERS, UNET_MEMBERS, Ensemble, EnsembleConfig, FoldBag, top_k_mean
from worker.detector.members import SliceCNN
from worker.detector.preprocess import masks_to_working
from worker.detector.store import MANIFEST, load_model, save_model, update_metrics

log = logging.getLogger("ichnode.train")

SMALL_LESION_ML = 5.0  # the small-lesion specialist's cases (paper 003)
WEAK_TOP_K = 16  # pixels whose mean lesion logit stands for a whole weakly labelled slice
WEAK_FRACTION = 8  # one weakly labelled whole slice per this many patches


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One scan at working size, as the training stages consume it."""

    scan_id: str
    patient_id: str
    images: torch.Tensor  # (slices, channels, s, s) as `prepare` gives them, float16 (halves the memory)
    scan_labels: torch.Tensor  # (6,) 0..1
    slice_labels: torch.Tensor | None  # (slices, 6)
    lesion: torch.Tensor | None  # (slices, s, s) soft, None when the masks are unknown
    subtype: torch.Tensor | None  # (slices, s, s) index into SUBTYPES of the lesion there, -1 elsewhere
    lesion_ml: float
    inside: torch.Tensor  # (slices, s, s) bool: the intracranial region, where scan scores look
    full_hu: bool = True  # False: brain window only, the later channels are zero
    age_years: float | None = None  # the patient's, where the source records it (Scan.age_years)
    slice_fracture: torch.Tensor | None = None  # (slices,) 0/1 skull fracture, where known (Scan.slice_fracture)


def make_example(scan: Scan, model: EnsembleConfig) -> Example:
    """A scan through the same preprocessing as inference for `model`; masks are mapped with the
    same crop.

    A negative scan without slice labels has known (all-zero) slice labels.
    """
    prepared = model.prepare(scan.volume.hu, scan.volume.spacing_mm[0], scan.brain_window_only)
    n = scan.volume.hu.shape[0]
    labels = torch.tensor([float(scan.labels.get(k, 0)) for k in LABELS])
    negative = float(labels[0]) == 0.0
    lesion = subtype = slice_labels = None
    lesion_ml = 0.0
    if scan.slice_labels is not None:
        slice_labels = torch.as_tensor(np.asarray(scan.slice_labels, dtype=np.float32))
    if scan.masks:
        stack = np.stack([scan.masks.get(k, np.zeros(scan.volume.hu.shape, bool)) for k in SUBTYPES])
        union = stack.any(axis=0)
        lesion_ml = float(union.sum() * scan.volume.voxel_volume_ml)
        soft = torch.stack([masks_to_working(m, prepared.crop, model.working_size) for m in stack])  # (5, slices, s, s)
        lesion = soft.amax(dim=0).clamp(0, 1)
        subtype = torch.where(lesion > 0.5, soft.argmax(dim=0), torch.full_like(lesion, -1, dtype=torch.long))
        if slice_labels is None:
            per_slice = np.concatenate([union[None], stack]).any(axis=(2, 3)).T  # (slices, 6)
            slice_labels = torch.as_tensor(per_slice, dtype=torch.float32)
    elif negative and slice_labels is None:
        slice_labels = torch.zeros(n, len(LABELS))
    return Example(
        scan.scan_id, scan.patient_id, prepared.images.half(), labels, slice_labels, lesion, subtype, lesion_ml,
        prepared.inside_working, not scan.brain_window_only, scan.age_years,
        None if scan.slice_fracture is None else torch.as_tensor(np.asarray(scan.slice_fracture, dtype=np.float32)),
    )


def report_labels(scans: list[Scan]) -> dict[str, np.ndarray]:
    """scan_id -> (6,) soft labels from the report label model, for scans with report text."""
    from training import labels

    with_reports = [s for s in scans if s.report]
    if not with_reports:
        return {}
    proba = labels.predict_proba([s.report for s in with_reports])
    return {s.scan_id: np.asarray(p, dtype=np.float32) for s, p in zip(with_reports, proba)}


# ---------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------


def _save_atomic(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def autocast_dtype(device: torch.device, mixed_precision: str) -> torch.dtype | None:
    """The training autocast type: float16 on CUDA, bfloat16 on a CPU that computes it natively
    (emulated bfloat16 is slower than float32), None for float32."""
    if mixed_precision == "off":
        return None
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


class Trainer:
    """Adam with a cosine schedule (AdamW's decoupled `weight_decay` on the weights of two or more
    dimensions, not on biases and normalisation; 0: Adam's very steps), mixed precision
    (`autocast_dtype`; gradient scaling for float16), channels-last weights, progress with ETA on
    stderr, and a resumable checkpoint per stage (module, optimiser, schedule, random state)."""

    def __init__(self, device: torch.device, seed: int, checkpoints: Path | None = None, checkpoint_seconds: float = 120.0,
                 mixed_precision: str = "auto", weight_decay: float = 0.0) -> None:
        self.device = device
        self.weight_decay = weight_decay
        self.autocast = autocast_dtype(device, mixed_precision)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.checkpoints = checkpoints
        self.checkpoint_seconds = checkpoint_seconds

    def checkpoint_path(self, name: str) -> Path | None:
        return None if self.checkpoints is None else self.checkpoints / (name.replace(" ", "_").replace("+", "_") + ".pt")

    def run(self, name: str, module: torch.nn.Module, steps: int, lr: float, loss_fn: Callable[[], torch.Tensor],
            checkpoint: Path | None = None, extra_state: dict[str, torch.Tensor] | None = None,
            ema_decay: float = 0.0) -> float:
        """`steps` Adam steps on loss_fn; a finished checkpoint is loaded instead of training again.

        extra_state: tensors the loss keeps between steps (a sampler's memory), checkpointed with
        the module and restored in place on resume.
        ema_decay: when > 0, the module ends with the exponential moving average of its weights and
        batch-norm statistics over the steps (its state checkpointed under "ema") instead of the
        last step's."""
        extra_state = extra_state or {}
        checkpoint = checkpoint or self.checkpoint_path(name)
        params = [p for p in module.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": self.weight_decay},
                                       {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}], lr=lr)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
        first, running = 1, None
        if checkpoint is not None and checkpoint.is_file():
            state = torch.load(checkpoint, map_location=self.device, weights_only=False)
            module.load_state_dict(state["module"])
            if state["step"] >= steps:
                log.info("%s: done earlier, loaded %s", name, checkpoint)
                module.eval()
                return state["loss"]
            optimiser.load_state_dict(state["optimiser"])
            schedule.load_state_dict(state["schedule"])
            self.rng.setstate(state["rng"])
            self.generator.set_state(state["generator"])
            for key, tensor in state.get("extra", {}).items():
                if key in extra_state:
                    extra_state[key].copy_(tensor)
            first, running = state["step"] + 1, state["loss"]
            log.info("%s: resuming at step %d/%d from %s", name, first, steps, checkpoint)
        module.to(memory_format=torch.channels_last)  # the convolutions' fast layout on CPU and GPU
        averaged = (AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
                    if ema_decay > 0 else None)
        if averaged is not None and first > 1 and state.get("ema") is not None:
            averaged.load_state_dict(state["ema"])  # (a checkpoint without one: the average starts here)
        module.train()
        start = last_save = time.monotonic()
        report_every = max(1, steps // 20)
        for step in range(first, steps + 1):
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                loss = loss_fn()
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            schedule.step()
            if averaged is not None:
                averaged.update_parameters(module)
                if step == steps:
                    module.load_state_dict(averaged.module.state_dict())
            value = float(loss.detach())
            running = value if running is None else 0.98 * running + 0.02 * value
            now = time.monotonic()
            if step % report_every == 0 or step == steps:
                done = step - first + 1
                eta = (now - start) / done * (steps - step)
                bar = "#" * (20 * step // steps)
                log.info("%s [%-20s] %d/%d loss %.4f, %.0f s, ETA %.0f s", name, bar, step, steps, running, now - start, eta)
            if checkpoint is not None and (step == steps or now - last_save >= self.checkpoint_seconds):
                _save_atomic({
                    "module": module.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                    "rng": self.rng.getstate(), "generator": self.generator.get_state(), "step": step, "loss": running,
                    "extra": extra_state, "ema": None if averaged is None else averaged.state_dict(),
                }, checkpoint)
                last_save = now
        module.eval()
        return running or 0.0

    def coin(self) -> bool:
        return self.rng.random() < 0.5


def _flip(x: torch.Tensor, flip: bool) -> torch.Tensor:
    """Left-right flip (the augmentation; images and their masks get the same one)."""
    return x.flip(-1) if flip else x


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (prob * target).sum()
    return 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)


def _bleeding_share(batch: int, positives: list, share: float) -> int:
    """How many of `batch` balanced slices are bleeding ones: `share` of them (rounded down), when
    there are any."""
    return int(batch * share) if positives else 0


def _balanced_slices(rng: random.Random, positives: list, negatives: list, batch: int, hard: Sequence = (),
                     bleeding_share: float = 0.5) -> list:
    """`_bleeding_share` positives first, then the `hard` negatives, then uniform negatives."""
    bleeding = _bleeding_share(batch, positives, bleeding_share)
    chosen = [rng.choice(positives) for _ in range(bleeding)] if positives else []
    chosen += list(hard)[: batch - bleeding]
    return chosen + [rng.choice(negatives or positives) for _ in range(batch - len(chosen))]


class HardNegatives:
    """Online hard-negative mining without extra forward passes: clean slices are drawn in
    proportion to the CNN's predicted bleed probability when it last saw them (for a clean slice,
    the size of its loss gradient); slices not yet seen count 0.5."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.probability = torch.full((count,), 0.5)
        self.generator = generator

    def draw(self, n: int) -> list[int]:
        if n == 0 or len(self.probability) == 0:
            return []
        return torch.multinomial(self.probability, n, replacement=True, generator=self.generator).tolist()

    def update(self, drawn: Sequence[int], logits: torch.Tensor) -> None:
        """logits: the CNN's logit(any) for the drawn slices, in their order."""
        self.probability[list(drawn)] = torch.sigmoid(logits.detach().float().cpu())


def _label_weights(device: torch.device) -> torch.Tensor:
    """RSNA weighting: 'any' counts twice."""
    return torch.tensor([2.0, 1, 1, 1, 1, 1], device=device) / 7 * 6


def scan_score_loss(logits: torch.Tensor, slice_labels: torch.Tensor, top_k: int) -> torch.Tensor:
    """The BCE of a run of adjacent slices' scan score (`top_k_mean`, as the detector scores a
    scan) against the run's labels (any slice's)."""
    return F.binary_cross_entropy_with_logits(top_k_mean(logits, top_k), slice_labels.amax(dim=0),
                                              weight=_label_weights(logits.device))


def _slice_pool(data: list[Example]) -> tuple[list, list]:
    pool = [(e, i) for e in data if e.slice_labels is not None for i in range(len(e.images))]
    return [p for p in pool if p[0].slice_labels[p[1], 0] > 0], [p for p in pool if p[0].slice_labels[p[1], 0] == 0]


def train_slice_cnn(name: str, cnn: SliceCNN, data: list[Example], t: Trainer, steps: int, batch: int, lr: float,
                    aug: AugmentConfig, checkpoint: Path | None = None, focus: Sequence[Example] = (),
                    focus_share: float = 0.0, run_share: float = 0.0, top_k: int = 1,
                    hard_negative_share: float = 0.0, ema_decay: float = 0.0, bleeding_share: float = 0.5,
                    fracture_weight: float = 0.0) -> None:
    """Slice labels (augmented, channel dropout), plus the auxiliary lesion-fraction map on slices
    whose masks are known, and with `fracture_weight` > 0 a training-only head's skull-fracture
    label (`fracture_loss`) on slices that have one. `focus_share` of each batch comes from the
    slices of `focus` (the patients the model is for), the rest from all of `data`;
    `bleeding_share` of each part bleeding slices, the rest clean.

    `run_share` of each batch is instead a run of adjacent slices of one `focus` scan, whose scan
    score (`scan_score_loss`) is trained too: this trains what ranks patients, a clean scan's
    highest slices, which the balanced slices meet only at random. The rest of the batch keeps its
    pooled slices, so batch normalisation never sees one scan alone.

    `hard_negative_share` of the pooled part's clean slices are drawn by `HardNegatives`, the
    rest uniformly; the pooled part keeps its bleeding share either way. `ema_decay`: see
    `Trainer.run`."""
    pos, neg = _slice_pool(data)
    runs = [e for e in focus if e.slice_labels is not None]
    from_run = round(batch * run_share) if runs else 0
    focus_pos, focus_neg = _slice_pool(list(focus))
    from_focus = round(batch * focus_share) if focus_pos or focus_neg else 0
    pooled = batch - from_focus - from_run
    from_hard = round((pooled - _bleeding_share(pooled, pos, bleeding_share)) * hard_negative_share) if neg else 0
    hard_negatives = HardNegatives(len(neg), t.generator)
    fracture_head = torch.nn.Linear(cnn.feature_dim, 1).to(t.device) if fracture_weight > 0 else None
    trained = cnn if fracture_head is None else torch.nn.ModuleDict({"cnn": cnn, "fracture_head": fracture_head})
    log.info("%s: %d positive and %d negative slices; %d of each batch from %d + %d focus slices, %d a run of one scan, "
             "%d hard negatives", name, len(pos), len(neg), from_focus, len(focus_pos), len(focus_neg), from_run, from_hard)

    def adjacent_slices() -> list[tuple[Example, int]]:
        e = t.rng.choice(runs)
        length = min(len(e.images), from_run)
        start = t.rng.randrange(len(e.images) - length + 1)
        return [(e, i) for i in range(start, start + length)]

    def loss() -> torch.Tensor:
        run = adjacent_slices() if from_run else []
        hard = hard_negatives.draw(from_hard)
        chosen = (_balanced_slices(t.rng, focus_pos, focus_neg, from_focus, bleeding_share=bleeding_share)
                  + _balanced_slices(t.rng, pos, neg, batch - from_focus - len(run), [neg[i] for i in hard],
                                     bleeding_share=bleeding_share)
                  + run)
        x = torch.stack([e.images[i].float() for e, i in chosen]).to(t.device)  # float16 into autocast: .float() first
        x, grid = augment(x, aug, t.generator)
        y = torch.stack([e.slice_labels[i] for e, i in chosen]).to(t.device)
        pooled_end = len(chosen) - len(run)  # a run stays unmixed: its scan score is trained
        mixing = Mixing.draw(pooled_end, aug.mixup, t.rng) if aug.mixup > 0 else None
        if mixing is not None:
            x[:pooled_end], y[:pooled_end] = mixing(x[:pooled_end]), mixing(y[:pooled_end])
        fmap = cnn.encoder(x)
        logits, features = cnn.classify(fmap)
        if hard:  # after the focus part and the pooled part's bleeding slices (_balanced_slices)
            first_hard = from_focus + _bleeding_share(batch - from_focus - len(run), pos, bleeding_share)
            hard_negatives.update(hard, logits[first_hard:first_hard + len(hard), 0])
        total = F.binary_cross_entropy_with_logits(logits.float(), y, weight=_label_weights(t.device))
        if run:
            total = total + scan_score_loss(logits[-len(run):].float(), y[-len(run):], top_k)
        if fracture_head is not None:
            total = total + fracture_weight * fracture_loss(fracture_head, features, chosen, mixing, pooled_end)
        warped = [k for k, (e, _) in enumerate(chosen) if e.lesion is not None]
        known = _known_rows(chosen, lambda e: e.lesion is not None, mixing, pooled_end)
        if known:
            lesion = torch.zeros((len(chosen), *x.shape[-2:]), device=t.device)
            lesion[warped] = warp_masks(torch.stack([chosen[k][0].lesion[chosen[k][1]] for k in warped]).to(t.device), grid[warped])
            if mixing is not None:
                lesion[:pooled_end] = mixing(lesion[:pooled_end])
            fraction = F.adaptive_avg_pool2d(lesion[known][:, None], fmap.shape[-2:])
            total = total + F.binary_cross_entropy_with_logits(cnn.lesion_head(fmap[known]).float(), fraction)
        return total

    t.run(name, trained, steps, lr, loss, checkpoint,
          {"hard_negative_probability": hard_negatives.probability} if from_hard else None, ema_decay)


def _known_rows(chosen: Sequence[tuple[Example, int]], has_label: Callable[[Example], bool], mixing: Mixing | None,
                pooled_end: int) -> list[int]:
    """The batch rows whose slice has the label; a blend (a row before `pooled_end` when mixed) only
    where both of its slices have it."""
    rows = [k for k, (e, _) in enumerate(chosen) if has_label(e)]
    if mixing is None:
        return rows
    return [k for k in rows if k >= pooled_end or has_label(chosen[int(mixing.partner[k])][0])]


def fracture_loss(head: torch.nn.Module, features: torch.Tensor, chosen: Sequence[tuple[Example, int]],
                  mixing: Mixing | None, pooled_end: int) -> torch.Tensor:
    """Binary cross-entropy of `head`'s fracture logit on the batch rows whose slice has a fracture
    label (`_known_rows`), against the label blended as the slices were; 0 when no row has one."""
    rows = _known_rows(chosen, lambda e: e.slice_fracture is not None, mixing, pooled_end)
    if not rows:
        return features.new_zeros(())
    target = torch.tensor([float(e.slice_fracture[i]) if e.slice_fracture is not None else 0.0 for e, i in chosen],
                          device=features.device)
    if mixing is not None:
        target[:pooled_end] = mixing(target[:pooled_end])
    return F.binary_cross_entropy_with_logits(head(features[rows]).float()[:, 0], target[rows])


@torch.no_grad()
def reestimate_batch_norm(cnn: SliceCNN, scans: Sequence[Example], device: torch.device, batch: int, seed: int) -> int:
    """Replaces the batch-norm running statistics of `cnn` with their average over every slice of
    `scans` as prepared for inference (no augmentation, every channel), in shuffled batches of
    `batch` so that a batch spans patients; the weights stay as trained. Returns the slice count.

    Why: the fine-tuning batches that leave the running averages hold phantoms, brain-window-only
    slices and half bleeding slices, none of which is what a forwarded series looks like."""
    norms = [m for m in cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]  # the CNN's only normalisation
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    slices = [(e, i) for e in scans for i in range(len(e.images))]
    order = torch.randperm(len(slices), generator=torch.Generator().manual_seed(seed)).tolist()
    cnn.train()
    for start in range(0, len(order), batch):
        chosen = [slices[k] for k in order[start:start + batch]]
        cnn(torch.stack([e.images[i].float() for e, i in chosen]).to(device))
    cnn.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return len(slices)


@torch.no_grad()
def cnn_features(ensemble: Ensemble, e: Example, device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, probs = [], []
    for chunk in torch.split(e.images, batch):
        logits, f = ensemble.cnn(chunk.float().to(device))
        feats.append(f.float().cpu())
        probs.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(feats), torch.cat(probs)


def train_sequence(ensemble: Ensemble, data: list[Example], t: Trainer, steps: int, lr: float, batch: int) -> float:
    ensemble.cnn.eval()
    cached = [(e, *cnn_features(ensemble, e, t.device, batch)) for e in data]
    explained = ensemble.sequence.fit_pca(torch.cat([f for _, f, _ in cached]).numpy())
    log.info("PCA to %d components explains %.1f%% of the CNN feature variance", ensemble.sequence.pca_basis.shape[0], 100 * explained)

    def loss() -> torch.Tensor:
        e, feats, probs = t.rng.choice(cached)
        logits = ensemble.sequence(feats[None].to(t.device), probs[None].to(t.device))[0].float()
        if e.slice_labels is not None:
            return F.binary_cross_entropy_with_logits(logits, e.slice_labels.to(t.device), weight=_label_weights(t.device))
        return F.binary_cross_entropy_with_logits(logits.amax(dim=0), e.scan_labels.to(t.device), weight=_label_weights(t.device))

    t.run("CNN+BiLSTM", ensemble.sequence, steps, lr, loss)
    return explained


def train_mil(ensemble: Ensemble, data: list[Example], t: Trainer, steps: int, lr: float) -> None:
    """Scan labels only. With the same encoder shape as the slice CNN, the encoder starts from the
    CNN's weights (paper 000 starts from a pretrained ResNet-18; we have no downloaded weights)."""
    if ensemble.cfg.mil == ensemble.cfg.cnn:
        ensemble.mil.encoder.load_state_dict(ensemble.cnn.encoder.state_dict())
    pos = [e for e in data if e.scan_labels[0] >= 0.5]
    neg = [e for e in data if e.scan_labels[0] < 0.5]

    def loss() -> torch.Tensor:
        e = t.rng.choice(pos if (pos and (t.rng.random() < 0.5 or not neg)) else neg)
        flip = t.coin()
        logits, _ = ensemble.mil(_flip(e.images.float(), flip).to(t.device))
        return F.binary_cross_entropy_with_logits(logits.float(), e.scan_labels.to(t.device), weight=_label_weights(t.device))

    t.run("attention MIL", ensemble.mil, steps, lr, loss)


def _unet_pool(data: list[Example], member: str) -> tuple[list, list, list]:
    """(positive slices with masks, slices known to hold no blood, positive slices without masks)
    the U-Net `member` trains on. Slice labels without masks (CT-ICH) still teach it: a slice
    labelled free of hemorrhage is an all-zero target, a positive one a weak (top-k) target.
    Brain-window-only slices are left out: the U-Nets see no channel dropout."""
    data = [e for e in data if e.full_hu]
    column = {"all": 0, "sdh": SUBTYPES.index("SDH") + 1, "sah": SUBTYPES.index("SAH") + 1, "small": None}[member]
    keep = {
        "all": lambda e: True,
        "small": lambda e: 0 < e.lesion_ml <= SMALL_LESION_ML,
    }.get(member, lambda e: e.scan_labels[column] >= 0.5)  # a subtype specialist: scans with its subtype
    pos = [(e, i) for e in data if e.lesion is not None and keep(e) for i in range(len(e.images)) if e.lesion[i].amax() > 0.5]
    neg = [(e, i) for e in data if e.slice_labels is not None for i in range(len(e.images)) if e.slice_labels[i, 0] == 0]
    weak = [] if column is None else [
        (e, i) for e in data if e.lesion is None and e.slice_labels is not None
        for i in range(len(e.images)) if e.slice_labels[i, column] > 0
    ]
    return pos, neg, weak


def _lesion_target(e: Example, i: int) -> torch.Tensor:
    """The soft lesion mask of slice i; zeros for a slice labelled free of blood without masks."""
    return e.lesion[i] if e.lesion is not None else torch.zeros(e.images.shape[-2:])


def _subtype_target(e: Example, i: int) -> torch.Tensor:
    return e.subtype[i] if e.subtype is not None else torch.full(e.images.shape[-2:], -1, dtype=torch.long)


def _patch_origin(e: Example, i: int, patch: int, rng: random.Random) -> tuple[int, int]:
    """Top-left of a training patch: around a random lesion pixel when the slice has one."""
    size = e.images.shape[-1]
    lesion = torch.nonzero(_lesion_target(e, i) > 0.5)
    if len(lesion):
        r, c = lesion[rng.randrange(len(lesion))].tolist()
        r, c = r - patch // 2 + rng.randint(-patch // 4, patch // 4), c - patch // 2 + rng.randint(-patch // 4, patch // 4)
    else:
        r, c = rng.randint(0, size - patch), rng.randint(0, size - patch)
    return min(max(r, 0), size - patch), min(max(c, 0), size - patch)


def train_unets(ensemble: Ensemble, data: list[Example], t: Trainer, steps: int, specialist_steps: int, batch: int, lr: float, patch: int) -> None:
    """U-Nets train on patch x patch crops at their own resolution (fully convolutional, so they
    run on whole slices later): more updates for the same CPU time. Positive slices without masks
    add a whole-slice weak term: the mean of the WEAK_TOP_K highest lesion logits should say
    "blood here"."""
    scale = ensemble.cfg.unet_scale
    size = ensemble.cfg.working_size
    crop = min(patch * scale or size, size)  # at working size
    for member in UNET_MEMBERS:
        unet = ensemble.unets[member]
        pos, neg, weak = _unet_pool(data, member)
        if member != "all":
            # specialists start from the all-ICH U-Net (its lesion output), then see only their cases
            source = ensemble.unets["all"].state_dict()
            source["out.weight"], source["out.bias"] = source["out.weight"][:1], source["out.bias"][:1]
            unet.load_state_dict(source)
        if not pos:
            log.warning("U-Net %s: no positive slices with masks; left as initialised", member)
            continue
        log.info("U-Net %s: %d positive slices with masks, %d negative, %d weak positive", member, len(pos), len(neg), len(weak))

        def loss(unet=unet, pos=pos, neg=neg, weak=weak, multi=member == "all") -> torch.Tensor:
            chosen = _balanced_slices(t.rng, pos, neg, batch)
            flip = t.coin()
            crops = [(e, i, *_patch_origin(e, i, crop, t.rng)) for e, i in chosen]
            x = torch.stack([e.images[i, :, r:r + crop, c:c + crop].float() for e, i, r, c in crops])
            target = torch.stack([_lesion_target(e, i)[r:r + crop, c:c + crop] for e, i, r, c in crops])
            x = ensemble.unet_input(_flip(x, flip).to(t.device))
            target = ensemble.unet_input(_flip(target, flip)[:, None].to(t.device))[:, 0]
            logits = unet(x).float()
            total = dice_loss(torch.sigmoid(logits[:, 0]), target) + F.binary_cross_entropy_with_logits(logits[:, 0], target)
            if multi:
                sub = torch.stack([_subtype_target(e, i)[r:r + crop:scale, c:c + crop:scale] for e, i, r, c in crops])
                sub = _flip(sub, flip).to(t.device)
                if (sub >= 0).any():
                    total = total + F.cross_entropy(logits[:, 1:], sub, ignore_index=-1)
            if weak:
                picked = [t.rng.choice(weak) for _ in range(max(1, batch // WEAK_FRACTION))]
                whole = ensemble.unet_input(_flip(torch.stack([e.images[i].float() for e, i in picked]), flip).to(t.device))
                top = unet(whole).float()[:, 0].flatten(1).topk(WEAK_TOP_K, dim=1).values.mean(dim=1)
                total = total + F.binary_cross_entropy_with_logits(top, torch.ones_like(top))
            return total

        t.run(f"U-Net {member}", unet, steps if member == "all" else specialist_steps, lr, loss)


def train_fusion(ensemble: Ensemble, data: list[Example], t: Trainer, steps: int, batch: int, lr: float) -> None:
    known = [e for e in data if e.lesion is not None]
    if not known:
        log.warning("pixel weight fusion: no slices with masks; left as initialised")
        return
    with torch.no_grad():
        maps = torch.cat([
            ensemble.unet_maps(chunk.float().to(t.device))[0].half().cpu() for e in known for chunk in torch.split(e.images, batch)
        ])
    targets = torch.cat([e.lesion for e in known])
    pos = [i for i in range(len(targets)) if targets[i].amax() > 0.5]
    neg = [i for i in range(len(targets)) if targets[i].amax() <= 0.5]

    def loss() -> torch.Tensor:
        idx = _balanced_slices(t.rng, pos, neg, batch)
        fused, _ = ensemble.fusion(maps[idx].float().to(t.device))
        return dice_loss(fused, targets[idx].to(t.device))

    t.run("pixel weight fusion", ensemble.fusion, steps, lr, loss)


@torch.no_grad()
def member_logits(ensemble: Ensemble, e: Example, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scan logits (6, members), slice CNN logits (slices, 6)) of one example, on the CPU."""
    ensemble.eval()
    out = ensemble.run_members(e.images.float().to(device))
    return ensemble.scan_member_logits(out, e.inside).cpu(), out.cnn_logits.cpu()


def fit_combiner(ensemble: Ensemble, data: list[Example], device: torch.device) -> None:
    logits = torch.stack([member_logits(ensemble, e, device)[0] for e in data])
    labels = torch.stack([(e.scan_labels >= 0.5).float() for e in data])
    ensemble.combiner.fit(logits, labels)
    log.info("combiner: equal member weights, calibrated on %d validation scans (%d positive)", len(data), int(labels[:, 0].sum()))


def apply_calibration(ensemble: Ensemble | FoldBag, path: Path) -> None:
    """Member weights and per-label Platt terms from a cross-validation run's calibration.json."""
    calibration = json.loads(Path(path).read_text())
    if list(calibration["members"]) != list(SCAN_MEMBERS):
        raise ValueError(f"{path}: members {calibration['members']} are not this ensemble's {list(SCAN_MEMBERS)}")
    ensemble.combiner.calibrate(torch.tensor(calibration["weights"]), [calibration["platt"][label] for label in LABELS])
    log.info("combiner: member weights %s and calibration from %s", calibration["weights"], path)


# ---------------------------------------------------------------------------------------------
# the whole recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """Examples at working size: scans (all members), single slices (slice CNN), validation scans."""

    train: list[Example]
    slices: list[Example]
    validation: list[Example]
    mil_labels: dict[str, np.ndarray]  # scan_id -> soft scan labels from reports, for the MIL

    def without_patients(self, patients: set[str]) -> "TrainingData":
        return replace(self, train=[e for e in self.train if e.patient_id not in patients])


def setup(cfg: TrainingConfig) -> torch.device:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(cfg.run.threads or min(2, os.cpu_count() or 1))
    torch.manual_seed(cfg.run.seed)
    np.random.seed(cfg.run.seed)
    return resolve_device(cfg.run.device)


def load_training_data(cfg: TrainingConfig) -> tuple[TrainingData, dict[str, list[Scan]]]:
    """Every example the config names, preprocessed once; and the training scans of each `[data] train` spec."""
    from training import datasets

    started = time.monotonic()
    model = cfg.ensemble()
    by_spec = {spec: load_scans(spec) for spec in cfg.data.train}
    scans = [s for spec_scans in by_spec.values() for s in spec_scans]
    if cfg.data.validation:
        train_scans, val_scans = scans, [s for spec in cfg.data.validation for s in load_scans(spec)]
    else:
        train_scans, val_scans = datasets.split_by_patient(scans, cfg.data.validation_fraction, seed=cfg.run.seed)
    slices = [make_example(s, model) for spec in cfg.data.slices for s in load_scans(spec)]
    data = TrainingData(
        train=[make_example(s, model) for s in train_scans],
        slices=slices,
        validation=[make_example(s, model) for s in val_scans],
        mil_labels=report_labels(train_scans) if cfg.mil.label_source == "reports" else {},
    )
    log.info("%d training scans, %d single slices, %d validation scans, preprocessed in %.0f s",
             len(data.train), len(data.slices), len(data.validation), time.monotonic() - started)
    return data, by_spec


def train_ensemble(cfg: TrainingConfig, data: TrainingData, device: torch.device, checkpoints: Path | None,
                   pretrain_checkpoint: Path | None = None, members: tuple[str, ...] = SCAN_MEMBERS) -> tuple[Ensemble, float]:
    """Stages 0-5 of the module docstring on `data`; returns the ensemble and the PCA's explained variance.

    pretrain_checkpoint: where stage 0 of the first slice CNN is kept (a further input's beside it).
    members: the scan members to train (a cross-validation may train the slice CNN alone); the
    others stay as initialised, and explained variance is 0 without the BiLSTM."""
    ensemble = Ensemble(cfg.ensemble()).to(device)
    stages, aug = cfg.stages, cfg.augmentation()
    t = Trainer(device, cfg.run.seed, checkpoints, cfg.run.checkpoint_seconds, cfg.run.mixed_precision, stages.weight_decay)
    general = [e for e in data.train if e.lesion is not None] + data.slices  # no CT-ICH patient
    patients = [e for e in data.train if e.lesion is None]  # real scans: phantoms carry voxel masks
    focus = [e for e in patients if is_child(e.age_years)] if stages.cnn_focus == "children" else patients
    unet_bleeds = stages.synthetic_bleeds if "unet_ensemble" in members else 0
    # one draw for both: a shorter draw is the start of a longer one (the same seed)
    synthetic = synthetic_examples(data.train, max(unet_bleeds, stages.cnn_synthetic_bleeds), cfg.run.seed)
    cnn_data = data.train + data.slices + synthetic[: stages.cnn_synthetic_bleeds]
    unet_synthetic = synthetic[:unet_bleeds]
    pretrained: dict[str, dict[str, torch.Tensor]] = {}  # by the name of the pre-training
    for replica, cnn in enumerate(ensemble.slice_cnns, start=1):  # a bag: a seed each
        channels = cnn.encoder.channels
        trainer = t if replica == 1 else Trainer(device, cfg.run.seed + replica - 1, checkpoints,
                                                 cfg.run.checkpoint_seconds, cfg.run.mixed_precision, stages.weight_decay)
        if replica > 1 and stages.cnn_bag_pretraining == "per_cnn":
            suffix = f"cnn_{replica}"
        else:
            suffix = "" if channels == ensemble.slice_cnns[0].encoder.channels else f"{channels}_channels"
        if suffix not in pretrained:  # (folds of a cross-validation share these checkpoints)
            name, kept = "slice CNN pre-training", pretrain_checkpoint
            if suffix:
                name += f", {suffix.replace('_', ' ')}"
                kept = None if kept is None else kept.with_stem(f"{kept.stem}_{suffix}")
            if stages.cnn_pretrain_steps:
                train_slice_cnn(name, cnn, general, trainer, stages.cnn_pretrain_steps, stages.batch, stages.lr,
                                aug.for_pretraining(), kept)
            pretrained[suffix] = {k: v.clone() for k, v in cnn.state_dict().items()}
        cnn.load_state_dict(pretrained[suffix])
        train_slice_cnn("slice CNN" if replica == 1 else f"slice CNN {replica}", cnn, cnn_data, trainer,
                        stages.cnn_steps, stages.batch, stages.lr, aug, focus=focus, focus_share=stages.cnn_patient_share,
                        run_share=stages.cnn_run_share, top_k=ensemble.cfg.slice_top_k,
                        hard_negative_share=stages.cnn_hard_negative_share, ema_decay=stages.cnn_ema_decay,
                        bleeding_share=stages.cnn_bleeding_share, fracture_weight=stages.cnn_fracture_weight)
        if stages.cnn_batch_norm == "patients":
            count = reestimate_batch_norm(cnn, patients, device, stages.batch, cfg.run.seed + replica - 1)
            log.info("slice CNN %d: batch-norm statistics re-estimated on %d slices of %d patients' scans",
                     replica, count, len(patients))
    explained = 0.0
    if "cnn_lstm" in members:
        explained = train_sequence(ensemble, data.train, t, stages.lstm_steps, stages.lr, stages.batch)
    if "attention_mil" in members:
        _train_mil_on_report_labels(ensemble, data, t, stages)
    if "unet_ensemble" in members:
        log.info("U-Nets: %d slices with synthesised bleeds on real anatomy", len(unet_synthetic))
        train_unets(ensemble, data.train + unet_synthetic, t, stages.unet_steps, stages.specialist_steps, stages.batch, stages.lr, stages.unet_patch)
        train_fusion(ensemble, data.validation or data.train, t, stages.fusion_steps, stages.batch, stages.lr)
    return ensemble, explained


def _train_mil_on_report_labels(ensemble: Ensemble, data: TrainingData, t: Trainer, stages: StagesSection) -> None:
    """The MIL on scan labels, from report text where `data.mil_labels` has them."""
    mil_train = [
        replace(e, scan_labels=torch.as_tensor(data.mil_labels[e.scan_id])) if e.scan_id in data.mil_labels else e
        for e in data.train
    ]
    train_mil(ensemble, mil_train, t, stages.mil_steps, stages.lr)


def bag_fold_models(cfg: TrainingConfig, device: torch.device, config_path: Path) -> tuple[FoldBag, dict]:
    """The cross-validation's fold models as one FoldBag, and what the manifest says of their training."""
    dirs = [cfg.fold_model_dir(k) for k in range(cfg.cv.folds)]
    for d in dirs:
        if not (d / MANIFEST).is_file():
            raise FileNotFoundError(
                f"{config_path}: [output] fold_bag needs the fold models; none in {d}: "
                f"run `ichnode evaluate --cv --config {config_path}` first (it trains them)"
            )
    loaded = [load_model(d, device) for d in dirs]
    training_data = {
        "fold_bag": [str(d) for d in dirs],
        "heldout_by_fold": [m["training_data"].get("heldout", []) for _, m in loaded],
    }
    return FoldBag.of([ensemble for ensemble, _ in loaded]), training_data


def train_main(config_path: Path, overrides: Sequence[str] = ()) -> None:
    """Train (or, with [output] fold_bag, bag the cross-validation's fold models), save weights +
    manifest into [output].dir, then evaluate on [evaluate].data."""
    from training.evaluate import evaluate_main

    cfg = load_training_config(config_path, overrides)
    device = setup(cfg)
    started = time.monotonic()
    training_data = {"train": cfg.data.train, "slices": cfg.data.slices, "validation": cfg.data.validation}
    if cfg.output.fold_bag:
        ensemble, bag_data = bag_fold_models(cfg, device, config_path)
        training_data.update(bag_data)
    else:
        data, _ = load_training_data(cfg)
        checkpoints = Path(cfg.run.checkpoints) / "final" if cfg.run.checkpoints else None
        pretrain = Path(cfg.run.checkpoints) / "slice_CNN_pretraining.pt" if cfg.run.checkpoints else None
        ensemble, explained = train_ensemble(cfg, data, device, checkpoints, pretrain)
        training_data.update({
            "train_scans": len(data.train),
            "train_slices": len(data.slices),
            "validation_scans": len(data.validation),
            "patients": sorted({e.patient_id for e in data.train}),
            "mil_labels_from_reports": len(data.mil_labels),
            "pca_explained_variance": round(explained, 4),
        })
        if not cfg.evaluate.calibration:
            fit_combiner(ensemble, data.validation or data.train, device)
    if cfg.evaluate.calibration:
        apply_calibration(ensemble, Path(cfg.evaluate.calibration))
    training_data.update({
        "calibration": cfg.evaluate.calibration or "validation scans",
        "training_minutes": round((time.monotonic() - started) / 60, 1),
        "config": str(config_path),
        "overrides": list(overrides),
    })
    model_dir = Path(cfg.output.dir)
    save_model(ensemble, model_dir, cfg.output.name, cfg.output.version, training_data, {})
    log.info("weights written to %s (%.1f min)", model_dir, (time.monotonic() - started) / 60)
    for spec in cfg.evaluate.data:
        report_dir = cfg.evaluation_dir / spec.replace(":", "_").replace(",", "_").replace("=", "")
        metrics = evaluate_main(spec, model_dir, report_dir)
        update_metrics(model_dir, {spec: metrics["summary"]})
