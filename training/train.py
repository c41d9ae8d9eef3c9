"""`ichnode train --config FILE`: train the ensemble detector from a TOML config.

Stages, each on the training split (by patient) unless said otherwise:
1. slice CNN on slice labels (balanced positive/negative slices);
2. PCA of the CNN features, then the BiLSTM over whole scans (slice labels, or the scan label
   against the max over slices when a scan has no slice labels);
3. attention MIL on scan labels only (from report text through training.labels when asked);
4. all-ICH U-Net with subtype head, then the SDH, SAH and small-lesion specialists fine-tuned from it;
5. pixel weight fusion of the U-Nets on the validation split (Dice loss, paper 003);
6. the calibrating combiner on the validation split;
then the weights and manifest are written and the `[evaluate]` data sets are scored.
"""
from __future__ import annotations

import logging
import os
import random
import time
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from training.data import Scan
from worker.detector import LABELS, SUBTYPES
from worker.detector.detector import resolve_device
from worker.detector.ensemble import UNET_MEMBERS, Ensemble, EnsembleConfig
from worker.detector.preprocess import masks_to_working, prepare
from worker.detector.store import save_model, update_metrics

log = logging.getLogger("ichnode.train")

CTICH_ROOT = Path("/work/shared/data/ct-ich")
CTICH_HELDOUT_FRACTION = 0.3  # of the 50 CT-ICH patients, kept out of training for evaluation
CTICH_SPLIT_SEED = 20261123
SMALL_LESION_ML = 5.0  # the small-lesion specialist's cases (paper 003)
WEAK_TOP_K = 16  # pixels whose mean lesion logit stands for a whole weakly labelled slice
WEAK_FRACTION = 8  # one weakly labelled whole slice per this many patches


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


def _parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'kind:arg,key=value,...' -> (kind, arg, options); a bare path is ('folder', path, {})."""
    kind, sep, rest = spec.partition(":")
    if not sep or os.sep in kind:
        return "folder", spec, {}
    arg, options = "", {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if eq:
            options[key.strip()] = value.strip()
        else:
            arg = part.strip()
    return kind, arg, options


def load_scans(spec: str) -> list[Scan]:
    """Scans named by a data spec.

    - ``phantom:seed=S,n=N[,matrix=M,slices=K]``: N synthetic studies from helper phantoms;
    - ``ctich:train`` / ``ctich:heldout`` / ``ctich:all`` (optionally ``root=DIR``): the CT-ICH
      patients, split by patient with a fixed seed so held-out patients never reach training;
      ``ctich:all,patients=49+57`` loads only the patients with those numbers (not combinable
      with train / heldout, whose split is drawn over all patients);
    - ``rsna:DIR``, ``cq500:DIR``: those datasets' adapters;
    - a folder: CT-ICH layout if it holds hemorrhage_diagnosis.csv, else written phantom studies.
    """
    from training import datasets

    kind, arg, opt = _parse_spec(spec)
    if kind == "phantom":
        return datasets.phantom_scans(
            seed=int(opt.get("seed", 0)),
            n=int(opt.get("n", 20)),
            matrix=int(opt.get("matrix", 128)),
            n_slices=int(opt.get("slices", 24)),
        )
    if kind == "ctich":
        root = Path(opt.get("root", CTICH_ROOT))
        if "patients" in opt:
            if arg not in ("", "all"):
                raise ValueError(f"{spec!r}: patients= selects from ctich:all, not from the {arg} split")
            return datasets.ctich_scans(root, [int(n) for n in opt["patients"].split("+")])
        scans = datasets.ctich_scans(root)
        if arg in ("", "all"):
            return scans
        train, heldout = datasets.split_by_patient(scans, CTICH_HELDOUT_FRACTION, seed=CTICH_SPLIT_SEED)
        return {"train": train, "heldout": heldout}[arg]
    if kind == "rsna":
        return list(datasets.rsna_scans(Path(arg)))
    if kind == "cq500":
        return list(datasets.cq500_scans(Path(arg)))
    if kind == "folder":
        root = Path(arg)
        if (root / "hemorrhage_diagnosis.csv").is_file():
            return datasets.ctich_scans(root)
        return datasets.folder_scans(root)
    raise ValueError(f"unknown data spec {spec!r}")


@dataclass
class Example:
    """One scan at working size, as the training stages consume it."""

    scan_id: str
    images: torch.Tensor  # (slices, 3, s, s)
    scan_labels: torch.Tensor  # (6,) 0..1
    slice_labels: torch.Tensor | None  # (slices, 6)
    lesion: torch.Tensor | None  # (slices, s, s) soft, None when the masks are unknown
    subtype: torch.Tensor | None  # (slices, s, s) index into SUBTYPES of the lesion there, -1 elsewhere
    lesion_ml: float
    inside: torch.Tensor  # (slices, s, s) bool: the intracranial region, where scan scores look


def make_example(scan: Scan, size: int) -> Example:
    """A scan through the same preprocessing as inference; masks are mapped with the same crop.

    A negative scan without masks has known empty masks and slice labels.
    """
    prepared = prepare(scan.volume.hu, size)
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
        soft = torch.stack([masks_to_working(m, prepared.crop, size) for m in stack])  # (5, slices, s, s)
        lesion = soft.amax(dim=0).clamp(0, 1)
        subtype = torch.where(lesion > 0.5, soft.argmax(dim=0), torch.full_like(lesion, -1, dtype=torch.long))
        if slice_labels is None:
            per_slice = np.concatenate([union[None], stack]).any(axis=(2, 3)).T  # (slices, 6)
            slice_labels = torch.as_tensor(per_slice, dtype=torch.float32)
    elif negative:
        lesion = torch.zeros(n, size, size)
        subtype = torch.full(lesion.shape, -1, dtype=torch.long)
        if slice_labels is None:
            slice_labels = torch.zeros(n, len(LABELS))
    return Example(scan.scan_id, prepared.images, labels, slice_labels, lesion, subtype, lesion_ml, prepared.inside_working)


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


class Trainer:
    """Adam with autocast + gradient scaling on CUDA; logs progress on stderr."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.rng = random.Random(seed)

    def run(self, name: str, module: torch.nn.Module, steps: int, lr: float, loss_fn: Callable[[], torch.Tensor]) -> float:
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        optimiser = torch.optim.Adam(params, lr=lr)
        scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(steps, 1))
        start, running = time.monotonic(), None
        for step in range(1, steps + 1):
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.cuda):
                loss = loss_fn()
            optimiser.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()
            schedule.step()
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            if step % max(1, steps // 10) == 0 or step == steps:
                log.info("%s: step %d/%d loss %.4f (%.0f s)", name, step, steps, running, time.monotonic() - start)
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


def _balanced_slices(rng: random.Random, positives: list, negatives: list, batch: int) -> list:
    half = batch // 2 if positives else 0
    chosen = [rng.choice(positives) for _ in range(half)] if positives else []
    return chosen + [rng.choice(negatives or positives) for _ in range(batch - len(chosen))]


def train_slice_cnn(ensemble: Ensemble, data: list[Example], t: Trainer, steps: int, batch: int, lr: float) -> None:
    """Slice labels, plus the auxiliary lesion-fraction map on slices whose masks are known."""
    pool = [(e, i) for e in data if e.slice_labels is not None for i in range(len(e.images))]
    pos = [p for p in pool if p[0].slice_labels[p[1], 0] > 0]
    neg = [p for p in pool if p[0].slice_labels[p[1], 0] == 0]
    cnn = ensemble.cnn

    def loss() -> torch.Tensor:
        chosen = _balanced_slices(t.rng, pos, neg, batch)
        flip = t.coin()
        x = _flip(torch.stack([e.images[i] for e, i in chosen]), flip).to(t.device)
        y = torch.stack([e.slice_labels[i] for e, i in chosen]).to(t.device)
        fmap = cnn.encoder(x)
        logits, _ = cnn.classify(fmap)
        total = F.binary_cross_entropy_with_logits(logits.float(), y, weight=_label_weights(t.device))
        known = [k for k, (e, _) in enumerate(chosen) if e.lesion is not None]
        if known:
            lesion = _flip(torch.stack([chosen[k][0].lesion[chosen[k][1]] for k in known]), flip).to(t.device)
            fraction = F.adaptive_avg_pool2d(lesion[:, None], fmap.shape[-2:])
            total = total + F.binary_cross_entropy_with_logits(cnn.lesion_head(fmap[known]).float(), fraction)
        return total

    t.run("slice CNN", cnn, steps, lr, loss)


def _label_weights(device: torch.device) -> torch.Tensor:
    """RSNA weighting: 'any' counts twice."""
    return torch.tensor([2.0, 1, 1, 1, 1, 1], device=device) / 7 * 6


@torch.no_grad()
def cnn_features(ensemble: Ensemble, e: Example, device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats, probs = [], []
    for chunk in torch.split(e.images, batch):
        logits, f = ensemble.cnn(chunk.to(device))
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
        logits, _ = ensemble.mil(_flip(e.images, flip).to(t.device))
        return F.binary_cross_entropy_with_logits(logits.float(), e.scan_labels.to(t.device), weight=_label_weights(t.device))

    t.run("attention MIL", ensemble.mil, steps, lr, loss)


def _unet_pool(data: list[Example], member: str) -> tuple[list, list, list]:
    """(positive slices with masks, slices known to hold no blood, positive slices without masks)
    the U-Net `member` trains on. Slice labels without masks (CT-ICH) still teach it: a slice
    labelled free of hemorrhage is an all-zero target, a positive one a weak (top-k) target."""
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
    return e.lesion[i] if e.lesion is not None else e.images.new_zeros(e.images.shape[-2:])


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
    """U-Nets train on patch x patch crops (fully convolutional, so they run on whole slices later):
    more updates for the same CPU time. Positive slices without masks add a whole-slice weak term:
    the mean of the WEAK_TOP_K highest lesion logits should say "blood here"."""
    patch = min(patch or ensemble.cfg.working_size, ensemble.cfg.working_size)
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
            crops = [(e, i, *_patch_origin(e, i, patch, t.rng)) for e, i in chosen]
            x = _flip(torch.stack([e.images[i, :, r:r + patch, c:c + patch] for e, i, r, c in crops]), flip).to(t.device)
            target = _flip(torch.stack([_lesion_target(e, i)[r:r + patch, c:c + patch] for e, i, r, c in crops]), flip).to(t.device)
            logits = unet(x).float()
            total = dice_loss(torch.sigmoid(logits[:, 0]), target) + F.binary_cross_entropy_with_logits(logits[:, 0], target)
            if multi:
                sub = _flip(torch.stack([
                    e.subtype[i, r:r + patch, c:c + patch] if e.subtype is not None else torch.full((patch, patch), -1)
                    for e, i, r, c in crops
                ]), flip).to(t.device)
                if (sub >= 0).any():
                    total = total + F.cross_entropy(logits[:, 1:], sub, ignore_index=-1)
            if weak:
                picked = [t.rng.choice(weak) for _ in range(max(1, batch // WEAK_FRACTION))]
                whole = _flip(torch.stack([e.images[i] for e, i in picked]), flip).to(t.device)
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
        maps = torch.cat([ensemble.unet_maps(chunk.to(t.device))[0].cpu() for e in known for chunk in torch.split(e.images, batch)])
    targets = torch.cat([e.lesion for e in known])
    pos = [i for i in range(len(targets)) if targets[i].amax() > 0.5]
    neg = [i for i in range(len(targets)) if targets[i].amax() <= 0.5]

    def loss() -> torch.Tensor:
        idx = _balanced_slices(t.rng, pos, neg, batch)
        fused, _ = ensemble.fusion(maps[idx].to(t.device))
        return dice_loss(fused, targets[idx].to(t.device))

    t.run("pixel weight fusion", ensemble.fusion, steps, lr, loss)


def fit_combiner(ensemble: Ensemble, data: list[Example], device: torch.device) -> None:
    ensemble.eval()
    logits = torch.stack([ensemble.scan_member_logits(ensemble.run_members(e.images.to(device)), e.inside).cpu() for e in data])
    labels = torch.stack([(e.scan_labels >= 0.5).float() for e in data])
    ensemble.combiner.fit(logits, labels)
    log.info("combiner fit on %d validation scans (%d positive)", len(data), int(labels[:, 0].sum()))


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _setup(run: dict) -> torch.device:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    threads = int(run.get("threads", 0)) or min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    seed = int(run.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed)
    return resolve_device(run.get("device", "auto"))


def train_main(config_path: Path) -> None:
    """Train, save weights + manifest into [output].dir, then evaluate on [evaluate].data."""
    from training import datasets
    from training.evaluate import evaluate_main

    cfg = tomllib.loads(Path(config_path).read_text())
    run, stages, out = cfg.get("run", {}), cfg.get("stages", {}), cfg["output"]
    device = _setup(run)
    started = time.monotonic()
    model_cfg = EnsembleConfig.from_dict(cfg.get("model", {}))
    ensemble = Ensemble(model_cfg).to(device)

    scans = [s for spec in cfg["data"]["train"] for s in load_scans(spec)]
    train_scans, val_scans = datasets.split_by_patient(scans, float(cfg["data"].get("validation_fraction", 0.2)), seed=int(run.get("seed", 0)))
    log.info("%d training scans, %d validation scans (split by patient)", len(train_scans), len(val_scans))
    from_reports = report_labels(train_scans) if cfg.get("mil", {}).get("label_source") == "reports" else {}
    size = model_cfg.working_size
    train = [make_example(s, size) for s in train_scans]
    val = [make_example(s, size) for s in val_scans]
    mil_train = [
        replace(e, scan_labels=torch.as_tensor(from_reports[e.scan_id])) if e.scan_id in from_reports else e
        for e in train
    ]
    log.info("preprocessed in %.0f s (%d scans labelled from reports for MIL)", time.monotonic() - started, len(from_reports))

    t = Trainer(device, int(run.get("seed", 0)))
    batch = int(stages.get("batch", 16))
    lr = float(stages.get("lr", 1e-3))
    train_slice_cnn(ensemble, train, t, int(stages.get("cnn_steps", 300)), batch, lr)
    explained = train_sequence(ensemble, train, t, int(stages.get("lstm_steps", 300)), lr, batch)
    train_mil(ensemble, mil_train, t, int(stages.get("mil_steps", 300)), lr)
    train_unets(
        ensemble, train, t, int(stages.get("unet_steps", 300)), int(stages.get("specialist_steps", 100)), batch, lr,
        int(stages.get("unet_patch", 0)),
    )
    train_fusion(ensemble, val or train, t, int(stages.get("fusion_steps", 100)), batch, lr)
    fit_combiner(ensemble, val or train, device)

    training_data = {
        "train": cfg["data"]["train"],
        "train_scans": len(train_scans),
        "validation_scans": len(val_scans),
        "patients": sorted({s.patient_id for s in scans}),
        "mil_labels_from_reports": len(from_reports),
        "pca_explained_variance": round(explained, 4),
        "training_minutes": round((time.monotonic() - started) / 60, 1),
        "config": str(config_path),
    }
    model_dir = Path(out["dir"])
    save_model(ensemble, model_dir, out.get("name", "ichnode-ensemble"), out.get("version", "0"), training_data, {})
    log.info("weights written to %s (%.1f min)", model_dir, (time.monotonic() - started) / 60)
    for spec in cfg.get("evaluate", {}).get("data", []):
        report_dir = Path(cfg["evaluate"].get("out", model_dir / "evaluation")) / spec.replace(":", "_").replace(",", "_").replace("=", "")
        metrics = evaluate_main(spec, model_dir, report_dir)
        update_metrics(model_dir, {spec: metrics["summary"]})
