"""The ensemble's members, in plain torch, sized from tiny (CPU demo) to the papers' own.

- :class:`SliceCNN`: ResNeXt slice classifier (6 outputs + feature vector) with Grad-CAM (paper 004).
- :class:`SliceSequenceModel`: PCA of the CNN features -> bidirectional LSTM over the slices, CNN
  probabilities concatenated before the classifier (paper 004).
- :class:`AttentionMIL`: gated-attention multiple-instance scan classifier (Ilse et al.; paper 000).
- :class:`UNet` and :class:`PixelWeightFusion`: 2-D U-Nets fused by learned pixel weights (paper 003).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ichnode.common.vocabulary import LABELS
from worker.detector.preprocess import WINDOW_CHANNELS

N_LABELS = len(LABELS)
LESION_PRIOR = 0.01  # a U-Net's lesion probability before training
MIRROR_AXES = ("image", "head")
HEAD_LEVEL = 0.02  # brain-window level above which a pixel is head (skin, brain, CSF, bone), not air or fat
MAX_TILT_DEGREES = 30.0  # the head midlines searched lean up to this far from the image's vertical
TILT_STEPS = 25  # 2.5 degrees apart
SEARCH_SIZE = 64  # pixels across at which the midline is searched


@dataclass(frozen=True)
class ResNeXtConfig:
    """ResNeXt-101 32x8d is widths (256, 512, 1024, 2048), blocks (3, 4, 23, 3), groups 32,
    bottleneck 1.0, stem 64, stem_pool True."""

    widths: tuple[int, ...] = (16, 32, 64, 96)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    groups: int = 4
    bottleneck: float = 0.5  # inner width / output width of each block
    stem: int = 16
    stem_pool: bool = False
    #: leading input channels read (worker.detector.preprocess): 1 the brain window alone, as every
    #: source has it; 3 the three windows; 5 also the brain window of the slices below and above (2.5D)
    channels: int = 3
    #: the last feature map also carries the bilateral asymmetry |E(x) - E(mirror x)|: zero where the
    #: image is left-right symmetric (the head crop centres the head; skull base, sinuses, falx), large
    #: where one side differs, as most bleeds make it; twice the encoder's work
    symmetric: bool = False
    #: the mirror line of `symmetric`, one of MIRROR_AXES: "image" the image's vertical midline; "head"
    #: each slice's own head midline (:func:`head_midline_reflection`), so a tilted or off-centre head
    #: is not asymmetric
    mirror_axis: str = "image"

    def __post_init__(self) -> None:
        if self.mirror_axis not in MIRROR_AXES:
            raise ValueError(f"mirror_axis: {self.mirror_axis!r}; one of {', '.join(MIRROR_AXES)}")


def _reflection(x: torch.Tensor, centre: torch.Tensor, tilt: torch.Tensor) -> torch.Tensor:
    """Images (n, c, h, w) reflected about the line through `centre` (n, 2: x, y in pixels) leaning
    `tilt` (n, radians) from the vertical."""
    n, _, h, w = x.shape
    ux, uy = torch.sin(tilt), torch.cos(tilt)
    # p -> c + (2 u u^T - I)(p - c), in pixels, then in grid_sample's coordinates (align_corners
    # False: q = s * p + t); a reflection is its own inverse, so it is also the sampling grid
    a = torch.stack([torch.stack([2 * ux * ux - 1, 2 * ux * uy], -1), torch.stack([2 * ux * uy, 2 * uy * uy - 1], -1)], -2)
    b = centre - (a @ centre.unsqueeze(-1)).squeeze(-1)
    s = torch.tensor([2 / w, 2 / h], dtype=x.dtype, device=x.device)
    t = torch.tensor([1 / w - 1, 1 / h - 1], dtype=x.dtype, device=x.device)
    a_norm = a * s.view(1, 2, 1) / s.view(1, 1, 2)
    b_norm = s * b + t - (a_norm @ t.view(1, 2, 1)).squeeze(-1)
    grid = F.affine_grid(torch.cat([a_norm, b_norm.unsqueeze(-1)], -1), [n, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def head_midline_reflection(x: torch.Tensor) -> torch.Tensor:
    """Images (n, c, h, w) reflected about each image's head midline: the line through the head's
    centroid (pixels above HEAD_LEVEL in the brain window, channel 0) whose reflection matches the
    brain window best, among tilts of up to MAX_TILT_DEGREES from the vertical (TILT_STEPS of them,
    searched at SEARCH_SIZE pixels). The footprint's own axis is no guide: at the skull base the
    face and neck bend it. An image with no head is reflected about its vertical midline."""
    n, _, h, w = x.shape
    head = (x[:, 0] > HEAD_LEVEL).to(x.dtype)
    ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w)
    mass = head.sum(dim=(1, 2))
    has_head = mass > 0
    mass = mass.clamp(min=1)
    centre = torch.stack([
        torch.where(has_head, (head * xs).sum(dim=(1, 2)) / mass, torch.full_like(mass, (w - 1) / 2)),
        torch.where(has_head, (head * ys).sum(dim=(1, 2)) / mass, torch.full_like(mass, (h - 1) / 2)),
    ], -1)
    with torch.no_grad():
        scale = min(1.0, SEARCH_SIZE / max(h, w))
        small = F.interpolate(x[:, :1], scale_factor=scale, mode="area") if scale < 1 else x[:, :1]
        inside = (small > HEAD_LEVEL).to(x.dtype)
        small_centre = centre * scale + (scale - 1) / 2  # the same point in the small image's pixels
        tilts = torch.linspace(-math.radians(MAX_TILT_DEGREES), math.radians(MAX_TILT_DEGREES), TILT_STEPS,
                               dtype=x.dtype, device=x.device)
        mismatch = torch.stack([
            ((small - _reflection(small, small_centre, tilt.expand(n))).abs() * inside).sum(dim=(1, 2, 3))
            for tilt in tilts
        ], -1)
        tilt = torch.where(has_head, tilts[mismatch.argmin(-1)], torch.zeros_like(mass))
    return _reflection(x, centre, tilt)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int, bottleneck: float) -> None:
        super().__init__()
        inner = max(groups, int(cout * bottleneck) // groups * groups)
        self.body = nn.Sequential(
            nn.Conv2d(cin, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, inner, 3, stride=stride, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNeXtEncoder(nn.Module):
    """Images (n, c, h, w) -> last feature map (n, widths[-1], h/16, w/16) (h/32 with stem_pool);
    with `cfg.symmetric` the asymmetry map follows it (2 * widths[-1] channels).

    Only the first `cfg.channels` channels are read: with 1, the encoder sees the brain
    window alone, identical for brain-window-only slices (RSNA) and full-HU volumes (CT-ICH, DICOM).
    """

    def __init__(self, cfg: ResNeXtConfig) -> None:
        super().__init__()
        self.channels = cfg.channels
        self.symmetric = cfg.symmetric
        self.mirror = (lambda x: x.flip(-1)) if cfg.mirror_axis == "image" else head_midline_reflection
        stem: list[nn.Module] = [
            nn.Conv2d(cfg.channels, cfg.stem, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(cfg.stem),
            nn.ReLU(inplace=True),
        ]
        if cfg.stem_pool:
            stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        layers, cin = [nn.Sequential(*stem)], cfg.stem
        for i, (width, n) in enumerate(zip(cfg.widths, cfg.blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(Bottleneck(cin, width, stride, cfg.groups, cfg.bottleneck))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.out_dim = 2 * cin if cfg.symmetric else cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, : self.channels]
        if not self.symmetric:
            return self.layers(x)
        # one pass over both (batch norm sees both in training); the mirror's map is not mirrored
        # back: at each place it holds the other side of the head as this side would look
        direct, mirrored = self.layers(torch.cat([x, self.mirror(x)])).chunk(2)
        return torch.cat([direct, (direct - mirrored).abs()], dim=1)


class SliceCNN(nn.Module):
    """Per-slice any + 5 subtype logits and the pooled feature vector.

    `lesion_head` is used in training only: where hemorrhage masks are known it predicts the
    lesion fraction of each cell of the last feature map, a dense auxiliary signal that teaches
    the encoder far faster than slice labels alone (the CPU demo trains for minutes).
    """

    def __init__(self, cfg: ResNeXtConfig, dropout: float = 0.2) -> None:
        super().__init__()
        self.encoder = ResNeXtEncoder(cfg)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.out_dim, N_LABELS)
        self.lesion_head = nn.Conv2d(self.encoder.out_dim, 1, 1)

    @property
    def feature_dim(self) -> int:
        return self.encoder.out_dim

    def classify(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = fmap.mean(dim=(2, 3))
        return self.head(self.dropout(features)), features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classify(self.encoder(x))

    def grad_cam(self, x: torch.Tensor, label: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, features, cam): cam (n, h, w) in 0..1, each slice scaled by its own maximum.

        Grad-CAM for output `label` (0 = any) on the last feature map, upsampled to the input size.
        In eval mode each slice's logit depends on that slice only, so one backward pass serves all.
        """
        with torch.enable_grad():
            fmap = self.encoder(x).detach().requires_grad_(True)
            logits, features = self.classify(fmap)
            (grads,) = torch.autograd.grad(logits[:, label].float().sum(), fmap)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * fmap).sum(dim=1, keepdim=True)).float()
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        return logits.detach(), features.detach(), cam.detach()


class SliceSequenceModel(nn.Module):
    """CNN features of every slice -> PCA -> BiLSTM; its states + CNN probabilities -> 6 logits per slice."""

    def __init__(self, feature_dim: int, components: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("pca_mean", torch.zeros(feature_dim))
        self.register_buffer("pca_basis", torch.eye(components, feature_dim))
        self.lstm = nn.LSTM(
            components, hidden, num_layers=layers, batch_first=True, bidirectional=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.head = nn.Linear(2 * hidden + N_LABELS, N_LABELS)

    def fit_pca(self, features: np.ndarray) -> float:
        """Fit the projection on training features (n, feature_dim); returns explained variance."""
        mean = features.mean(axis=0)
        _, s, vt = np.linalg.svd(features - mean, full_matrices=False)
        k = self.pca_basis.shape[0]
        basis = np.zeros((k, features.shape[1]), dtype=np.float32)
        basis[: min(k, len(vt))] = vt[:k]
        # whiten so the LSTM sees unit-variance inputs whatever the CNN's scale
        scale = s[:k] / np.sqrt(max(len(features) - 1, 1))
        basis[: len(scale)] /= np.maximum(scale, 1e-6)[:, None]
        self.pca_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.pca_basis.copy_(torch.from_numpy(basis))
        return float((s[:k] ** 2).sum() / max((s**2).sum(), 1e-12))

    def forward(self, features: torch.Tensor, cnn_probs: torch.Tensor) -> torch.Tensor:
        """features (b, slices, feature_dim), cnn_probs (b, slices, 6) -> logits (b, slices, 6)."""
        reduced = (features.float() - self.pca_mean) @ self.pca_basis.T
        states, _ = self.lstm(reduced)
        return self.head(torch.cat([states, cnn_probs.float()], dim=-1))


class AttentionMIL(nn.Module):
    """A bag of slices -> 6 scan logits and the slice attention weights (gated attention, Ilse et al.)."""

    def __init__(self, cfg: ResNeXtConfig, attention_dim: int) -> None:
        super().__init__()
        self.encoder = ResNeXtEncoder(cfg)
        d = self.encoder.out_dim
        self.attention_v = nn.Linear(d, attention_dim)
        self.attention_u = nn.Linear(d, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.head = nn.Linear(d, N_LABELS)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x).mean(dim=(2, 3))

    def pool(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice embeddings (slices, d) -> (logits (6,), attention (slices,) summing to 1)."""
        h = h.float()
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))
        attention = torch.softmax(scores[:, 0], dim=0)
        return self.head(attention @ h), attention

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool(self.embed(x))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """2-D U-Net: images (n, c >= 3, h, w) -> logits (n, out_channels, h, w); h, w multiples of
    2**depth. It reads the three window channels (masks are drawn on one slice, not its neighbours).

    The lesion output (channel 0) starts at the prior LESION_PRIOR of a rare foreground (the
    RetinaNet initialisation): training does not first spend its steps unlearning "blood
    everywhere", and a U-Net left untrained (a cross-validation that trains only the slice CNN)
    says "no blood" instead of 0.5 on every pixel."""

    def __init__(self, base: int, depth: int, out_channels: int) -> None:
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(WINDOW_CHANNELS, widths[0])])
        self.down.extend(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(_double_conv(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(widths[0], out_channels, 1)
        with torch.no_grad():
            self.out.bias[0] = math.log(LESION_PRIOR / (1 - LESION_PRIOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :WINDOW_CHANNELS]
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


class PixelWeightFusion(nn.Module):
    """Member probability maps (n, members, h, w) -> per-pixel softmax weights -> fused map (n, h, w)."""

    def __init__(self, members: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(members, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, members, 3, padding=1),
        )

    def forward(self, member_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(self.net(member_probs.float()), dim=1)
        return (weights * member_probs.float()).sum(dim=1), weights


class Combiner(nn.Module):
    """Per-label Platt calibration of a fixed weighted mean of the members' scan-level logits.

    The member weights are given, not fit here: they are chosen on out-of-fold predictions of
    real scans over the whole cross-validation, while a logistic fit on a few dozen scans overfits
    (on a 100-phantom development set a fitted weighting ranked scans at AUC 0.956 where the
    plain mean gave 0.998). :meth:`fit` learns only a positive scale and a bias per label, so it
    calibrates without changing the ranking.
    """

    def __init__(self, members: int) -> None:
        super().__init__()
        self.register_buffer("coef", torch.full((N_LABELS, members), 1.0 / members))
        self.register_buffer("bias", torch.zeros(N_LABELS))

    def forward(self, member_logits: torch.Tensor) -> torch.Tensor:
        """member_logits (..., 6, members) -> calibrated probabilities (..., 6)."""
        return torch.sigmoid((member_logits.float() * self.coef).sum(dim=-1) + self.bias)

    def member_weights(self) -> list[float]:
        """The members' relative weights (of the 'any' label; every label shares them)."""
        w = self.coef[0].clamp_min(0)
        return (w / w.sum().clamp_min(1e-12)).tolist()

    @staticmethod
    def platt(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """(scale > 0, bias) minimising the log loss of sigmoid(scale * x + bias) against y.

        A weak prior on log(scale) keeps the fit finite when a few scans separate perfectly;
        (1, 0) if it still fails."""
        log_scale = torch.zeros((), device=x.device, requires_grad=True)
        bias = torch.zeros((), device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_scale, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x * log_scale.exp() + bias, y) + 0.01 * log_scale**2
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        scale, offset = float(log_scale.detach().exp()), float(bias.detach())
        return (scale, offset) if np.isfinite(scale) and np.isfinite(offset) else (1.0, 0.0)

    def fit(self, member_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """member_logits (n, 6, members), labels (n, 6) 0/1, weights (members,) >= 0 (default equal).

        Labels with < 2 of either class keep scale 1 and bias 0."""
        member_logits, labels = member_logits.to(self.coef.device), labels.to(self.coef.device)
        w = torch.ones(member_logits.shape[-1]) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        w = (w / w.sum()).to(self.coef.device)
        terms = []
        for k in range(N_LABELS):
            y = labels[:, k].float()
            if min(int(y.sum()), int((1 - y).sum())) < 2:
                terms.append((1.0, 0.0))
            else:
                terms.append(self.platt((member_logits[:, k].float() * w).sum(dim=-1), y))
        self.calibrate(w, terms)

    def calibrate(self, weights: torch.Tensor, terms: list[tuple[float, float]]) -> None:
        """Set member weights (members,) and per-label (scale, bias) Platt terms."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.coef.device)
        w = w / w.sum()
        for k, (scale, bias) in enumerate(terms):
            self.coef[k] = scale * w
            self.bias[k] = bias

    def terms(self) -> list[tuple[float, float]]:
        """Per-label (scale, bias): the inverse of :meth:`calibrate`."""
        return [(float(self.coef[k].sum()), float(self.bias[k])) for k in range(N_LABELS)]
