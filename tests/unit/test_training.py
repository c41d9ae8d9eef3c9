"""Training and evaluation: metrics on known inputs, data specs, a tiny end-to-end training run."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from training.datasets import _parse_spec
from training.evaluate import bootstrap_ci, dice, roc_auc, roc_curve, slice_hit, weighted_log_loss

torch.set_num_threads(1)


def test_auc_of_perfect_reversed_and_tied_scores():
    y = np.array([0, 0, 1, 1, 0, 1])
    assert roc_auc(y, y * 0.9 + 0.05) == 1.0
    assert roc_auc(y, 1 - y) == 0.0
    assert roc_auc(y, np.full(6, 0.3)) == 0.5
    assert math.isnan(roc_auc(np.ones(4), np.arange(4)))


def test_auc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    s = rng.normal(size=40) + y
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert roc_auc(y, s) == pytest.approx(np.mean(pairs))


def test_bootstrap_interval_contains_the_point_estimate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    s = rng.normal(size=60) + 1.5 * y
    low, high = bootstrap_ci(y, s, n=300)
    assert low <= roc_auc(y, s) <= high
    assert 0.0 <= low < high <= 1.0


def test_roc_curve_runs_from_origin_to_corner():
    fpr, tpr = roc_curve(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_rsna_weighted_log_loss_counts_any_twice():
    y = np.zeros((1, 6))
    p = np.full((1, 6), 0.5)
    assert weighted_log_loss(y, p) == pytest.approx(math.log(2))
    p_bad_any = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.1]])
    p_bad_edh = np.array([[0.1, 0.9, 0.1, 0.1, 0.1, 0.1]])
    assert weighted_log_loss(y, p_bad_any) > weighted_log_loss(y, p_bad_edh)


def test_dice_and_slice_localisation():
    a = np.zeros((2, 4, 4), bool)
    a[0, :2] = True
    assert dice(a, a) == 1.0 and dice(a, ~a) == 0.0 and dice(~np.ones_like(a), ~np.ones_like(a)) == 1.0
    positive = np.array([False] * 8 + [True, False])
    assert slice_hit(np.eye(10)[8], positive)  # the top slice (10% of 10) is the positive one
    assert not slice_hit(np.eye(10)[0], positive)


def test_data_specs_parse():
    assert _parse_spec("phantom:seed=9999,n=60") == ("phantom", "", {"seed": "9999", "n": "60"})
    assert _parse_spec("ctich:heldout") == ("ctich", "heldout", {})
    assert _parse_spec("/data/some/folder") == ("folder", "/data/some/folder", {})


def test_tiny_training_run_writes_loadable_weights_and_metrics(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        f"""
[run]
seed = 1
threads = 1
device = "cpu"
[data]
train = ["phantom:seed=77,n=6,matrix=64,slices=6"]
validation_fraction = 0.34
[model]
working_size = 32
cnn = {{ widths = [8, 8, 8, 8], groups = 2, stem = 8 }}
mil = {{ widths = [8, 8, 8, 8], groups = 1, stem = 8 }}
pca_components = 4
lstm_hidden = 4
attention_dim = 4
unet_base = 4
unet_depth = 2
fusion_hidden = 2
[mil]
label_source = "reports"
[stages]
batch = 4
cnn_steps = 3
lstm_steps = 3
mil_steps = 3
unet_steps = 3
specialist_steps = 2
fusion_steps = 2
[output]
dir = "{tmp_path / 'model'}"
name = "tiny-trained"
version = "0.0.0"
[evaluate]
out = "{tmp_path / 'eval'}"
data = ["phantom:seed=78,n=4,matrix=64,slices=6"]
"""
    )
    from training.train import train_main
    from worker.detector import load_detector

    train_main(config)
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    assert manifest["name"] == "tiny-trained"
    assert manifest["training_data"]["train_scans"] + manifest["training_data"]["validation_scans"] == 6
    summary = manifest["metrics"]["phantom:seed=78,n=4,matrix=64,slices=6"]
    assert summary["scans"] == 4
    reports = list((tmp_path / "eval").iterdir())
    assert len(reports) == 1 and (reports[0] / "metrics.md").is_file() and (reports[0] / "metrics.json").is_file()
    assert load_detector(tmp_path / "model", device="cpu").name == "tiny-trained"


def test_benchmark_reports_every_member_and_the_total(capsys):
    from training.benchmark import benchmark_main

    result = benchmark_main(slices=4, matrix=64)
    assert {"slice_cnn", "cnn_lstm", "attention_mil", "unets", "pixel_fusion"} <= set(result["steps_seconds"])
    assert result["total_seconds"] > 0
    assert "total" in capsys.readouterr().out


def test_unet_pools_use_slice_labels_of_scans_without_masks():
    """A CT-ICH-like scan (slice labels, no masks): its clean slices are all-zero targets, its
    bleeding slices weak positives for the all-ICH U-Net (and the SDH specialist where labelled SDH)."""
    from training.data import Scan
    from training.train import _lesion_target, _unet_pool, make_example
    from ichnode.common.vocabulary import LABELS
    from worker.detector.ensemble import EnsembleConfig
    from worker.geometry import Volume

    hu = np.full((4, 32, 32), 30.0, np.float32)
    slice_labels = np.zeros((4, len(LABELS)), np.int64)
    slice_labels[1:3, 0] = 1
    slice_labels[2, LABELS.index("SDH")] = 1
    scan = Scan(scan_id="s", patient_id="p", volume=Volume.from_array(hu), slice_labels=slice_labels,
                labels={k: int(slice_labels[:, i].any()) for i, k in enumerate(LABELS)})
    example = make_example(scan, EnsembleConfig(working_size=32))
    assert example.lesion is None
    pos, neg, weak = _unet_pool([example], "all")
    assert pos == [] and [i for _, i in neg] == [0, 3] and [i for _, i in weak] == [1, 2]
    assert [i for _, i in _unet_pool([example], "sdh")[2]] == [2]
    assert _unet_pool([example], "small")[2] == []
    assert torch.equal(_lesion_target(example, 0), torch.zeros(32, 32))


def test_mixed_precision_is_float16_on_cuda_bfloat16_only_where_the_cpu_has_it_and_off_means_float32():
    from training.train import autocast_dtype

    assert autocast_dtype(torch.device("cuda"), "auto") == torch.float16
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert autocast_dtype(torch.device("cpu"), "auto") == (torch.bfloat16 if native else None)
    assert autocast_dtype(torch.device("cpu"), "off") is None
    assert autocast_dtype(torch.device("cuda"), "off") is None


def test_augmentation_stays_float32_inside_a_mixed_precision_step():
    """The trainer runs the whole loss, data included, under autocast: the augmented images must
    not come out (or break) in bfloat16."""
    from training.augment import AugmentConfig, augment, warp_masks

    images = torch.rand(4, 3, 32, 32).half()
    every_step = AugmentConfig(blur_probability=1.0, resample_probability=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, grid = augment(images, every_step, torch.Generator().manual_seed(0))
        masks = warp_masks(torch.ones(4, 32, 32).half(), grid)
    assert x.dtype == torch.float32 and masks.dtype == torch.float32
    assert x.shape == images.shape and 0 <= float(x.min()) and float(x.max()) <= 1


def test_augmentation_drops_windows_and_context_and_keeps_missing_channels_missing():
    """Channel and context dropout zero their channels; a channel absent from the input (RSNA's
    subdural window, a lone slice's neighbours) stays zero through contrast, noise and blur."""
    from training.augment import AugmentConfig, augment
    from worker.detector.preprocess import BONE_CHANNEL, CHANNELS, WINDOW_CHANNELS

    images = torch.rand(6, CHANNELS, 32, 32) * 0.5 + 0.25
    images[:3, 1:WINDOW_CHANNELS] = images[:3, BONE_CHANNEL] = 0  # brain window only
    images[3:, WINDOW_CHANNELS:BONE_CHANNEL] = 0  # slices that stand alone

    def present(cfg: AugmentConfig) -> torch.Tensor:
        x, _ = augment(images, cfg, torch.Generator().manual_seed(0))
        return x.amax(dim=(2, 3)) > 0

    kept = present(AugmentConfig(channel_dropout=0.0, context_dropout=0.0, blur_probability=1.0))
    assert torch.equal(kept, images.amax(dim=(2, 3)) > 0)
    dropped = present(AugmentConfig(channel_dropout=1.0, context_dropout=1.0))
    assert dropped[:, 0].all() and not dropped[:, 1:].any()
    windows_dropped = present(AugmentConfig(channel_dropout=1.0, context_dropout=0.0))  # the bone window with them
    assert torch.equal(windows_dropped[:, WINDOW_CHANNELS:BONE_CHANNEL], kept[:, WINDOW_CHANNELS:BONE_CHANNEL])
    assert not windows_dropped[:, 1:WINDOW_CHANNELS].any() and not windows_dropped[:, BONE_CHANNEL].any()
    context_dropped = present(AugmentConfig(channel_dropout=0.0, context_dropout=1.0))
    assert torch.equal(context_dropped[:, BONE_CHANNEL], kept[:, BONE_CHANNEL]) and kept[3:, BONE_CHANNEL].all()
    assert not context_dropped[:, WINDOW_CHANNELS:BONE_CHANNEL].any()
    assert torch.equal(present(AugmentConfig().for_pretraining()), dropped)


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "training").glob("*.toml")))
def test_every_shipped_training_config_validates(path):
    from training.config import load_training_config

    cfg = load_training_config(path)
    assert cfg.ensemble().working_size >= 128 and cfg.data.train


def test_training_config_names_a_bad_key(tmp_path):
    from ichnode.common.config import ConfigError
    from training.config import load_training_config

    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\ntrain = ["ctich:all"]\n[output]\ndir = "x"\n[stages]\ncnn_step = 3\n')
    with pytest.raises(ConfigError, match="cnn_step"):
        load_training_config(bad)


def test_auc_by_volume_compares_each_size_bin_with_all_negatives():
    from training.evaluate import auc_by_volume

    y = np.array([1, 1, 1, 0, 0])
    p = np.array([0.2, 0.9, 0.95, 0.5, 0.1])
    bins = auc_by_volume(y, p, [2.0, 10.0, 50.0, 0.0, 0.0])
    assert bins == {"< 5 mL": 0.5, "5-30 mL": 1.0, ">= 30 mL": 1.0}
    assert auc_by_volume(y, p, [None] * 5) == {}


def test_slice_cnn_batches_take_their_patient_share_from_the_focus_scans(monkeypatch):
    """With cnn_patient_share 0.5, half of every batch comes from the real patients' slices (half
    of those bleeding), the rest from the whole pool; with 0, the focus scans are not drawn apart."""
    import training.train as train
    from training.augment import AugmentConfig
    from worker.detector.members import SliceCNN
    from worker.detector.ensemble import EnsembleConfig

    def example(scan_id: str, bleeding: list[int]) -> train.Example:
        labels = torch.zeros(4, 6)
        labels[bleeding, 0] = 1
        return train.Example(scan_id, scan_id, torch.rand(4, 3, 32, 32).half(), labels.amax(0), labels, None, None, 0.0,
                             torch.ones(4, 32, 32, dtype=torch.bool))

    patient, other = example("patient", [1]), example("other", [0, 1, 2])
    drawn: list[list[tuple[str, int]]] = []
    original = train._balanced_slices

    def recording(rng, positives, negatives, batch, hard=(), bleeding_share=0.5):
        chosen = original(rng, positives, negatives, batch, hard, bleeding_share=bleeding_share)
        drawn.append([(e.scan_id, int(e.slice_labels[i, 0])) for e, i in chosen])
        return chosen

    monkeypatch.setattr(train, "_balanced_slices", recording)
    cnn = SliceCNN(EnsembleConfig().cnn, 0.0)
    trainer = train.Trainer(torch.device("cpu"), seed=1, mixed_precision="off")
    train.train_slice_cnn("t", cnn, [patient, other], trainer, 2, 8, 1e-3, AugmentConfig(), focus=[patient], focus_share=0.5)
    focus_part, rest = drawn[0], drawn[1]
    assert len(focus_part) == 4 and {s for s, _ in focus_part} == {"patient"}
    assert sorted(y for _, y in focus_part) == [0, 0, 1, 1] and len(rest) == 4
    drawn.clear()
    train.train_slice_cnn("t", cnn, [patient, other], trainer, 1, 8, 1e-3, AugmentConfig(), focus=[patient], focus_share=0.0)
    assert drawn[0] == [] and len(drawn[1]) == 8
    drawn.clear()  # a quarter bleeding, rounded down: 1 of the focus part's 7 slices, 4 of the pool's 17
    train.train_slice_cnn("t", cnn, [patient, other], trainer, 1, 24, 1e-3, AugmentConfig(), focus=[patient], focus_share=0.3,
                          bleeding_share=0.25)
    assert [sum(y for _, y in part) for part in drawn] == [1, 4] and [len(part) for part in drawn] == [7, 17]


def test_set_overrides_a_config_key_as_toml_and_names_a_bad_one(tmp_path):
    from ichnode.common.config import ConfigError
    from training.config import load_training_config

    demo = ROOT / "config" / "training" / "demo.toml"
    cfg = load_training_config(demo, ["model.cnn_bag_channels=[5]", "stages.cnn_patient_share=0.5", "run.checkpoints=var/x",
                                      "cv.members=['slice_cnn']"])
    assert cfg.ensemble().cnn_bag_channels == (5,) and cfg.stages.cnn_patient_share == 0.5
    assert cfg.run.checkpoints == "var/x" and cfg.cv.members == ["slice_cnn"]
    with pytest.raises(ConfigError, match="cnn_patient_shar"):
        load_training_config(demo, ["stages.cnn_patient_shar=0.5"])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_training_config(demo, ["cnn_bag_channels=[5]"])


@pytest.mark.parametrize("cnn_bleeds, unet_bleeds", [(3, 5), (4, 2), (0, 5)])
def test_synthesised_bleeds_reach_the_slice_cnns_fine_tuning_and_the_u_nets_from_one_draw(monkeypatch, cnn_bleeds, unet_bleeds):
    """`cnn_synthetic_bleeds` adds that many synthesised slices to the slice CNN's fine-tuning (never
    to its pre-training, which sees no CT-ICH patient); the U-Nets keep their `synthetic_bleeds`;
    both are the start of one draw, so the U-Nets' slices do not change with the CNN's count."""
    import training.train as train
    from training.config import load_training_config

    cfg = load_training_config(ROOT / "config" / "training" / "demo.toml", [
        "model.working_size=32", "model.cnn={ widths = [8, 8, 8, 8], groups = 2, stem = 8 }",
        "model.mil={ widths = [8, 8, 8, 8], groups = 2, stem = 8 }", "model.unet_base=4", "model.unet_depth=2",
        f"stages.cnn_synthetic_bleeds={cnn_bleeds}", f"stages.synthetic_bleeds={unet_bleeds}", "run.checkpoints=''",
    ])
    patient = train.Example("p", "p", torch.rand(4, 3, 32, 32).half(), torch.zeros(6), torch.zeros(4, 6), None, None, 0.0,
                            torch.ones(4, 32, 32, dtype=torch.bool))
    draws, stages = [], {}
    monkeypatch.setattr(train, "synthetic_examples", lambda examples, n, seed: draws.append(n) or [
        train.replace(patient, scan_id=f"synthetic-{k}") for k in range(n)])
    monkeypatch.setattr(train, "train_slice_cnn", lambda name, cnn, data, *a, **k: stages.setdefault(name, data))
    monkeypatch.setattr(train, "train_unets", lambda ensemble, data, *a: stages.setdefault("U-Nets", data))
    monkeypatch.setattr(train, "train_fusion", lambda *a: None)
    data = train.TrainingData(train=[patient], slices=[], validation=[], mil_labels={})
    train.train_ensemble(cfg, data, torch.device("cpu"), None, members=("slice_cnn", "unet_ensemble"))

    def synthetic(name: str) -> list[str]:
        return [e.scan_id for e in stages[name] if e.scan_id.startswith("synthetic")]

    assert draws == [max(cnn_bleeds, unet_bleeds)]
    assert synthetic("slice CNN pre-training") == []
    assert synthetic("slice CNN") == [f"synthetic-{k}" for k in range(cnn_bleeds)]
    assert synthetic("U-Nets") == [f"synthetic-{k}" for k in range(unet_bleeds)]


@pytest.mark.parametrize("focus, expected", [("patients", ["child", "adult", "unknown age"]), ("children", ["child"])])
def test_the_patient_share_draws_from_the_children_alone_when_the_focus_is_children(monkeypatch, focus, expected):
    """`cnn_focus = "children"`: the fine-tuning's patient share (and run share) comes from the real
    patients known to be under 18; a patient of unknown age is not one of them."""
    import training.train as train
    from training.config import load_training_config

    cfg = load_training_config(ROOT / "config" / "training" / "demo.toml", [
        "model.working_size=32", "model.cnn={ widths = [8, 8, 8, 8], groups = 2, stem = 8 }", f"stages.cnn_focus={focus}",
        "stages.cnn_patient_share=0.25", "run.checkpoints=''", "model.cnn_bag_channels=[]",
    ])

    def patient(scan_id: str, age: float | None) -> train.Example:
        return train.Example(scan_id, scan_id, torch.rand(4, 3, 32, 32).half(), torch.zeros(6), torch.zeros(4, 6), None,
                             None, 0.0, torch.ones(4, 32, 32, dtype=torch.bool), age_years=age)

    focus_of: dict[str, list[str]] = {}
    monkeypatch.setattr(train, "train_slice_cnn", lambda name, *a, focus=(), **k: focus_of.setdefault(
        name, [e.scan_id for e in focus]))
    data = train.TrainingData(train=[patient("child", 9.0), patient("adult", 40.0), patient("unknown age", None)],
                              slices=[], validation=[], mil_labels={})
    train.train_ensemble(cfg, data, torch.device("cpu"), None, members=("slice_cnn",))
    assert focus_of == {"slice CNN pre-training": [], "slice CNN": expected}
    with pytest.raises(Exception, match="cnn_focus"):
        load_training_config(ROOT / "config" / "training" / "demo.toml", ["stages.cnn_focus=elderly"])


def test_scan_score_loss_trains_a_runs_top_k_slices_against_its_label():
    """A clean run: only its top_k slices are pushed down. With one bleeding slice the run's label
    is 1, so its top slices are pulled up, clean or not."""
    from training.train import scan_score_loss

    clean = torch.zeros(6, 6)
    logits = torch.tensor([-3.0, 2.0, -3.0, 1.5, -3.0, -3.0])[:, None].repeat(1, 6).requires_grad_()
    scan_score_loss(logits, clean, top_k=2).backward()
    grad = logits.grad[:, 0]
    assert (grad[[1, 3]] > 0).all() and torch.equal(grad[[0, 2, 4, 5]], torch.zeros(4))
    bleeding = clean.clone()
    bleeding[4, 0] = 1
    logits.grad = None
    scan_score_loss(logits, bleeding, top_k=2).backward()
    assert (logits.grad[[1, 3], 0] < 0).all() and logits.grad[4, 0] == 0


def test_slice_cnn_batches_end_with_a_run_of_adjacent_slices_of_one_focus_scan(monkeypatch):
    """With cnn_run_share 0.5, half of every batch is a run of adjacent slices of one real patient's
    scan (the whole scan when shorter, the pooled slices filling the batch), the rest pooled slices;
    with 0 there is no run."""
    import training.train as train
    from training.augment import AugmentConfig
    from worker.detector.members import SliceCNN
    from worker.detector.ensemble import EnsembleConfig

    def example(scan_id: str, n: int, first: int) -> train.Example:
        images = (first + torch.arange(n, dtype=torch.float32))[:, None, None, None].expand(n, 3, 32, 32) / 128
        return train.Example(scan_id, scan_id, images.half(), torch.zeros(6), torch.zeros(n, 6), None, None, 0.0,
                             torch.ones(n, 32, 32, dtype=torch.bool))

    seen: list[list[int]] = []
    monkeypatch.setattr(train, "augment", lambda x, aug, generator: seen.append(
        [round(float(v) * 128) for v in x[:, 0, 0, 0]]) or (x, None))
    long_scan, short_scan, pooled = example("long", 20, 0), example("short", 3, 20), example("pooled", 30, 40)
    scans = [long_scan, short_scan, pooled]
    runs = [list(range(20, 23))] + [list(range(s, s + 4)) for s in range(17)]
    cnn = SliceCNN(EnsembleConfig().cnn, 0.0)
    trainer = train.Trainer(torch.device("cpu"), seed=3, mixed_precision="off")
    train.train_slice_cnn("t", cnn, scans, trainer, 8, 8, 1e-3, AugmentConfig(), focus=[long_scan, short_scan],
                          run_share=0.5, top_k=2)
    assert len(seen) == 8
    for batch in seen:
        tail = batch[-4:] if batch[-4:] in runs else batch[-3:]
        assert tail in runs and len(batch) == 8
    assert any(batch[-3:] == runs[0] for batch in seen) and any(batch[-4:] in runs[1:] for batch in seen)
    seen.clear()
    train.train_slice_cnn("t", cnn, scans, trainer, 4, 8, 1e-3, AugmentConfig(), focus=[long_scan, short_scan], top_k=2)
    assert all(len(batch) == 8 and batch[-4:] not in runs for batch in seen)


def test_mixup_blends_each_fine_tuning_slice_and_its_labels_with_one_partner_and_leaves_pretraining_unmixed(monkeypatch):
    """With [augment] mixup, the CNN sees each slice blended with another of its batch and is
    trained on the same blend of their labels; the pre-training's augmentation does not mix."""
    import training.train as train
    from training.augment import AugmentConfig
    from worker.detector.members import SliceCNN
    from worker.detector.ensemble import EnsembleConfig

    n = 12
    bleeding = (torch.arange(n) % 3 == 0).float()
    images = bleeding[:, None, None, None].expand(n, 3, 32, 32)  # a slice's pixels are its label
    labels = bleeding[:, None].expand(n, 6).clone()
    scan = train.Example("s", "s", images.half(), torch.ones(6), labels, None, None, 0.0,
                         torch.ones(n, 32, 32, dtype=torch.bool))
    monkeypatch.setattr(train, "augment", lambda x, aug, generator: (x, None))
    seen = []
    real_bce = train.F.binary_cross_entropy_with_logits
    monkeypatch.setattr(train.F, "binary_cross_entropy_with_logits",
                        lambda logits, target, **kw: seen.append(target.detach().clone()) or real_bce(logits, target, **kw))
    cnn = SliceCNN(EnsembleConfig().cnn, 0.0)
    encoded = []
    real_encoder = cnn.encoder.forward
    monkeypatch.setattr(cnn.encoder, "forward", lambda x: encoded.append(x[:, 0, 0, 0].clone()) or real_encoder(x))
    trainer = train.Trainer(torch.device("cpu"), seed=3, mixed_precision="off")
    train.train_slice_cnn("t", cnn, [scan], trainer, 4, 8, 1e-3, AugmentConfig(mixup=0.4))
    assert len(encoded) == len(seen) == 4
    for pixels, target in zip(encoded, seen):
        assert torch.allclose(target[:, 0], pixels, atol=1e-6) and torch.allclose(target, target[:, :1].expand_as(target))
    blended = torch.cat(encoded)
    assert ((blended > 0.01) & (blended < 0.99)).any()
    assert AugmentConfig(mixup=0.4).for_pretraining().mixup == 0.0


def test_mixup_trains_the_lesion_map_only_on_blends_of_two_slices_with_known_masks(monkeypatch):
    """A phantom slice blended with a real patient's (mask unknown) has no lesion target: its
    blended map would count the unknown mask as empty."""
    import training.train as train
    from training.augment import AugmentConfig, Mixing
    from worker.detector.members import SliceCNN
    from worker.detector.ensemble import EnsembleConfig

    def example(scan_id: str, masked: bool) -> train.Example:
        labels = torch.zeros(8, 6)
        labels[::2] = 1
        return train.Example(scan_id, scan_id, torch.rand(8, 3, 32, 32).half(), torch.ones(6), labels,
                             torch.ones(8, 32, 32) if masked else None, None, 0.0, torch.ones(8, 32, 32, dtype=torch.bool))

    monkeypatch.setattr(train, "augment", lambda x, aug, generator: (x, torch.zeros(len(x), 32, 32, 2)))
    monkeypatch.setattr(train, "warp_masks", lambda masks, grid: masks)
    draws, targets = [], []
    real_draw = Mixing.draw
    monkeypatch.setattr(train.Mixing, "draw", classmethod(lambda cls, *a: draws.append(real_draw(*a)) or draws[-1]))
    real_bce = train.F.binary_cross_entropy_with_logits
    monkeypatch.setattr(train.F, "binary_cross_entropy_with_logits",
                        lambda logits, target, **kw: targets.append(target.detach().clone()) or real_bce(logits, target, **kw))
    chosen_batches = []
    real_balanced = train._balanced_slices
    monkeypatch.setattr(train, "_balanced_slices", lambda *a, **kw: chosen_batches.append(real_balanced(*a, **kw)) or chosen_batches[-1])
    trainer = train.Trainer(torch.device("cpu"), seed=5, mixed_precision="off")
    train.train_slice_cnn("t", SliceCNN(EnsembleConfig().cnn, 0.0), [example("phantom", True), example("patient", False)],
                          trainer, 6, 8, 1e-3, AugmentConfig(mixup=0.4))
    chosen = [c for c in chosen_batches if c]  # the focus part is empty
    lesion_targets = [t for t in targets if t.dim() == 4]
    assert len(chosen) == len(draws) == 6
    expected = [[k for k, (e, _) in enumerate(batch) if e.lesion is not None and batch[int(m.partner[k])][0].lesion is not None]
                for batch, m in zip(chosen, draws)]
    assert sum(map(len, expected)) > 0 and len(lesion_targets) == sum(1 for k in expected if k)
    assert [len(t) for t in lesion_targets] == [len(k) for k in expected if k]
    assert all(torch.allclose(t, torch.ones_like(t)) for t in lesion_targets)


def test_weight_decay_zero_takes_adams_very_steps_and_otherwise_shrinks_weights_but_not_biases():
    """Weight decay 0 must reproduce the weights trained before it existed (plain Adam); decay
    acts on weights alone (a loss without gradient leaves only the decay)."""
    import training.train as train

    def trained(weight_decay: float | None, gradient: bool = True) -> torch.nn.Module:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
        loss = lambda: module(x).square().mean() * float(gradient)  # noqa: E731
        if weight_decay is None:  # the reference: Adam and the cosine schedule by hand
            adam = torch.optim.Adam(module.parameters(), lr=0.01)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, 5)
            for _ in range(5):
                adam.zero_grad()
                loss().backward()
                adam.step()
                schedule.step()
        else:
            train.Trainer(torch.device("cpu"), seed=1, mixed_precision="off", weight_decay=weight_decay).run(
                "t", module, 5, 0.01, loss)
        return module

    for a, z in zip(trained(None).parameters(), trained(0.0).parameters()):
        assert torch.equal(a, z)
    for start, decayed in zip(trained(None, gradient=False).parameters(), trained(5.0, gradient=False).parameters()):
        assert (decayed.norm() < 0.9 * start.norm()) if start.dim() > 1 else torch.equal(start, decayed)


def test_the_batch_shares_may_not_exceed_one_batch():
    from training.config import load_training_config

    with pytest.raises(Exception, match="cnn_patient_share \\+ cnn_run_share"):
        load_training_config(ROOT / "config" / "training" / "demo.toml", ["stages.cnn_patient_share=0.6", "stages.cnn_run_share=0.5"])


def test_hard_negatives_are_drawn_by_the_bleed_probability_last_predicted_for_them():
    from training.train import HardNegatives

    sampler = HardNegatives(4, torch.Generator().manual_seed(0))
    assert set(sampler.draw(200)) == {0, 1, 2, 3}  # none seen yet: all equally likely
    sampler.update([0, 1, 3], torch.tensor([-30.0, -30.0, -30.0]))
    assert set(sampler.draw(50)) == {2}  # still at 0.5, the others now near 0
    sampler.update([2, 3], torch.tensor([-30.0, 30.0]))
    assert set(sampler.draw(50)) == {3}


def test_slice_cnn_batches_replace_clean_slices_with_hard_negatives_and_remember_their_logits(monkeypatch):
    """With cnn_hard_negative_share 0.5, half the clean slices of each batch come from the hard-negative
    sampler, bleeding slices stay half the batch, and the sampler learns each drawn slice's own logit."""
    import training.train as train
    from training.augment import AugmentConfig
    from worker.detector.members import SliceCNN
    from worker.detector.ensemble import EnsembleConfig

    n = 12  # slice k: image value k/128, bleeding for k < 4; its logit(any) is made (k - 6) / 2
    labels = torch.zeros(n, 6)
    labels[:4, 0] = 1
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 32, 32) / 128
    scan = train.Example("s", "s", images.half(), labels.amax(0), labels, None, None, 0.0, torch.ones(n, 32, 32, dtype=torch.bool))
    batches: list[list[int]] = []
    monkeypatch.setattr(train, "augment", lambda x, aug, generator: batches.append(
        [round(float(v) * 128) for v in x[:, 0, 0, 0]]) or (x, None))
    samplers: list[train.HardNegatives] = []
    drawn: list[list[int]] = []

    class Recording(train.HardNegatives):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            samplers.append(self)

        def draw(self, k: int) -> list[int]:
            drawn.append(super().draw(k))
            return drawn[-1]

    monkeypatch.setattr(train, "HardNegatives", Recording)
    cnn = SliceCNN(EnsembleConfig().cnn, 0.0)
    classify = cnn.classify

    def coded(fmap):
        logits, features = classify(fmap)
        ids = torch.tensor(batches[-1], dtype=torch.float32)
        return logits * 0 + ((ids - 6) / 2)[:, None], features

    monkeypatch.setattr(cnn, "classify", coded)
    trainer = train.Trainer(torch.device("cpu"), seed=5, mixed_precision="off")
    train.train_slice_cnn("t", cnn, [scan], trainer, 6, 8, 1e-3, AugmentConfig(), hard_negative_share=0.5)
    negatives = list(range(4, n))  # the pool's clean slices, in order
    for batch, hard in zip(batches, drawn):
        assert all(k < 4 for k in batch[:4]) and all(k >= 4 for k in batch[4:])
        assert len(hard) == 2 and batch[4:6] == [negatives[j] for j in hard]
    probability = samplers[0].probability
    seen = {j for hard in drawn for j in hard}
    for j, k in enumerate(negatives):
        expected = torch.sigmoid(torch.tensor((k - 6) / 2)) if j in seen else torch.tensor(0.5)
        assert torch.isclose(probability[j], expected)
    batches.clear()
    drawn.clear()
    train.train_slice_cnn("t", cnn, [scan], trainer, 2, 8, 1e-3, AugmentConfig())
    assert drawn == [[], []] and all(len(batch) == 8 for batch in batches)


def test_the_moving_average_of_the_weights_ends_the_stage_and_survives_a_resume(tmp_path):
    """With ema_decay, the stage ends with the exponential moving average of the weights and batch-norm
    statistics after each step, and a run stopped midway resumes to the same average."""
    import training.train as train

    decay, steps, x = 0.8, 6, torch.linspace(-1, 1, 24).reshape(8, 3)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))

    plain, seen = fresh(), []

    def recorded_loss() -> torch.Tensor:
        seen.append({k: v.detach().clone().float() for k, v in plain.state_dict().items()})
        return (plain(x) - 1).pow(2).mean()

    train.Trainer(torch.device("cpu"), seed=1, mixed_precision="off").run("p", plain, steps, 0.1, recorded_loss)
    after_each_step = seen[1:] + [{k: v.float() for k, v in plain.state_dict().items()}]
    expected = dict(after_each_step[0])
    for state in after_each_step[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] for k in expected}

    def averaged(stop_at: int | None, first_decay: float = decay) -> torch.nn.Module:
        module, calls = fresh(), []

        def loss() -> torch.Tensor:
            calls.append(1)
            if len(calls) == stop_at:
                raise KeyboardInterrupt
            return (module(x) - 1).pow(2).mean()

        def run(ema_decay: float) -> None:
            train.Trainer(torch.device("cpu"), seed=1, checkpoints=tmp_path / f"{stop_at}-{first_decay}",
                          checkpoint_seconds=1e-9, mixed_precision="off").run("e", module, steps, 0.1, loss, ema_decay=ema_decay)

        try:
            run(first_decay)
        except KeyboardInterrupt:
            module = fresh()  # as a new process: the weights come from the checkpoint
            run(decay)
        return module

    for module in (averaged(None), averaged(4)):
        for key in ("0.weight", "0.bias", "1.running_mean", "1.running_var"):
            assert torch.allclose(module.state_dict()[key].float(), expected[key], atol=1e-6), key
    assert not torch.allclose(plain.state_dict()["0.weight"], expected["0.weight"], atol=1e-3)
    # a checkpoint written without the average (ema_decay set on resume): the average starts there
    late = after_each_step[3]
    for state in after_each_step[4:]:
        late = {k: decay * late[k] + (1 - decay) * state[k] for k in late}
    assert torch.allclose(averaged(4, first_decay=0.0).state_dict()["0.weight"], late["0.weight"], atol=1e-6)
    assert not torch.allclose(late["0.weight"], expected["0.weight"], atol=1e-3)


def test_batch_norm_statistics_are_re_estimated_on_the_patients_slices_and_the_weights_kept():
    """`reestimate_batch_norm` makes the first normalisation's running mean and variance those of the
    stem convolution over the given slices (not the last training batches'), leaves every weight
    and the momentum as they were, and the CNN in eval mode."""
    import training.train as train
    from worker.detector.members import ResNeXtConfig, SliceCNN

    torch.manual_seed(0)
    cnn = SliceCNN(ResNeXtConfig(channels=2, widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1), groups=2, stem=4))
    cnn.train()
    cnn(torch.randn(8, 2, 32, 32) * 5 + 3)  # running statistics of other data
    weights = {k: v.clone() for k, v in cnn.state_dict().items() if "running" not in k and "num_batches" not in k}
    images = torch.rand(3, 5, 2, 32, 32)
    scans = [train.Example(f"s{k}", f"p{k}", images[k].half(), torch.zeros(6), None, None, None, 0.0,
                           torch.ones(5, 32, 32, dtype=torch.bool)) for k in range(3)]
    assert train.reestimate_batch_norm(cnn, scans, torch.device("cpu"), batch=15, seed=1) == 15

    stem_conv, stem_norm = cnn.encoder.layers[0][0], cnn.encoder.layers[0][1]
    with torch.no_grad():
        out = stem_conv(images.reshape(15, 2, 32, 32).half().float())
    assert torch.allclose(stem_norm.running_mean, out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(stem_norm.running_var, out.var(dim=(0, 2, 3)), rtol=1e-3)
    assert stem_norm.momentum == 0.1 and not cnn.training
    for k, v in cnn.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


@pytest.mark.parametrize("setting, expected", [("training", []), ("patients", [(1, ["p"]), (2, ["p"])])])
def test_each_fine_tuned_cnn_of_a_bag_re_estimates_its_batch_norm_on_the_real_patients_alone(monkeypatch, setting, expected):
    """`cnn_batch_norm = "patients"`: after its fine-tuning, each CNN of the bag re-estimates its
    statistics on the real patients' scans (not the phantoms, which carry masks, nor single slices)."""
    import training.train as train
    from training.config import load_training_config

    cfg = load_training_config(ROOT / "config" / "training" / "demo.toml", [
        "model.working_size=32", "model.cnn={ widths = [8, 8, 8, 8], groups = 2, stem = 8 }",
        "model.mil={ widths = [8, 8, 8, 8], groups = 2, stem = 8 }", "model.cnn_bag_channels=[5]",
        f"stages.cnn_batch_norm={setting!r}", "run.checkpoints=''",
    ])
    patient = train.Example("p", "p", torch.rand(4, 5, 32, 32).half(), torch.zeros(6), torch.zeros(4, 6), None, None, 0.0,
                            torch.ones(4, 32, 32, dtype=torch.bool))
    phantom = train.replace(patient, scan_id="phantom", patient_id="phantom", lesion=torch.zeros(4, 32, 32))
    calls = []
    monkeypatch.setattr(train, "train_slice_cnn", lambda *a, **k: None)
    monkeypatch.setattr(train, "reestimate_batch_norm", lambda cnn, scans, device, batch, seed: calls.append(
        (seed - cfg.run.seed + 1, [e.scan_id for e in scans])) or 0)
    data = train.TrainingData(train=[patient, phantom], slices=[train.replace(patient, scan_id="slice")], validation=[],
                              mil_labels={})
    train.train_ensemble(cfg, data, torch.device("cpu"), None, members=("slice_cnn",))
    assert calls == expected


def test_the_fracture_loss_counts_only_slices_with_a_fracture_label_and_blends_of_two_such_slices():
    """Rows from sources without fracture labels (RSNA, phantoms) add nothing; a mixup blend counts
    only where both of its slices have a label, against the blended label."""
    import training.train as train
    from training.augment import Mixing

    def example(fracture):
        return train.Example("s", "p", torch.zeros(2, 1, 4, 4).half(), torch.zeros(6), torch.zeros(2, 6), None, None, 0.0,
                             torch.ones(2, 4, 4, dtype=torch.bool), slice_fracture=fracture)

    labelled, unlabelled = example(torch.tensor([1.0, 0.0])), example(None)
    head = torch.nn.Linear(3, 1)
    features = torch.randn(4, 3)
    chosen = [(labelled, 0), (unlabelled, 0), (labelled, 1), (unlabelled, 1)]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        logits = head(features)[:, 0]
        assert torch.allclose(train.fracture_loss(head, features, chosen, None, 4), bce(logits[[0, 2]], torch.tensor([1.0, 0.0])))
        assert train.fracture_loss(head, features, [(unlabelled, 0)], None, 1) == 0
        mixing = Mixing(torch.tensor([2, 0, 0, 3]), torch.tensor([0.25, 0.5, 0.75, 1.0]))  # rows 0, 2: two labelled slices
        expected = bce(logits[[0, 2]], torch.tensor([0.25, 0.25]))  # 0.25 of 1 and 0.75 of 0; 0.75 of 0 and 0.25 of 1
        assert torch.allclose(train.fracture_loss(head, features, chosen, mixing, 4), expected)


def test_fine_tuning_with_a_fracture_weight_trains_and_checkpoints_the_head_beside_the_cnn(tmp_path):
    """The fracture head is trained with the CNN and kept in the stage's checkpoint, so a resumed run
    finds it; the CNN itself keeps its own state-dict keys (the saved model has no fracture head)."""
    import training.train as train
    from training.augment import AugmentConfig
    from worker.detector.members import ResNeXtConfig, SliceCNN

    torch.manual_seed(0)
    cnn = SliceCNN(ResNeXtConfig(channels=1, widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1), groups=2, stem=4))
    keys = set(cnn.state_dict())
    scan = train.Example("s", "p", torch.rand(4, 1, 32, 32).half(), torch.ones(6), torch.tensor([[1.0] * 6, [0.0] * 6] * 2),
                         None, None, 0.0, torch.ones(4, 32, 32, dtype=torch.bool), slice_fracture=torch.tensor([1.0, 0, 1, 0]))
    trainer = train.Trainer(torch.device("cpu"), seed=1, checkpoints=tmp_path, mixed_precision="off")
    train.train_slice_cnn("slice CNN", cnn, [scan], trainer, 2, 4, 0.01, AugmentConfig(), fracture_weight=1.0)
    state = torch.load(trainer.checkpoint_path("slice CNN"), weights_only=False)["module"]
    assert {k.removeprefix("cnn.") for k in state if k.startswith("cnn.")} == keys
    assert {"fracture_head.weight", "fracture_head.bias"} <= set(state) and set(cnn.state_dict()) == keys
