"""Detector library: preprocessing, members, fusion, weights on disk, detect()."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ichnode.common.vocabulary import LABELS, SUBTYPES
from worker.detector import DetectorOutput, ModelLoadError, load_detector
from worker.detector.ensemble import SCAN_MEMBERS, Ensemble, EnsembleConfig, FoldBag
from worker.detector.members import (
    AttentionMIL,
    Combiner,
    MIRROR_AXES,
    PixelWeightFusion,
    ResNeXtConfig,
    SliceCNN,
    SliceSequenceModel,
    UNet,
    head_midline_reflection,
)
from worker.detector.preprocess import (
    BONE_CHANNEL,
    CHANNELS,
    CONTEXT_CHANNELS,
    CROP_MARGIN,
    WINDOW_CHANNELS,
    HeadCrop,
    intracranial_mask,
    masks_to_working,
    prepare,
    window_channels,
)
from worker.detector.store import MANIFEST, WEIGHTS_FILE, save_model
from worker.geometry import Volume

torch.set_num_threads(1)

TINY_NET = ResNeXtConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1), groups=2, stem=8)
TINY = EnsembleConfig(
    working_size=32, cnn=TINY_NET, pca_components=4, lstm_hidden=4,
    mil=ResNeXtConfig(widths=(8, 8, 8, 8), groups=1, stem=8), attention_dim=4,
    unet_base=4, unet_depth=2, fusion_hidden=2, batch_slices=3,
)


def head(slices: int = 4, rows: int = 48, cols: int = 64, centre=(24, 30), radius: int = 18) -> np.ndarray:
    """Air with a water disc (the 'head') off centre in a non-square frame."""
    hu = np.full((slices, rows, cols), -1000.0, np.float32)
    yy, xx = np.mgrid[:rows, :cols]
    hu[:, (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2] = 35.0
    return hu


def skull_head(slices: int = 4, size: int = 64, open_slice: int | None = None) -> np.ndarray:
    """Air around a head: scalp (35 HU), skull ring (1200 HU), brain (35 HU), centred in size x size.

    The slice `open_slice`, when given, has a gap in its skull ring (like the skull base)."""
    hu = np.full((slices, size, size), -1000.0, np.float32)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    hu[:, r < 28] = 35.0
    ring = (r >= 22) & (r < 25)
    hu[:, ring] = 1200.0
    if open_slice is not None:
        gap = ring & (yy < size / 2) & (np.abs(xx - size / 2) < 2)
        hu[open_slice, gap] = 35.0
    return hu


# -- preprocessing ----------------------------------------------------------------------------


def test_window_channels_scale_each_window_to_0_1():
    hu = torch.tensor([[[0.0, 40.0, 80.0, -1000.0, 3000.0]]])
    ch = window_channels(hu)
    assert ch.shape == (1, 3, 1, 5)
    brain, subdural, soft = ch[0, :, 0]
    assert torch.allclose(brain, torch.tensor([0.0, 0.5, 1.0, 0.0, 1.0]))  # 40/80: 0..80 HU
    assert subdural[2] == pytest.approx(0.5)  # 80/200: centre at 80 HU
    assert soft[1] == pytest.approx(0.5)  # 40/380: centre at 40 HU
    assert 0 < soft[0] < 0.5 and subdural[0] > 0


def test_head_crop_is_a_square_around_the_head():
    crop = HeadCrop.find(head())
    assert crop.rows == 48 and crop.cols == 64
    assert crop.side >= 36  # the head's diameter plus a margin
    assert crop.top <= 24 - 18 and crop.top + crop.side >= 24 + 18
    assert crop.left <= 30 - 18 and crop.left + crop.side >= 30 + 18


def test_largest_body_crop_leaves_out_a_head_holder_that_the_footprint_crop_boxes():
    """A head holder beside the head (a thick bar, apart in one slice and touching the head by a thin
    bridge in another) widens the footprint box; the largest-body box is the head's alone."""
    hu = head(rows=64, cols=96, centre=(32, 30), radius=18)
    hu[:, 8:56, 80:86] = 900.0  # the holder
    hu[2, 31:33, 47:81] = 35.0  # a 2-pixel bridge from the head to the holder in one slice
    footprint, body = HeadCrop.find(hu), HeadCrop.find(hu, "largest_body")
    assert footprint.left + footprint.side >= 86
    assert body.left + body.side <= 30 + 18 + 4 and body.left <= 30 - 18
    assert abs(body.side - 36 * (1 + 2 * CROP_MARGIN)) <= 3  # the head's diameter and margins
    alone, same = HeadCrop.find(head(), "largest_body"), HeadCrop.find(head())  # nothing beside the head
    assert max(abs(alone.top - same.top), abs(alone.left - same.left), abs(alone.side - same.side)) <= 2


def test_the_head_crop_must_be_a_known_one():
    with pytest.raises(ValueError, match="head_crop: 'skull'"):
        EnsembleConfig(head_crop="skull")


def test_crop_resample_round_trip_keeps_geometry():
    hu = head(rows=40, cols=40, centre=(20, 20), radius=19)  # box extends past the image edge
    lesion = np.zeros(hu.shape, bool)
    lesion[1, 10:16, 22:30] = True
    crop = HeadCrop.find(hu)
    working = masks_to_working(lesion, crop, 64)
    assert working.shape == (4, 64, 64)
    back = crop.to_volume(working).numpy() >= 0.5
    assert back.shape == lesion.shape
    overlap = 2 * (back & lesion).sum() / (back.sum() + lesion.sum())
    assert overlap > 0.85
    assert not back[[0, 2, 3]].any()


def test_prepare_gives_window_context_and_bone_channels_at_working_size():
    prepared = prepare(head(slices=3), 32, slice_mm=5.0)
    assert prepared.images.shape == (3, CHANNELS, 32, 32) and CHANNELS == 6
    assert 0.0 <= float(prepared.images.min()) and float(prepared.images.max()) <= 1.0
    centre = prepared.images[0, 0, 16, 16]
    assert centre == pytest.approx((35 - 0) / 80, abs=0.05)  # brain window at 35 HU


def test_the_bone_window_shows_the_skull_that_every_other_window_shows_flat_white():
    """Skull (1200 HU) against its 900-HU partial-volume edge: one white in the windows, apart in the
    bone window; a brain-window-only source has no bone window (zeros, 'not available')."""
    hu = skull_head(slices=2)
    edge = hu.copy()
    edge[hu == 1200.0] = 900.0
    images, edge_images = prepare(hu, 64, slice_mm=5.0).images, prepare(edge, 64, slice_mm=5.0).images
    bone = images[:, BONE_CHANNEL]
    skull = bone == bone.amax()  # the middle of the ring, at the working size
    for c in range(WINDOW_CHANNELS):
        assert bool((images[:, c][skull] == 1).all()) and bool((edge_images[:, c][skull] == 1).all())
    assert float(bone.amax()) == pytest.approx((1200 + 800) / 2800, abs=0.01)
    assert float(edge_images[:, BONE_CHANNEL][skull].mean()) == pytest.approx((900 + 800) / 2800, abs=0.01)
    assert not prepare(hu, 64, slice_mm=5.0, brain_window_only=True).images[:, BONE_CHANNEL].any()


@pytest.mark.parametrize("slice_mm, offset", [(5.0, 1), (2.5, 2), (0.625, 8), (10.0, 1)])
def test_context_channels_are_the_brain_window_about_5_mm_below_and_above(slice_mm, offset):
    """2.5D input: a thin-slice series shows the same anatomy beside each slice as 5-mm training
    data; past the series' ends (and for a lone slice) the context is zero, 'not available'."""
    hu = head(slices=10)
    hu[hu > 0] += np.repeat(np.arange(10.0) * 6, (hu > 0).sum(axis=(1, 2)))  # each slice its own density
    images = prepare(hu, 32, slice_mm=slice_mm).images
    brain, below, above = images[:, 0], images[:, WINDOW_CHANNELS], images[:, WINDOW_CHANNELS + 1]
    assert torch.equal(below[offset:], brain[:-offset]) and not below[:offset].any()
    assert torch.equal(above[:-offset], brain[offset:]) and not above[-offset:].any()
    alone = prepare(hu[:1], 32, slice_mm=slice_mm).images
    assert torch.equal(alone[:, :WINDOW_CHANNELS], images[:1, :WINDOW_CHANNELS])
    assert not alone[:, WINDOW_CHANNELS:BONE_CHANNEL].any()


def test_context_channels_show_the_subdural_window_when_the_model_asks_for_it():
    """70-HU blood is near bone's white in the brain window (0.88 against 1), mid-grey in the subdural one."""
    hu = head(slices=3)
    hu[hu > 0] = 70.0
    images = prepare(hu, 32, slice_mm=5.0, context_window="subdural").images
    assert torch.equal(images[1:, WINDOW_CHANNELS], images[:-1, 1])  # the subdural window below
    assert torch.equal(images[:-1, WINDOW_CHANNELS + 1], images[1:, 1])
    assert float(images[1, WINDOW_CHANNELS, 16, 16]) == pytest.approx((70 + 20) / 200, abs=0.05)
    assert float(images[1, 0, 16, 16]) == pytest.approx(70 / 80, abs=0.05)
    with pytest.raises(ValueError, match="context_window"):
        EnsembleConfig(context_window="bone")


def test_prepare_maps_the_intracranial_region_to_the_working_grid():
    hu = skull_head(slices=2)
    prepared = prepare(hu, 32, slice_mm=5.0)
    assert np.array_equal(prepared.inside, intracranial_mask(hu))
    assert prepared.inside_working.shape == (2, 32, 32) and prepared.inside_working.dtype == torch.bool
    assert bool(prepared.inside_working[:, 16, 16].all()) and not bool(prepared.inside_working[:, 0, 0].any())


def test_intracranial_mask_is_inside_the_skull_ring_and_falls_back_to_the_head_without_bone():
    hu = skull_head(open_slice=1)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    mask = intracranial_mask(hu)
    closed = mask[0]
    assert closed[r < 21].all() and not closed[r >= 22].any()  # brain only: no bone, scalp or air
    opened = mask[1]
    assert opened[r < 21].all() and opened[(r >= 25) & (r < 27)].all()  # scalp kept where the ring is open
    assert not opened[(r >= 22) & (r < 25) & (yy >= 32)].any() and not opened[r >= 28].any()


def test_intracranial_mask_keeps_blood_against_the_inner_table_and_drops_air_and_fat():
    hu = skull_head()
    hu[0, 32, 11:13] = 70.0  # a thin subdural rim right inside the skull (ring from r=22)
    hu[0, 30, 30] = -400.0  # air (a sinus or pneumocephalus)
    hu[0, 34, 34] = -100.0  # fat
    mask = intracranial_mask(hu)
    assert mask[0, 32, 11:13].all()
    assert not mask[0, 30, 30] and not mask[0, 34, 34]


# -- members ----------------------------------------------------------------------------------


def test_slice_cnn_outputs_and_grad_cam():
    cnn = SliceCNN(TINY_NET).eval()
    x = torch.rand(5, 3, 32, 32)
    logits, features = cnn(x)
    assert logits.shape == (5, 6) and features.shape == (5, cnn.feature_dim)
    g_logits, g_features, cam = cnn.grad_cam(x)
    assert torch.allclose(g_logits, logits, atol=1e-5)
    assert cam.shape == (5, 32, 32)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0 + 1e-6


def test_a_2_5d_cnn_reads_the_neighbouring_slices_and_a_3_window_cnn_does_not():
    torch.manual_seed(0)
    net = dict(widths=(8, 8, 8, 8), groups=2, stem=8)
    windows_only, with_context = (SliceCNN(ResNeXtConfig(**net, channels=c)).eval() for c in (WINDOW_CHANNELS, CHANNELS))
    images = torch.rand(2, CHANNELS, 32, 32)
    other_neighbours = images.clone()
    other_neighbours[:, WINDOW_CHANNELS:] = torch.rand(2, CHANNELS - WINDOW_CHANNELS, 32, 32)
    with torch.no_grad():
        assert torch.equal(windows_only(images)[0], windows_only(other_neighbours)[0])  # 0.4.0's weights: unchanged
        assert not torch.allclose(with_context(images)[0], with_context(other_neighbours)[0])


def test_a_symmetric_cnn_sees_bilateral_asymmetry_and_nothing_where_the_head_is_symmetric():
    torch.manual_seed(0)
    symmetric = SliceCNN(replace(TINY_NET, symmetric=True)).eval()
    assert symmetric.feature_dim == 2 * SliceCNN(TINY_NET).feature_dim
    assert symmetric.state_dict().keys() == SliceCNN(TINY_NET).state_dict().keys()  # pre-trained weights load alike
    left = torch.rand(2, 3, 32, 16)
    mirror_image = torch.cat([left, left.flip(-1)], dim=-1)
    one_sided = mirror_image.clone()
    one_sided[:, :, 10:14, 4:8] += 1.0  # a dense spot on one side only
    with torch.no_grad():
        half = symmetric.feature_dim // 2
        assert not symmetric.encoder(mirror_image)[:, half:].any()
        assert float(symmetric.encoder(one_sided)[:, half:].amax()) > 0
        _, _, cam = symmetric.grad_cam(one_sided)
    assert cam.shape == (2, 32, 32)


def _tilted_head(tilt_degrees: float, centre: tuple[float, float], size: int = 64) -> torch.Tensor:
    """(1, 3, size, size): an elliptic head leaning `tilt_degrees` from the vertical, mirror-symmetric
    about its own long axis (two dense spots, one each side), off the image's centre."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    t = torch.tensor(tilt_degrees).deg2rad()
    along = (xs - centre[0]) * torch.sin(t) + (ys - centre[1]) * torch.cos(t)
    across = (xs - centre[0]) * torch.cos(t) - (ys - centre[1]) * torch.sin(t)
    head = ((along / 22) ** 2 + (across / 15) ** 2 <= 1).float() * 0.5
    spots = ((across.abs() - 7) ** 2 + (along - 4) ** 2 <= 9).float() * 0.5
    return (head + spots).expand(1, 3, size, size).clone()


def test_head_midline_reflection_maps_a_tilted_symmetric_head_onto_itself():
    head = _tilted_head(15.0, centre=(28.0, 34.0))
    reflected = head_midline_reflection(head)
    image_flip = head.flip(-1)
    assert float((reflected - head).abs().mean()) < 0.2 * float((image_flip - head).abs().mean())
    one_sided = head.clone()
    one_sided[..., 20:26, 36:42] += 1.0
    assert float((head_midline_reflection(one_sided) - one_sided).abs()[..., 20:26, 36:42].mean()) > 0.5
    # upright and centred, the head midline is the image's
    upright = _tilted_head(0.0, centre=(31.5, 31.5))
    assert torch.allclose(head_midline_reflection(upright), upright.flip(-1), atol=1e-4)


def test_a_head_midline_cnn_finds_less_asymmetry_in_a_tilted_symmetric_head():
    torch.manual_seed(0)
    by_image, by_head = (SliceCNN(replace(TINY_NET, symmetric=True, mirror_axis=axis)).eval() for axis in MIRROR_AXES)
    by_head.load_state_dict(by_image.state_dict())
    head = _tilted_head(15.0, centre=(28.0, 34.0))
    half = by_image.feature_dim // 2
    with torch.no_grad():
        asymmetry = [float(cnn.encoder(head)[:, half:].mean()) for cnn in (by_image, by_head)]
    assert asymmetry[1] < 0.5 * asymmetry[0]


def test_mirror_axis_is_checked():
    with pytest.raises(ValueError, match="mirror_axis"):
        ResNeXtConfig(mirror_axis="diagonal")


def test_brain_window_cnn_reads_the_brain_window_alone():
    """channels = 1: a brain-window-only slice (RSNA) and the same slice with full HU give the same logits."""
    torch.manual_seed(0)
    cnn = SliceCNN(ResNeXtConfig(widths=(8, 8, 8, 8), groups=2, stem=8, channels=1)).eval()
    full = torch.rand(2, 3, 32, 32)
    brain_only = full.clone()
    brain_only[:, 1:] = 0
    with torch.no_grad():
        assert torch.equal(cnn(full)[0], cnn(brain_only)[0])
        changed = full.clone()
        changed[:, 0] = torch.rand(2, 32, 32)
        assert not torch.equal(cnn(full)[0], cnn(changed)[0])


def test_sequence_model_pca_and_per_slice_logits():
    seq = SliceSequenceModel(feature_dim=10, components=3, hidden=4, layers=2, dropout=0.3).eval()
    feats = np.random.default_rng(0).normal(size=(50, 10)).astype(np.float32)
    explained = seq.fit_pca(feats)
    assert 0 < explained <= 1
    reduced = (torch.from_numpy(feats) - seq.pca_mean) @ seq.pca_basis.T
    assert torch.allclose(reduced.std(dim=0), torch.ones(3), atol=1e-3)  # whitened components
    out = seq(torch.from_numpy(feats[:7])[None], torch.rand(1, 7, 6))
    assert out.shape == (1, 7, 6)


def test_attention_mil_weights_sum_to_one():
    mil = AttentionMIL(TINY_NET, attention_dim=4).eval()
    logits, attention = mil(torch.rand(6, 3, 32, 32))
    assert logits.shape == (6,) and attention.shape == (6,)
    assert float(attention.detach().sum()) == pytest.approx(1.0, abs=1e-5)


def test_unet_and_pixel_weight_fusion():
    unet = UNet(base=4, depth=2, out_channels=6).eval()
    images = torch.rand(2, CHANNELS, 32, 32)
    assert unet(images).shape == (2, 6, 32, 32)
    with torch.no_grad():  # the window channels alone: a mask is of its own slice
        assert torch.equal(unet(images), unet(images[:, :WINDOW_CHANNELS]))
    fusion = PixelWeightFusion(members=4, hidden=2)
    maps = torch.rand(2, 4, 16, 16)
    fused, weights = fusion(maps)
    assert fused.shape == (2, 16, 16)
    assert torch.allclose(weights.sum(dim=1), torch.ones(2, 16, 16), atol=1e-5)
    assert bool((fused >= maps.amin(dim=1) - 1e-6).all() and (fused <= maps.amax(dim=1) + 1e-6).all())


def test_an_untrained_unet_says_no_blood():
    torch.manual_seed(0)
    ensemble = Ensemble(TINY).eval()
    probs, _ = ensemble.unet_maps(torch.rand(2, 3, 32, 32))
    assert float(probs.mean()) == pytest.approx(0.01, abs=0.01) and float(probs.amax()) < 0.2


def test_a_bag_of_slice_cnns_averages_their_logits_and_grad_cams_and_gives_the_first_ones_features():
    torch.manual_seed(0)
    bag = Ensemble(replace(TINY, cnn_bag_channels=(CHANNELS,))).eval()
    assert [cnn.encoder.channels for cnn in bag.slice_cnns] == [WINDOW_CHANNELS, CHANNELS]
    x = torch.rand(3, CHANNELS, 32, 32)
    logits, features, cam = bag.mirrored_cnn(x)
    each = [Ensemble.mirrored(cnn, x) for cnn in bag.slice_cnns]
    assert torch.allclose(logits, (each[0][0] + each[1][0]) / 2, atol=1e-6)
    assert torch.allclose(cam, (each[0][2] + each[1][2]) / 2, atol=1e-6)
    assert torch.equal(features, each[0][1])
    # the second CNN reads the context channels, the first does not
    other_context = torch.cat([x[:, :WINDOW_CHANNELS], torch.rand(3, CONTEXT_CHANNELS, 32, 32), x[:, BONE_CHANNEL:]], dim=1)
    assert torch.equal(Ensemble.mirrored(bag.cnn, other_context)[0], each[0][0])
    assert not torch.allclose(Ensemble.mirrored(bag.cnn_bag[0], other_context)[0], each[1][0])
    # one CNN (every shipped model before the bag): the weight files keep their keys
    assert not any(k.startswith("cnn_bag") for k in Ensemble(TINY).state_dict())
    with pytest.raises(ValueError, match="cnn_bag_channels: 7 input channels"):
        EnsembleConfig.from_dict({"cnn_bag_channels": [3, 7]})
    from_toml = EnsembleConfig.from_dict({"cnn_bag_channels": [5]})  # a TOML array
    assert from_toml.cnn_bag_channels == (5,) and hash(from_toml)  # fold bags compare configs in a set


def test_prepare_makes_the_context_and_bone_channels_only_for_a_model_that_reads_them():
    hu = head(slices=4)
    assert TINY.cnn.channels <= WINDOW_CHANNELS and TINY.input_channels == WINDOW_CHANNELS
    assert replace(TINY, cnn_bag_channels=(BONE_CHANNEL,)).input_channels == BONE_CHANNEL
    assert replace(TINY, mil=replace(TINY.mil, channels=CHANNELS)).input_channels == CHANNELS
    everything = prepare(hu, 32, slice_mm=5.0).images
    for channels in (WINDOW_CHANNELS, BONE_CHANNEL):
        fewer = prepare(hu, 32, slice_mm=5.0, channels=channels).images
        assert fewer.shape[1] == channels and torch.equal(everything[:, :channels], fewer)


def test_unet_maps_average_each_slice_with_its_mirror_image():
    torch.manual_seed(0)
    ensemble = Ensemble(TINY).eval()
    x = torch.rand(2, 3, 32, 32)
    probs, share = ensemble.unet_maps(x)
    mirrored_probs, mirrored_share = ensemble.unet_maps(x.flip(-1))
    assert torch.allclose(mirrored_probs, probs.flip(-1), atol=1e-6)
    assert torch.allclose(mirrored_share, share.flip(-1), atol=1e-6)
    assert torch.allclose(share.sum(dim=1), torch.ones(2, 32, 32), atol=1e-5)


def test_unet_scan_score_looks_only_inside_the_intracranial_region():
    ensemble = Ensemble(TINY).eval()
    out = ensemble.run_members(torch.rand(2, 3, 32, 32))
    out.fused = torch.zeros(2, 32, 32)
    out.fused[0, 0:4, 0:4] = 1.0  # a confident "lesion" in the scalp corner
    inside = torch.zeros(2, 32, 32, dtype=torch.bool)
    inside[:, 8:24, 8:24] = True
    column = ensemble.scan_member_logits(out, inside)[:, SCAN_MEMBERS.index("unet_ensemble")]
    assert bool((torch.sigmoid(column) < 0.01).all())
    out.fused[1, 14:18, 14:18] = 1.0  # the same inside the head
    assert float(torch.sigmoid(ensemble.scan_member_logits(out, inside)[0, SCAN_MEMBERS.index("unet_ensemble")])) > 0.99


def test_combiner_calibrates_the_mean_member_logit_without_reweighting_members():
    comb = Combiner(members=2)
    logits = torch.tensor([[[2.0, -2.0]] * 6])
    assert torch.allclose(comb(logits), torch.full((1, 6), 0.5))
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(300, 6, generator=gen) < 0.3).float()
    # both members agree, but are overconfident by 4x and biased upwards by 3
    member = ((y * 2 - 1) * 2 + torch.randn(300, 6, generator=gen)) * 4 + 3
    x = torch.stack([member, member + torch.randn(300, 6, generator=gen)], dim=-1)
    before = x.mean(dim=-1)
    comb.fit(x, y)
    assert torch.allclose(comb.coef[:, 0], comb.coef[:, 1])  # equal weights, positive scale
    assert bool((comb.coef > 0).all())
    p = comb(x)
    ranked = torch.gather(p, 0, torch.argsort(before, dim=0))
    assert bool((ranked.diff(dim=0) >= 0).all())  # calibration keeps every label's ranking
    assert float(p[y == 1].mean()) > 0.8 and float(p[y == 0].mean()) < 0.2
    assert abs(float(p.mean()) - float(y.mean())) < 0.05  # calibrated: mean probability ~ prevalence


# -- weights on disk and detect() -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model")
    save_model(Ensemble(TINY).eval(), out, "tiny", "0.0.1", {"train": []}, {})
    return out


def test_detect_fills_every_field_with_consistent_shapes(tiny_model):
    detector = load_detector(tiny_model, device="cpu")
    volume = Volume.from_array(head(slices=5, rows=40, cols=44), spacing_mm=(5.0, 0.5, 0.5))
    out = detector.detect(volume)
    assert isinstance(out, DetectorOutput)
    assert (detector.name, detector.version) == ("tiny", "0.0.1") == (out.model_name, out.model_version)
    assert set(out.probabilities) == set(LABELS)
    assert all(0.0 <= p <= 1.0 for p in out.probabilities.values())
    assert out.slice_scores.shape == (5,) and out.slice_probabilities.shape == (5, 6)
    assert np.allclose(out.slice_scores, out.slice_probabilities[:, 0])
    assert out.heatmaps.shape == (5, 40, 44) and out.heatmaps.dtype == np.float32
    assert out.heatmaps.min() >= 0.0 and out.heatmaps.max() <= 1.0
    assert set(out.masks) == set(SUBTYPES)
    assert all(m.shape == (5, 40, 44) and m.dtype == bool for m in out.masks.values())
    union = np.logical_or.reduce(list(out.masks.values()))
    assert out.volumes_ml["any"] == pytest.approx(union.sum() * volume.voxel_volume_ml)
    assert out.difficult == (0.4 <= out.probabilities["any"] <= 0.6)
    assert {"cnn_lstm", "attention_mil", "unet_ensemble", "slice_cnn"} <= set(out.member_outputs)
    assert out.parameters["working_size"] == "32"


def test_heatmaps_and_masks_are_zero_outside_the_head(tmp_path):
    torch.manual_seed(0)
    ensemble = Ensemble(TINY).eval()
    for unet in ensemble.unets.values():
        unet.out.bias.data[0] = 20.0  # every member says "bleed" everywhere in the working grid
    save_model(ensemble, tmp_path, "saturated", "0.0.1", {"train": []}, {})
    hu = skull_head(slices=3)
    out = load_detector(tmp_path, device="cpu").detect(Volume.from_array(hu))
    inside = intracranial_mask(hu)
    assert out.heatmaps[inside].min() > 0.9
    assert not out.heatmaps[~inside].any()
    union = np.logical_or.reduce(list(out.masks.values()))
    assert union[inside].mean() > 0.9 and not union[~inside].any()
    assert out.volumes_ml["any"] == pytest.approx(union.sum() * Volume.from_array(hu).voxel_volume_ml)


def test_fold_bag_averages_its_ensembles_and_round_trips_through_the_weight_files(tmp_path):
    torch.manual_seed(0)
    ensembles = [Ensemble(TINY).eval() for _ in range(2)]
    bag = FoldBag.of(ensembles).eval()
    images = prepare(skull_head(slices=3, size=40), TINY.working_size, slice_mm=5.0).images
    outs = [e.run_members(images) for e in ensembles]
    mean = bag.run_members(images)
    for name in ("cnn_logits", "cam", "lstm_logits", "mil_logits", "fused"):
        assert torch.allclose(getattr(mean, name), (getattr(outs[0], name) + getattr(outs[1], name)) / 2, atol=1e-5), name
    assert not torch.allclose(outs[0].cnn_logits, outs[1].cnn_logits)  # the average is not of two copies
    save_model(bag, tmp_path, "bag", "0.0.1", {"train": []}, {})
    detector = load_detector(tmp_path, device="cpu")
    assert isinstance(detector.ensemble, FoldBag) and len(detector.ensemble.replicas) == 2
    assert torch.allclose(detector.ensemble.run_members(images).cnn_logits, mean.cnn_logits, atol=1e-5)
    out = detector.detect(Volume.from_array(skull_head(slices=3, size=40), spacing_mm=(5.0, 0.5, 0.5)))
    assert set(out.probabilities) == set(LABELS) and out.heatmaps.shape == (3, 40, 40)


def test_fold_bag_refuses_ensembles_of_different_configs():
    with pytest.raises(ValueError, match="share one config"):
        FoldBag.of([Ensemble(TINY), Ensemble(replace(TINY, slice_top_k=2))])


def test_detect_reports_timings_per_member(tiny_model):
    timings: dict[str, float] = {}
    load_detector(tiny_model, device="cpu").detect(Volume.from_array(head()), timings)
    assert {"preprocess", "slice_cnn", "cnn_lstm", "attention_mil", "unets", "pixel_fusion"} <= set(timings)


def test_corrupt_weights_raise_model_load_error_naming_the_file(tiny_model, tmp_path):
    for f in (MANIFEST, WEIGHTS_FILE):
        (tmp_path / f).write_bytes((tiny_model / f).read_bytes())
    with (tmp_path / WEIGHTS_FILE).open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(ModelLoadError, match=f"{WEIGHTS_FILE}.*corrupt"):
        load_detector(tmp_path)


def test_missing_weights_or_manifest_raise_clear_errors(tiny_model, tmp_path):
    (tmp_path / MANIFEST).write_bytes((tiny_model / MANIFEST).read_bytes())
    with pytest.raises(ModelLoadError, match=f"{WEIGHTS_FILE}.*missing"):
        load_detector(tmp_path)
    with pytest.raises(ModelLoadError, match=f"{MANIFEST}.*missing"):
        load_detector(tmp_path / "nowhere")
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_detector(tmp_path)


def test_shipped_manifest_lists_every_weight_file():
    from worker.detector.store import SHIPPED_DIR, sha256

    manifest = json.loads((SHIPPED_DIR / MANIFEST).read_text())
    assert manifest["files"] and all(sha256(SHIPPED_DIR / f) == d for f, d in manifest["files"].items())
    total = sum((SHIPPED_DIR / f).stat().st_size for f in manifest["files"])
    assert total <= 50 * 2**20


def test_shipped_detector_ranks_positive_phantom_above_negative():
    from training.phantom import make_study

    detector = load_detector(device="cpu")
    p = {}
    for positive in (True, False):
        study = make_study(31337, positive=positive, matrix=96, n_slices=12)
        out = detector.detect(Volume.from_array(study.hu))
        assert out.heatmaps.shape == study.hu.shape
        assert not out.heatmaps[study.hu <= -300].any()  # nothing in the air around the head
        assert not out.heatmaps[~intracranial_mask(study.hu)].any()
        p[positive] = out.probabilities["any"]
    assert p[True] > p[False]
