"""The ensemble: members run on one prepared volume, then fused into a :class:`DetectorOutput`.

Choices worth knowing:
- Scan probabilities: a weighted mean of four members' scan logits, Platt-calibrated per label
  (`members.Combiner`; weights and calibration come from out-of-fold predictions on real scans):
  the slice CNN (mean of its `slice_top_k` highest slice logits), CNN+BiLSTM (max over slices),
  attention MIL, and the fused U-Net map (max of the 3x3-smoothed voxel probability inside the
  intracranial region; for a subtype, of voxel probability x subtype share), so a scan score
  never rests on what the masks may not show.
- The U-Nets work at 1/`unet_scale` of the working size (their maps are upsampled back): the
  classifiers need the full resolution more than the segmentation does, and the CPU budget holds.
- The slice CNN and the U-Nets see each slice and its left-right mirror image and average the two
  (test-time augmentation, matching the flips seen in training): steadier slice scores, fewer
  isolated false-positive voxels.
- The slice CNN member may be a bag of CNNs (`cnn`, then one per `cnn_bag_channels` entry, each
  reading that many leading channels: e.g. the three windows and the 2.5D input): their logits
  and Grad-CAMs are averaged. On 50 patients one CNN's scan ranking moves by 0.1 AUC from draw to
  draw; the average of draws moves less. The BiLSTM reads the features of `cnn` alone (features
  of separately trained CNNs do not align).
- Per-slice scores (key slices, the heatmap's Grad-CAM scaling) are the slice CNN's per-slice
  probabilities: in cross-validation on CT-ICH it ranks slices far better than the BiLSTM does.
- The subtype of a segmented voxel comes from the multi-class head of the all-ICH U-Net (softmax over
  the five subtypes), so subtype masks are disjoint and their union is the "any" mask.
- Heatmap = max(fused U-Net voxel probability, Grad-CAM of the slice CNN x that slice's p(any)).
  The detector zeroes heatmap and lesion masks outside `preprocess.intracranial_mask` on the
  volume grid.
- A :class:`FoldBag` holds the ensembles that the folds of a cross-validation trained and
  averages their member outputs before the one combiner (bagging): each fold model saw four
  fifths of the patients, together they saw all, and the average is steadier on a small
  training set than any one of them.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from worker.detector.members import (
    AttentionMIL,
    Combiner,
    PixelWeightFusion,
    ResNeXtConfig,
    SliceCNN,
    SliceSequenceModel,
    UNet,
)
from worker.detector.preprocess import CHANNELS, CONTEXT_WINDOWS, HEAD_CROPS, WINDOW_CHANNELS, WINDOWS, Prepared, prepare

UNET_MEMBERS: tuple[str, ...] = ("all", "sdh", "sah", "small")  # all-ICH + specialists (paper 003)
SCAN_MEMBERS: tuple[str, ...] = ("slice_cnn", "cnn_lstm", "attention_mil", "unet_ensemble")  # combiner inputs
DIFFICULT_RANGE = (0.4, 0.6)
_EPS = 1e-4


@dataclass(frozen=True)
class EnsembleConfig:
    """Sizes of every member; the defaults are the tiny CPU demo."""

    working_size: int = 128
    head_crop: str = "footprint"  # what the head crop boxes: one of preprocess.HEAD_CROPS
    context_window: str = "brain"  # what the context channels show: one of preprocess.CONTEXT_WINDOWS
    cnn: ResNeXtConfig = field(default_factory=ResNeXtConfig)
    cnn_dropout: float = 0.2
    pca_components: int = 24
    lstm_hidden: int = 32
    lstm_layers: int = 1
    lstm_dropout: float = 0.3
    mil: ResNeXtConfig = field(default_factory=ResNeXtConfig)  # same as cnn: training starts it from the CNN
    attention_dim: int = 32
    slice_top_k: int = 1  # the slice CNN's scan logit: mean of its k highest slice logits
    cnn_bag_channels: tuple[int, ...] = ()  # input channels of each further slice CNN of the member
    unet_base: int = 8
    unet_depth: int = 3
    unet_scale: int = 1  # U-Nets see the working-size images average-pooled by this factor
    fusion_hidden: int = 8
    mask_threshold: float = 0.5
    batch_slices: int = 16  # slices per forward pass on CPU; CUDA uses 4x

    def __post_init__(self) -> None:
        if self.head_crop not in HEAD_CROPS:
            raise ValueError(f"head_crop: {self.head_crop!r}; one of {', '.join(HEAD_CROPS)}")
        if self.context_window not in CONTEXT_WINDOWS:
            raise ValueError(f"context_window: {self.context_window!r}; one of {', '.join(CONTEXT_WINDOWS)}")
        for key, channels in [("cnn.channels", self.cnn.channels), ("mil.channels", self.mil.channels),
                              *(("cnn_bag_channels", c) for c in self.cnn_bag_channels)]:
            if not 1 <= channels <= CHANNELS:
                raise ValueError(f"{key}: {channels} input channels; prepare gives 1 to {CHANNELS}")

    @property
    def slice_cnn_configs(self) -> list[ResNeXtConfig]:
        """The slice CNNs of the slice CNN member, `cnn` first."""
        return [self.cnn, *(replace(self.cnn, channels=c) for c in self.cnn_bag_channels)]

    @property
    def input_channels(self) -> int:
        """The most leading channels any member reads (so `prepare` makes those and no more)."""
        return max(WINDOW_CHANNELS, *(c.channels for c in [*self.slice_cnn_configs, self.mil]))

    def prepare(self, hu: np.ndarray, slice_mm: float, brain_window_only: bool = False) -> Prepared:
        """`preprocess.prepare` with this model's working size, channels and crop: the one call
        that training and inference share, so both prepare a volume alike."""
        return prepare(hu, self.working_size, slice_mm, brain_window_only, self.input_channels, self.head_crop,
                       self.context_window)

    @classmethod
    def from_dict(cls, d: dict) -> "EnsembleConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model settings: {sorted(unknown)}")
        values = dict(d)
        for key in ("cnn", "mil"):
            if key in values:
                values[key] = ResNeXtConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values[key].items()})
        if "cnn_bag_channels" in values:
            values["cnn_bag_channels"] = tuple(values["cnn_bag_channels"])
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MemberOutputs:
    """Everything the members say about one volume, at working size."""

    cnn_logits: torch.Tensor  # (slices, 6)
    cam: torch.Tensor  # (slices, size, size) 0..1
    lstm_logits: torch.Tensor  # (slices, 6)
    mil_logits: torch.Tensor  # (6,)
    attention: torch.Tensor  # (slices,)
    subtype_share: torch.Tensor  # (slices, 5, size, size) float16 softmax over subtypes
    fused: torch.Tensor  # (slices, size, size) voxel probability of ICH

    @classmethod
    def mean(cls, outputs: "Iterable[MemberOutputs]") -> "MemberOutputs":
        """Field by field mean of several ensembles' outputs on the same volume (consumed one at a
        time, so only a running sum is held)."""
        total, n = None, 0
        for out in outputs:
            n += 1
            if total is None:
                total = {f.name: getattr(out, f.name).float().clone() for f in fields(cls)}
            else:
                for name, value in total.items():
                    value += getattr(out, name).float()
        if total is None:
            raise ValueError("no member outputs to average")
        mean = {name: value / n for name, value in total.items()}
        mean["subtype_share"] = mean["subtype_share"].half()
        return cls(**mean)


class Timer:
    """Context managers adding wall-clock seconds per name into a dict (no-op without one)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.timings is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def top_k_mean(slice_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The slice CNN's scan logit: per label, the mean of the k highest slice logits (of all the
    slices when there are fewer); slices along dim 0."""
    return slice_logits.topk(min(k, len(slice_logits)), dim=0).values.mean(dim=0)


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.float().clamp(_EPS, 1 - _EPS))


class Ensemble(nn.Module):
    def __init__(self, cfg: EnsembleConfig) -> None:
        super().__init__()
        self.cfg = cfg
        first, *more = cfg.slice_cnn_configs
        self.cnn = SliceCNN(first, cfg.cnn_dropout)
        self.cnn_bag = nn.ModuleList(SliceCNN(c, cfg.cnn_dropout) for c in more)
        self.sequence = SliceSequenceModel(
            self.cnn.feature_dim, cfg.pca_components, cfg.lstm_hidden, cfg.lstm_layers, cfg.lstm_dropout
        )
        self.mil = AttentionMIL(cfg.mil, cfg.attention_dim)
        self.unets = nn.ModuleDict(
            {name: UNet(cfg.unet_base, cfg.unet_depth, 6 if name == "all" else 1) for name in UNET_MEMBERS}
        )
        self.fusion = PixelWeightFusion(len(UNET_MEMBERS), cfg.fusion_hidden)
        self.combiner = Combiner(len(SCAN_MEMBERS))

    def unet_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, s, s) -> member lesion probabilities (n, members, s, s), subtype share (n, 5, s, s),
        each the mean over the slice and its mirror image."""
        small = self.unet_input(images)
        both = torch.cat([small, small.flip(-1)])
        n = len(images)
        probs, share = [], None
        for name, unet in self.unets.items():
            logits = unet(both).float()
            lesion = torch.sigmoid(logits[:, 0])
            probs.append((lesion[:n] + lesion[n:].flip(-1)) / 2)
            if name == "all":
                shares = torch.softmax(logits[:, 1:], dim=1)
                share = (shares[:n] + shares[n:].flip(-1)) / 2
        return self._to_working(torch.stack(probs, dim=1)), self._to_working(share)

    @property
    def slice_cnns(self) -> list[SliceCNN]:
        return [self.cnn, *self.cnn_bag]

    @staticmethod
    def mirrored(cnn: SliceCNN, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One slice CNN's (logits, features, Grad-CAM), each the mean over the slice and its mirror image."""
        n = len(images)
        logits, features, cam = cnn.grad_cam(torch.cat([images, images.flip(-1)]))
        return (logits[:n] + logits[n:]) / 2, (features[:n] + features[n:]) / 2, (cam[:n] + cam[n:].flip(-1)) / 2

    def mirrored_cnn(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slice CNN member's (logits, features, Grad-CAM): logits and Grad-CAM averaged over the bag,
        features of `cnn` (the BiLSTM's input)."""
        logits, features, cam = self.mirrored(self.cnn, images)
        for cnn in self.cnn_bag:
            more_logits, _, more_cam = self.mirrored(cnn, images)
            logits, cam = logits + more_logits, cam + more_cam
        n = len(self.slice_cnns)
        return logits / n, features, cam / n

    def unet_input(self, images: torch.Tensor) -> torch.Tensor:
        """Working-size images (or masks, (n, c, s, s)) at the U-Nets' resolution."""
        scale = self.cfg.unet_scale
        return F.avg_pool2d(images, scale) if scale > 1 else images

    def _to_working(self, maps: torch.Tensor) -> torch.Tensor:
        scale = self.cfg.unet_scale
        return F.interpolate(maps, scale_factor=scale, mode="bilinear", align_corners=False) if scale > 1 else maps

    @torch.no_grad()
    def run_members(self, images: torch.Tensor, timings: dict[str, float] | None = None) -> MemberOutputs:
        """All members on one volume's prepared channels (slices, CHANNELS, size, size), slice-batched.

        Uses autocast (float16) on CUDA. The module must be in eval mode. When given, `timings`
        receives the seconds spent in each member.
        """
        device = images.device
        chunks = torch.split(images, self.cfg.batch_slices * (4 if device.type == "cuda" else 1))
        timer = Timer(timings, device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            with timer("slice_cnn"):
                cnn_logits, features, cam = (torch.cat(t).float() for t in zip(*(self.mirrored_cnn(c) for c in chunks)))
            with timer("cnn_lstm"):
                lstm_logits = self.sequence(features[None], torch.sigmoid(cnn_logits)[None])[0].float()
            with timer("attention_mil"):
                mil_logits, attention = self.mil.pool(torch.cat([self.mil.embed(c).float() for c in chunks]))
            fused_chunks, share_chunks = [], []
            for chunk in chunks:  # chunk by chunk: a 300-slice series stays within a few GB
                with timer("unets"):
                    unet_probs, share = self.unet_maps(chunk)
                with timer("pixel_fusion"):
                    fused_chunks.append(self.fusion(unet_probs.float())[0].float())
                share_chunks.append(share.half())
            fused, share = torch.cat(fused_chunks), torch.cat(share_chunks)
        return MemberOutputs(
            cnn_logits=cnn_logits,
            cam=cam,
            lstm_logits=lstm_logits,
            mil_logits=mil_logits.float(),
            attention=attention.float(),
            subtype_share=share,
            fused=fused,
        )

    def scan_member_logits(self, out: MemberOutputs, inside: torch.Tensor) -> torch.Tensor:
        """(6, len(SCAN_MEMBERS)) scan-level logits of each member for each label.

        inside: (slices, size, size) bool, the intracranial region at working size."""
        inside = inside.to(out.fused.device)
        smooth = F.avg_pool2d(out.fused[:, None], 3, stride=1, padding=1)[:, 0] * inside
        step = self.cfg.batch_slices
        sub_max = torch.stack([  # per subtype, slice-chunk by slice-chunk (the maps are 2-D)
            (F.avg_pool2d(f[:, None] * s.float(), 3, stride=1, padding=1) * i[:, None]).amax(dim=(0, 2, 3))
            for f, s, i in zip(out.fused.split(step), out.subtype_share.split(step), inside.split(step))
        ]).amax(dim=0)
        unet = torch.cat([smooth.amax()[None], sub_max])
        cnn = top_k_mean(out.cnn_logits.float(), self.cfg.slice_top_k)
        return torch.stack([cnn, out.lstm_logits.amax(dim=0), out.mil_logits, _logit(unet)], dim=-1)

    def slice_probabilities(self, out: MemberOutputs) -> torch.Tensor:
        return torch.sigmoid(out.cnn_logits)


class FoldBag(nn.Module):
    """Ensembles of one config (the folds of a cross-validation) averaged, then one combiner.

    Serves the detector as an :class:`Ensemble` does (cfg, run_members, scan_member_logits,
    slice_probabilities, combiner); each replica's own combiner is not used."""

    def __init__(self, cfg: EnsembleConfig, replicas: int) -> None:
        super().__init__()
        if replicas < 1:
            raise ValueError("a fold bag needs at least one ensemble")
        self.cfg = cfg
        self.replicas = nn.ModuleList(Ensemble(cfg) for _ in range(replicas))
        self.combiner = Combiner(len(SCAN_MEMBERS))

    @classmethod
    def of(cls, ensembles: list[Ensemble]) -> "FoldBag":
        configs = {e.cfg for e in ensembles}
        if len(configs) != 1:
            raise ValueError("the ensembles of a fold bag must share one config")
        bag = cls(ensembles[0].cfg, len(ensembles))
        for replica, ensemble in zip(bag.replicas, ensembles):
            replica.load_state_dict(ensemble.state_dict())
        return bag

    @torch.no_grad()
    def run_members(self, images: torch.Tensor, timings: dict[str, float] | None = None) -> MemberOutputs:
        """The mean of every replica's member outputs (timings add up over the replicas)."""
        return MemberOutputs.mean(replica.run_members(images, timings) for replica in self.replicas)

    def scan_member_logits(self, out: MemberOutputs, inside: torch.Tensor) -> torch.Tensor:
        return self.replicas[0].scan_member_logits(out, inside)

    def slice_probabilities(self, out: MemberOutputs) -> torch.Tensor:
        return self.replicas[0].slice_probabilities(out)


def describe_windows() -> str:
    return ", ".join(f"{c:g}/{w:g}" for c, w in WINDOWS)


def heatmap(out: MemberOutputs, slice_any: torch.Tensor) -> torch.Tensor:
    """(slices, size, size) in 0..1: see the module docstring."""
    return torch.maximum(out.fused, out.cam * slice_any[:, None, None]).clamp(0.0, 1.0)


def subtype_maps(out: MemberOutputs) -> Iterator[torch.Tensor]:
    """Per subtype, (slices, size, size): fused lesion probability kept only where the subtype head
    wins (one map at a time, for memory)."""
    winner = out.subtype_share.argmax(dim=1).to(torch.uint8)
    for k in range(out.subtype_share.shape[1]):
        yield out.fused * (winner == k)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
