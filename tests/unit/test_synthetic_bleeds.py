"""Bleeds synthesised into real bleed-free slices: where they go, what they change, their labels."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ichnode.common.vocabulary import LABELS, SUBTYPES
from training.synthetic_bleeds import MIN_LESION_PIXELS, synthesise, synthetic_examples
from training.train import Example
from worker.detector.preprocess import CHANNELS, WINDOW_CHANNELS, intracranial_mask, window_channels

SIZE = 128


def head_slice(open_ring: bool = False) -> np.ndarray:
    """HU: air, scalp, a skull ring, brain with noise, and two CSF ventricles near the centre."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    r = np.hypot(yy - SIZE / 2, xx - SIZE / 2)
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    hu[r < 60] = 35.0
    ring = (r >= 52) & (r < 57)
    hu[ring] = 1200.0
    if open_ring:
        hu[ring & (yy < SIZE / 2) & (np.abs(xx - SIZE / 2) < 12)] = 35.0
    brain = r < 52
    hu[brain] = 32.0 + rng.normal(0, 3, brain.sum())
    for cx in (SIZE / 2 - 8, SIZE / 2 + 8):
        hu[((yy - SIZE / 2) / 12) ** 2 + ((xx - cx) / 4) ** 2 < 1] = 5.0
    return hu


def channels_and_inside(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A slice's prepared channels (its windows, then neighbours' context) and intracranial region."""
    windows = window_channels(torch.from_numpy(hu)[None])[0].numpy()
    context = np.random.default_rng(1).random((CHANNELS - WINDOW_CHANNELS, *hu.shape), dtype=np.float32)
    return np.concatenate([windows, context]), intracranial_mask(hu[None])[0]


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_each_subtype_draws_denser_blood_inside_the_skull_only(subtype):
    images, inside = channels_and_inside(head_slice())
    rng = np.random.default_rng(3)
    drawn = None
    for _ in range(20):  # a draw may not fit (then None); some draw of each subtype must
        drawn = synthesise(images, inside, subtype, rng)
        if drawn is not None:
            break
    assert drawn is not None, f"no {subtype} could be drawn into a normal slice"
    new, fraction = drawn
    lesion = fraction > 0.5
    assert lesion.sum() >= MIN_LESION_PIXELS
    assert not (fraction[~inside] > 0).any(), "blood outside the intracranial region"
    assert new[0][lesion].mean() > images[0][lesion].mean() + 0.1, "blood is not denser than what it replaced"
    np.testing.assert_array_equal(new[WINDOW_CHANNELS:], images[WINDOW_CHANNELS:])  # the neighbours have no bleed
    untouched = fraction == 0
    if subtype != "IPH":  # IPH also darkens an oedema rim around the clot
        np.testing.assert_array_equal(new[:, untouched], images[:, untouched])


def test_no_bleed_is_drawn_where_the_skull_ring_is_open():
    """Skull base slices: orbits, sinuses and face would otherwise take the bleed."""
    images, inside = channels_and_inside(head_slice(open_ring=True))
    rng = np.random.default_rng(0)
    assert all(synthesise(images, inside, "SDH", rng) is None for _ in range(5))


def test_synthetic_examples_carry_exact_masks_and_their_subtype_labels():
    hu = np.stack([head_slice()] * 3)
    images = window_channels(torch.from_numpy(hu))
    source = Example(
        scan_id="real-1", patient_id="p1", images=images.half(), scan_labels=torch.zeros(len(LABELS)),
        slice_labels=torch.zeros(3, len(LABELS)), lesion=None, subtype=None, lesion_ml=0.0,
        inside=torch.from_numpy(intracranial_mask(hu)),
    )
    phantom = Example(  # carries masks: not real anatomy, never a source
        scan_id="phantom-1", patient_id="p2", images=images.half(), scan_labels=torch.zeros(len(LABELS)),
        slice_labels=torch.zeros(3, len(LABELS)), lesion=torch.zeros(3, SIZE, SIZE), subtype=None, lesion_ml=0.0,
        inside=torch.from_numpy(intracranial_mask(hu)),
    )
    made = synthetic_examples([source, phantom], 12, seed=1)
    assert len(made) == 12
    for e in made:
        assert e.patient_id == "p1" and e.images.shape == (1, 3, SIZE, SIZE)
        subtype = int(e.scan_labels[1:].argmax())
        assert e.scan_labels[0] == 1 and e.scan_labels.sum() == 2
        assert torch.equal(e.slice_labels[0], e.scan_labels)
        lesion = e.lesion[0] > 0.5
        assert lesion.any() and torch.all(e.subtype[0][lesion] == subtype) and torch.all(e.subtype[0][~lesion] == -1)
        assert e.lesion_ml > 0
