"""Training-time augmentation of window-channel batches, for scanner and export variety.

Works on what `worker.detector.preprocess.prepare` produces (n, CHANNELS, s, s) in 0..1, on the
training device, one random draw per image:
- geometry: left-right flip, rotation, scale and shift (one affine warp; outside is air = 0);
- window and level jitter (contrast and brightness of each image);
- Gaussian noise, Gaussian blur, and a down-and-up resampling (reconstruction and lossy
  compression softness);
- channel dropout: the window channels past BRAIN_CHANNELS (and the bone window) are zeroed, as
  for brain-window-only sources, so one model learns from RSNA's PNG slices and from full-HU
  volumes; context dropout zeroes the neighbouring slices' channels, as for slices that stand alone.
`mixup` (fine-tuning only) blends pairs of augmented slices and their labels.
A channel that is all zero in the input (not available) stays zero.
Masks warped with images use the same geometry (`warp_masks`).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from worker.detector.preprocess import BONE_CHANNEL, BRAIN_CHANNELS, WINDOW_CHANNELS


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 15.0
    scale: float = 0.12  # zoom in [1 - scale, 1 + scale]
    shift: float = 0.06  # of the image side
    contrast: float = 0.15
    brightness: float = 0.05
    noise: float = 0.03  # largest noise sd, 0..1 units
    blur_probability: float = 0.25
    resample_probability: float = 0.2
    channel_dropout: float = 0.3
    context_dropout: float = 0.3
    # Pre-training sees full HU and slice order only in phantoms: with those channels always
    # dropped there, the CNN cannot learn "later channels present = synthetic" (CT-ICH zero-shot
    # AUC 0.52 with the windows dropped at 0.3).
    pretrain_channel_dropout: float = 1.0
    pretrain_context_dropout: float = 1.0
    # Beta(mixup, mixup) share of each fine-tuning slice blended with another of its batch (labels
    # alike; Zhang et al. 2018); 0: none. The pre-training is not mixed.
    mixup: float = 0.0

    def for_pretraining(self) -> "AugmentConfig":
        return replace(self, channel_dropout=self.pretrain_channel_dropout, context_dropout=self.pretrain_context_dropout,
                       mixup=0.0)


def affine_grid(n: int, size: int, cfg: AugmentConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n, size, size, 2) sampling grid of one random flip + rotation + scale + shift per image."""
    u = torch.rand(n, 5, generator=generator).to(device)
    angle = (u[:, 0] * 2 - 1) * math.radians(cfg.rotation_deg)
    zoom = 1 + (u[:, 1] * 2 - 1) * cfg.scale
    flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0).to(device)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, (u[:, 3] * 2 - 1) * cfg.shift * 2], dim=1),
        torch.stack([sin * flip, cos, (u[:, 4] * 2 - 1) * cfg.shift * 2], dim=1),
    ], dim=1)
    return F.affine_grid(theta, (n, 1, size, size), align_corners=False)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap Gaussian blur with one sigma per image."""
    taps = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, 5)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, dim=0)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """images (n, c, s, s) -> (augmented images, the grid used, for warp_masks)."""
    with torch.autocast(images.device.type, enabled=False):  # data, not model: float32 under mixed precision
        return _augment(images.float(), cfg, generator)


def _augment(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, _, size, _ = images.shape
    device = images.device
    present = (images.amax(dim=(2, 3), keepdim=True) > 0).float()
    grid = affine_grid(n, size, cfg, generator, device)
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    u = torch.rand(n, 8, generator=generator).to(device)
    contrast = 1 + (u[:, 0] * 2 - 1) * cfg.contrast
    brightness = (u[:, 1] * 2 - 1) * cfg.brightness
    x = (x - 0.5) * contrast[:, None, None, None] + 0.5 + brightness[:, None, None, None]
    blurred = u[:, 2] < cfg.blur_probability
    if blurred.any():
        x[blurred] = _blur(x[blurred], 0.5 + u[blurred, 3])
    resampled = u[:, 4] < cfg.resample_probability
    if resampled.any():
        small = F.interpolate(x[resampled], scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
        x[resampled] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.randn(x.shape, generator=generator).to(device) * (u[:, 5] * cfg.noise)[:, None, None, None]
    x = (x + noise).clamp(0.0, 1.0)
    dropped = u[:, 6] < cfg.channel_dropout
    present[dropped, BRAIN_CHANNELS:WINDOW_CHANNELS] = 0
    present[dropped, BONE_CHANNEL:] = 0
    present[u[:, 7] < cfg.context_dropout, WINDOW_CHANNELS:BONE_CHANNEL] = 0
    return x * present, grid


def warp_masks(masks: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """(n, s, s) soft masks through the same geometry as their images."""
    with torch.autocast(masks.device.type, enabled=False):
        return F.grid_sample(masks[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


@dataclass(frozen=True)
class Mixing:
    """Which slice each slice of a batch is blended with, and its own share of the blend."""

    partner: torch.Tensor  # (n,) long
    share: torch.Tensor  # (n,) float in 0..1

    @classmethod
    def draw(cls, n: int, alpha: float, rng: random.Random) -> "Mixing":
        partner = list(range(n))
        rng.shuffle(partner)
        return cls(torch.tensor(partner), torch.tensor([rng.betavariate(alpha, alpha) for _ in range(n)]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(n, ...) -> the same, each row blended with its partner's."""
        share = self.share.to(x.device, x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return share * x + (1 - share) * x[self.partner.to(x.device)]

