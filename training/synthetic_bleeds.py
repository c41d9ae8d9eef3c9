"""Hemorrhages synthesised into real bleed-free slices: exact masks on real anatomy.

The segmentation members (paper 003) need pixel masks, and real ones exist for 18 slices only.
Here a bleed of one subtype is drawn into a real full-HU slice that is labelled free of
hemorrhage, at working size, on what `worker.detector.preprocess.prepare` produced:
- HU are read back from the brain window channel (40/80: unclipped for brain, CSF and blood),
  blended with blood by the soft lesion fraction (partial volume at the edge), given the slice's
  own noise level, and every window channel is recomputed from the new HU with the same
  `window_channels` as inference;
- shapes follow the distance to the inner table of the intracranial region and the angle around
  its centre: a crescent along the convexity (SDH), a lens against the inner table (EDH), an
  irregular ellipse with a hypodense oedema rim inside the brain (IPH), thin streaks in the
  sulci under the convexity or blood in the basal cisterns (SAH), and blood layering in the
  ventricles' CSF (IVH).
The slice keeps its real anatomy, noise and reconstruction; only the bleed is synthetic.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from ichnode.common.vocabulary import LABELS, SUBTYPES
from worker.detector.preprocess import WINDOW_CHANNELS, WINDOWS, window_channels

MIN_BRAIN_FRACTION = 0.12  # of the working square: slices with less brain (skull base, vertex) are not used
BONE_LEVEL = 0.95  # soft-tissue window channel (40/380) above this: bone (about 210 HU and more)
CLOSED_RING_SHARE = 0.9  # of the intracranial region inside a closed skull ring, for a slice to be used
MIN_LESION_PIXELS = 6  # at working size; smaller draws are discarded
ASSUMED_MM_PER_PIXEL = 0.9  # at working size over an adult head (CT-ICH records no pixel spacing)
ASSUMED_SLICE_MM = 5.0
_BRAIN_LOW, _BRAIN_WIDTH = WINDOWS[0][0] - WINDOWS[0][1] / 2, WINDOWS[0][1]


def _hu_from_brain_window(images: np.ndarray) -> np.ndarray:
    return images[0] * _BRAIN_WIDTH + _BRAIN_LOW


def _noise_sd(hu: np.ndarray, brain: np.ndarray) -> float:
    """The slice's own pixel noise in brain tissue (HU), from the residual of a 3x3 mean."""
    residual = hu - ndimage.uniform_filter(hu, 3)
    values = residual[brain]
    return float(np.clip(values.std() * 1.2, 1.0, 12.0)) if values.size > 50 else 4.0


def _polar(inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth below the inner table in pixels, angle around the region's centre, radius)."""
    depth = ndimage.distance_transform_edt(inside)
    rows, cols = np.nonzero(inside)
    cy, cx = rows.mean(), cols.mean()
    yy, xx = np.mgrid[: inside.shape[0], : inside.shape[1]]
    return depth, np.arctan2(yy - cy, xx - cx), np.hypot(yy - cy, xx - cx)


def _arc(angle: np.ndarray, centre: float) -> np.ndarray:
    """Signed angular distance from `centre`, in -pi..pi."""
    return (angle - centre + math.pi) % (2 * math.pi) - math.pi


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-6)


def _extra_axial(inside, depth, angle, rng, lens: bool) -> np.ndarray:
    """SDH (crescent: thin, long, even thickness) or EDH (lens: short, thick in the middle)."""
    if lens:
        half_arc, thickness = rng.uniform(0.2, 0.55), float(np.exp(rng.uniform(np.log(3), np.log(22))))
    else:
        half_arc, thickness = rng.uniform(0.45, 1.3), float(np.exp(rng.uniform(np.log(1.5), np.log(12))))
    u = np.abs(_arc(angle, rng.uniform(-math.pi, math.pi))) / half_arc
    profile = np.clip(1 - u**2, 0, 1) if lens else np.clip(1 - u**4, 0, 1) ** 0.5
    return np.clip(thickness * profile - depth + 0.5, 0, 1) * inside


def _parenchymal(inside, depth, rng) -> np.ndarray | None:
    radius = float(np.exp(rng.uniform(np.log(2.5), np.log(18))))
    candidates = np.argwhere(depth > radius * 1.3 + 6)
    if not len(candidates):
        return None
    cy, cx = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[: inside.shape[0], : inside.shape[1]]
    theta = rng.uniform(0, math.pi)
    dy, dx = yy - cy, xx - cx
    a = radius * rng.uniform(0.7, 1.3)
    b = radius * rng.uniform(0.6, 1.1)
    r = np.hypot((dx * math.cos(theta) + dy * math.sin(theta)) / a, (-dx * math.sin(theta) + dy * math.cos(theta)) / b)
    r = r * (1 + 0.12 * _smooth_field(inside.shape, rng, 4))  # irregular margin
    return np.clip((1 - r) * radius + 0.5, 0, 1) * inside


def _subarachnoid(inside, depth, angle, radius, hu, rng) -> np.ndarray | None:
    if rng.random() < 0.6:  # sulcal, under the convexity
        band = (depth > 1) & (depth < rng.uniform(5, 12))
        arc = np.abs(_arc(angle, rng.uniform(-math.pi, math.pi))) < rng.uniform(0.35, 1.1)
        streaks = _smooth_field(inside.shape, rng, 1.2) > rng.uniform(0.6, 1.1)
        region = band & arc & (streaks | (hu < 22))
    else:  # basal cisterns: CSF around the centre of the slice
        region = (radius < rng.uniform(12, 30)) & (hu < 20) & (hu > -10) & (depth > 10)
    if region.sum() < MIN_LESION_PIXELS:
        return None
    return ndimage.gaussian_filter(region.astype(np.float32), 0.6).clip(0, 1) * inside * rng.uniform(0.7, 1.0)


def _intraventricular(inside, depth, hu, rng) -> np.ndarray | None:
    csf = (hu > -10) & (hu < 18) & (depth > 0.3 * depth.max())
    csf = ndimage.binary_opening(csf, iterations=1)
    labels, n = ndimage.label(csf)
    if n == 0:
        return None
    sizes = ndimage.sum(csf, labels, range(1, n + 1))
    ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 20))
    if ventricles.sum() < MIN_LESION_PIXELS:
        return None
    rows = np.nonzero(ventricles)[0]
    level = np.quantile(rows, rng.uniform(0.0, 0.7))  # blood layers in the dependent (posterior) part
    yy = np.mgrid[: inside.shape[0], : inside.shape[1]][0]
    region = ventricles & (yy >= level)
    return ndimage.gaussian_filter(region.astype(np.float32), 0.5).clip(0, 1)


def within_skull(images: np.ndarray, inside: np.ndarray) -> np.ndarray | None:
    """The intracranial region inside a closed skull ring, or None where the ring is open (skull
    base: orbits, sinuses and face would otherwise take bleeds) or too little brain is in view."""
    bone = images[2] > BONE_LEVEL
    region = inside & ndimage.binary_fill_holes(bone)
    if region.sum() < MIN_BRAIN_FRACTION * inside.size or region.sum() < CLOSED_RING_SHARE * inside.sum():
        return None
    return region


def synthesise(images: np.ndarray, inside: np.ndarray, subtype: str, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """One bleed of `subtype` drawn into a bleed-free slice.

    images: (CHANNELS, s, s) prepared channels 0..1, whose window channels get the bleed (the
    neighbouring slices' context channels keep theirs); inside: (s, s) bool intracranial region.
    Returns (new images, soft lesion fraction (s, s) 0..1), or None when the slice has no room
    for that subtype (no ventricles in view, too little brain)."""
    inside = within_skull(images, inside)
    if inside is None:
        return None
    hu = _hu_from_brain_window(images)
    depth, angle, radius = _polar(inside)
    if subtype in ("SDH", "EDH"):
        fraction = _extra_axial(inside, depth, angle, rng, lens=subtype == "EDH")
    elif subtype == "IPH":
        fraction = _parenchymal(inside, depth, rng)
    elif subtype == "SAH":
        fraction = _subarachnoid(inside, depth, angle, radius, hu, rng)
    elif subtype == "IVH":
        fraction = _intraventricular(inside, depth, hu, rng)
    else:
        raise ValueError(f"unknown subtype {subtype!r}")
    if fraction is None or (fraction > 0.5).sum() < MIN_LESION_PIXELS:
        return None
    blood = rng.uniform(45, 70) if subtype in ("SAH", "IVH") else rng.uniform(55, 85)
    noise = rng.standard_normal(hu.shape) * _noise_sd(hu, inside & (hu > 15) & (hu < 50))
    new_hu = hu * (1 - fraction) + (blood + noise) * fraction
    if subtype == "IPH":  # hypodense oedema rim around the clot
        rim = ndimage.gaussian_filter((fraction > 0.5).astype(np.float32), rng.uniform(1.5, 4)) * (fraction < 0.5) * inside
        new_hu -= rim * rng.uniform(4, 12)
    touched = (fraction > 0) | (new_hu != hu)
    new_images = window_channels(torch.from_numpy(new_hu.astype(np.float32))[None])[0].numpy()
    drawn = np.where(touched[None], new_images, images[:WINDOW_CHANNELS])
    return np.concatenate([drawn, images[WINDOW_CHANNELS:]]).astype(np.float32), fraction.astype(np.float32)


def bleed_free_slices(examples: list) -> list[tuple]:
    """(example, slice index) of full-HU real slices labelled free of hemorrhage with enough brain
    in view; phantoms (which carry masks) are not real anatomy and are left out."""
    return [
        (e, i) for e in examples if e.full_hu and e.lesion is None and e.slice_labels is not None
        for i in range(len(e.images))
        if e.slice_labels[i, 0] == 0 and float(e.inside[i].float().mean()) >= MIN_BRAIN_FRACTION
    ]


def synthetic_examples(examples: list, n: int, seed: int) -> list:
    """`n` one-slice training examples (training.train.Example) with a synthesised bleed of a random
    subtype in a random bleed-free slice of `examples`, with exact lesion and subtype masks."""
    rng = np.random.default_rng(seed)
    sources = bleed_free_slices(examples)
    out = []
    attempts = 0
    while sources and len(out) < n and attempts < 20 * n:
        attempts += 1
        e, i = sources[rng.integers(len(sources))]
        subtype = SUBTYPES[rng.integers(len(SUBTYPES))]
        drawn = synthesise(e.images[i].float().numpy(), e.inside[i].numpy(), subtype, rng)
        if drawn is None:
            continue
        images, fraction = drawn
        lesion = torch.from_numpy(fraction)
        labels = torch.zeros(len(LABELS))
        labels[0] = labels[1 + SUBTYPES.index(subtype)] = 1
        pixels = float((fraction > 0.5).sum())
        out.append(replace(
            e,
            scan_id=f"{e.scan_id}-slice{i}-{subtype}-{len(out)}",
            images=torch.from_numpy(images)[None].half(),
            scan_labels=labels,
            slice_labels=labels[None].clone(),
            lesion=lesion[None],
            subtype=torch.where(lesion > 0.5, SUBTYPES.index(subtype), -1)[None].long(),
            lesion_ml=pixels * ASSUMED_MM_PER_PIXEL**2 * ASSUMED_SLICE_MM / 1000,
            inside=e.inside[i : i + 1],
        ))
    return out
