"""Cross-validation: folds by patient, the operating point, member weights, and a tiny whole run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.crossval import (
    bag_cross_validations,
    choose_weights,
    negatives_by_age,
    nested_probabilities,
    operating_point,
    stratified_folds,
    summarise,
    write_report,
)
from training.data import Scan
from worker.detector import LABELS
from worker.detector.ensemble import SCAN_MEMBERS
from worker.detector.members import Combiner
from worker.geometry import Volume


def _scan(patient: str, positive: bool) -> Scan:
    return Scan(patient, patient, Volume.from_array(np.zeros((1, 4, 4))), {"any": int(positive)})


def test_folds_split_patients_once_each_with_positives_spread():
    scans = [_scan(f"p{i}", i < 10) for i in range(25)] + [_scan("p3", True)]  # p3 has two scans
    folds = stratified_folds(scans, 5, seed=1)
    flat = [p for fold in folds for p in fold]
    assert sorted(flat) == sorted({s.patient_id for s in scans})  # every patient in exactly one fold
    assert [sum(p in {f"p{i}" for i in range(10)} for p in fold) for fold in folds] == [2] * 5
    assert folds == stratified_folds(scans, 5, seed=1)  # deterministic


def test_operating_point_keeps_the_promised_sensitivity_and_specificity():
    rng = np.random.default_rng(0)
    y = np.array([1] * 22 + [0] * 28)
    p = np.clip(np.where(y == 1, rng.normal(0.7, 0.2, 50), rng.normal(0.3, 0.2, 50)), 0, 1)
    urgent, stat = operating_point(y, p)
    assert (p[y == 1] >= urgent).mean() >= 0.90
    assert (p[y == 0] < stat).mean() >= 0.95
    assert urgent <= stat
    # the threshold is as high as the sensitivity allows: 0.01 higher loses it
    assert (p[y == 1] >= urgent + 0.01).mean() < 0.90 or urgent == 0.99
    assert urgent == round(urgent, 2) and stat == round(stat, 2)  # written as is into configs and reports


def test_stat_threshold_is_a_whole_hundredth():
    y = np.array([0] * 19 + [1] * 10)  # 19 clean scans: STAT lets none of them through
    p = np.array([0.689] + [0.1] * 18 + [0.3] * 10)
    assert operating_point(y, p) == (0.3, 0.69)  # the sum 0.68 + 0.01 is 0.6900000000000001


def test_weights_pick_the_informative_member_and_nested_choice_is_per_fold():
    rng = np.random.default_rng(1)
    y = np.zeros((40, 6))
    y[:20] = 1
    good = (y * 2 - 1) * 2 + rng.normal(0, 1, (40, 6))
    noise = rng.normal(0, 3, (40, 6))
    logits = np.stack([noise, good, noise, noise], axis=-1)
    w = choose_weights(logits, y)
    assert w[1] > 0 and w[1] == w.max() and w[[0, 2, 3]].sum() < w.sum() / 2
    nested = nested_probabilities(logits, y, np.arange(40) % 4)
    assert nested.shape == (40,) and np.isfinite(nested).all()


def test_bleeds_are_ranked_against_bleed_free_children_and_adults_apart():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.5, 0.8, 0.7, 0.1, 0.2, 0.95])  # the clean children score high
    ages = [40.0, 3.0, 60.0, 6.0, 12.0, 35.0, 50.0, None]  # the last one's age is unknown: in neither
    by_age = negatives_by_age(y, p, ages)
    children, adults = by_age["bleed-free, under 18 years"], by_age["bleed-free, 18 years and over"]
    assert (children["scans"] - children["positives"], adults["scans"] - adults["positives"]) == (2, 2)
    assert children["auc"] == pytest.approx(2 / 6, abs=1e-4) and adults["auc"] == 1.0
    assert negatives_by_age(y, p, [None] * 8) == {}  # no ages (phantoms, RSNA): no table
    assert list(negatives_by_age(y, p, [30.0] * 8)) == ["bleed-free, 18 years and over"]


def test_platt_stays_finite_when_the_scans_separate_perfectly():
    x = torch.tensor([-3.0, -2.0, 2.0, 3.0])
    scale, bias = Combiner.platt(x, torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert np.isfinite(scale) and np.isfinite(bias) and scale > 0


def test_combiner_applies_given_member_weights():
    comb = Combiner(members=2)
    x = torch.tensor([[[4.0, -4.0]] * 6, [[-4.0, 4.0]] * 6])
    y = torch.tensor([[1.0] * 6, [0.0] * 6]).repeat(2, 1)
    comb.fit(x.repeat(2, 1, 1), y, weights=torch.tensor([1.0, 0.0]))
    assert comb.member_weights() == pytest.approx([1.0, 0.0])
    assert float(comb(x)[0, 0]) > 0.5 > float(comb(x)[1, 0])


def _tiny_config(tmp_path, model: str = "", cv: str = "", stages: str = ""):
    """A whole recipe and a 2-fold cross-validation over 8 phantoms, in seconds."""
    config = tmp_path / "tiny.toml"
    config.write_text(f"""
[run]
seed = 2
threads = 1
device = "cpu"
checkpoints = "{tmp_path / 'ck'}"
[data]
train = ["phantom:seed=81,n=8,matrix=64,slices=6"]
validation = ["phantom:seed=91,n=2,matrix=64,slices=6"]
[model]
working_size = 32
cnn = {{ widths = [8, 8, 8, 8], groups = 2, stem = 8 }}
mil = {{ widths = [8, 8, 8, 8], groups = 2, stem = 8 }}
pca_components = 4
lstm_hidden = 4
attention_dim = 4
unet_base = 4
unet_depth = 2
unet_scale = 2
fusion_hidden = 2
{model}
[stages]
batch = 4
cnn_pretrain_steps = 2
cnn_steps = 2
lstm_steps = 2
mil_steps = 2
unet_steps = 2
unet_patch = 8
specialist_steps = 1
fusion_steps = 1
{stages}
[output]
dir = "{tmp_path / 'model'}"
fold_bag = true
[evaluate]
out = "{tmp_path / 'eval'}"
calibration = "{tmp_path / 'eval' / 'cv' / 'calibration.json'}"
[cv]
data = "phantom:seed=81,n=8,matrix=64,slices=6"
folds = 2
{cv}
""")
    return config


def test_tiny_cross_validation_writes_out_of_fold_predictions_and_calibration_and_bags_the_folds(tmp_path):
    from training.crossval import crossval_main
    from training.train import train_main
    from worker.detector import load_detector
    from worker.detector.ensemble import FoldBag

    config = _tiny_config(tmp_path)
    metrics = crossval_main(config)
    cv = tmp_path / "eval" / "cv"
    oof = json.loads((cv / "oof_predictions.json").read_text())
    assert len(oof) == 8 and {row["fold"] for row in oof} == {0, 1}
    assert metrics["scans"] == 8 and 0 <= metrics["auc_any"]["auc"] <= 1
    calibration = json.loads((cv / "calibration.json").read_text())
    assert calibration["members"] == ["slice_cnn", "cnn_lstm", "attention_mil", "unet_ensemble"]
    assert 0 <= calibration["urgent_probability"] <= calibration["stat_probability"] <= 1
    assert (cv / "metrics.md").is_file() and (cv / "roc_any.png").is_file()
    assert metrics["gallery"] and all((cv / "gallery" / name).is_file() for name in metrics["gallery"])
    # a second run finds every fold's predictions and trains nothing again
    fold_files = {p.name: p.stat().st_mtime_ns for p in (cv / "folds").iterdir()}
    crossval_main(config)
    assert {p.name: p.stat().st_mtime_ns for p in (cv / "folds").iterdir()} == fold_files
    # the shipped model is the two fold models averaged, with the cross-validation's calibration
    train_main(config)
    bag = load_detector(tmp_path / "model", device="cpu")
    assert isinstance(bag.ensemble, FoldBag) and len(bag.ensemble.replicas) == 2
    assert bag.ensemble.combiner.member_weights() == pytest.approx(
        np.asarray(calibration["weights"]) / np.sum(calibration["weights"]))
    manifest = json.loads((tmp_path / "model" / "manifest.json").read_text())
    heldout = [set(fold) for fold in manifest["training_data"]["heldout_by_fold"]]
    assert len(heldout) == 2 and heldout[0] and not heldout[0] & heldout[1]


@pytest.mark.parametrize(("bag_input", "pretraining", "own_pretraining"), [
    (3, "per_input", []), (5, "per_input", ["slice_CNN_pretraining_5_channels.pt"]),
    (3, "per_cnn", ["slice_CNN_pretraining_cnn_2.pt"]),
])
def test_cross_validation_of_a_slice_cnn_bag_alone_weighs_only_it_and_keeps_each_cnns_slice_logits(
        tmp_path, bag_input, pretraining, own_pretraining):
    """A bag of two CNNs: a second of the same input (its own seed; the first's pre-training, or
    its own), or of the 2.5D input (its own pre-training); the folds share the pre-trainings."""
    from training.crossval import crossval_main

    metrics = crossval_main(_tiny_config(tmp_path, model=f"cnn_bag_channels = [{bag_input}]\nslice_top_k = 3",
                                         cv='members = ["slice_cnn"]', stages=f'cnn_bag_pretraining = "{pretraining}"'))
    pretrained = sorted(p.name for p in (tmp_path / "ck").glob("*pretraining*.pt"))
    assert pretrained == ["slice_CNN_pretraining.pt", *own_pretraining]
    cv = tmp_path / "eval" / "cv"
    calibration = json.loads((cv / "calibration.json").read_text())
    assert calibration["weights"][0] > 0 and calibration["weights"][1:] == [0.0, 0.0, 0.0]
    assert list(metrics["per_member"]) == ["slice_cnn"] and "real_hu_slices" not in metrics
    assert len(metrics["slice_cnn"]["by_replica"]) == 2 and metrics["slice_top_k"] == 3
    oof = json.loads((cv / "oof_predictions.json").read_text())
    for row in oof:
        first, second = (np.asarray(r) for r in row["slice_cnn_logits_by_replica"])
        assert len(first) == len(row["slice_cnn_logits"]) == len(row["slice_labels_any"]) == 6
        assert np.allclose((first + second) / 2, row["slice_cnn_logits"], atol=1e-4)  # the bag is their mean
        assert not np.allclose(first, second)  # two CNNs: their own seeds, or their own inputs
        top3 = np.sort(row["slice_cnn_logits"])[::-1][:3].mean()
        assert row["member_logits"]["any"]["slice_cnn"] == pytest.approx(top3, abs=1e-4)
        assert list(row["member_logits"]) == list(LABELS)  # every label: a later calibration can use them
    assert "Not trained in the folds (weight 0): cnn_lstm, attention_mil, unet_ensemble" in (cv / "metrics.md").read_text()


def test_weights_never_go_to_members_the_folds_did_not_train():
    rng = np.random.default_rng(2)
    y = np.zeros((40, 6))
    y[:20] = 1
    logits = np.stack([rng.normal(0, 1, (40, 6)), (y * 2 - 1) * 3], axis=-1)  # the second member is perfect
    w = choose_weights(logits, y, allowed=np.array([True, False]))
    assert w[0] > 0 and w[1] == 0


def test_cross_validation_members_must_be_known():
    from pydantic import ValidationError

    from training.config import CrossValidationSection

    with pytest.raises(ValidationError, match="slice_cn"):
        CrossValidationSection(members=["slice_cn"])


def test_fold_bag_needs_the_fold_models_and_the_cv_calibration(tmp_path):
    from ichnode.common.config import ConfigError
    from training.config import load_training_config
    from training.train import train_main

    config = tmp_path / "bag.toml"
    base = f"""
[run]
checkpoints = "{tmp_path / 'ck'}"
device = "cpu"
[data]
train = ["phantom:seed=81,n=2,matrix=64,slices=6"]
[output]
dir = "{tmp_path / 'model'}"
fold_bag = true
"""
    config.write_text(base)
    with pytest.raises(ConfigError, match="fold_bag needs \\[evaluate\\] calibration"):
        load_training_config(config)
    config.write_text(base + f'[evaluate]\ncalibration = "{tmp_path / "calibration.json"}"\n')
    with pytest.raises(FileNotFoundError, match="evaluate --cv"):
        train_main(config)


def _cv_run(folder, slice_logits: dict[str, list[float]], folds: dict[str, int], top_k: int = 2,
            by_replica: dict[str, list[list[float]]] | None = None):
    """A cross-validation's folder as `crossval_main` writes it, with these slice CNN logits (and
    those of each CNN of its bag)."""
    predictions = [{
        "scan_id": s, "fold": folds[s], "labels": [float(s.startswith("bleed"))] * len(LABELS),
        "member_logits": [[float(np.sort(v)[-top_k:].mean())] + [0.0] * (len(SCAN_MEMBERS) - 1) for _ in LABELS],
        "slice_labels": [float(x > 0) for x in v], "slice_cnn_logits": v,
        "slice_cnn_logits_by_replica": by_replica[s] if by_replica else None,
    } for s, v in slice_logits.items()]
    ages = [30.0] * len(predictions)
    metrics, calibration, p = summarise(predictions, top_k, ("slice_cnn",), ages)
    write_report(folder, "test", predictions, ages, metrics, calibration, p)
    return folder


def test_a_bag_of_cross_validations_averages_their_slice_logits_before_the_top_k(tmp_path):
    """Two runs that each rank one bleed below a clean scan; their bag (slice logits averaged, as
    a bag of their CNNs would give) ranks every bleed first; runs of other folds are refused."""
    folds = {"bleed-a": 0, "bleed-b": 1, "clean-a": 0, "clean-b": 1}
    first = _cv_run(tmp_path / "one", {"bleed-a": [3.0, 3.0, -2.0], "bleed-b": [0.0, 0.0, -2.0],
                                       "clean-a": [1.0, 1.0, -2.0], "clean-b": [-1.0, -1.0, -2.0]}, folds)
    second = _cv_run(tmp_path / "two", {"bleed-a": [-1.0, 0.0, 0.0], "bleed-b": [3.0, 3.0, 0.0],
                                        "clean-a": [-1.0, -1.0, -1.0], "clean-b": [1.0, 1.0, 0.0]}, folds)
    for run in (first, second):
        assert json.loads((run / "metrics.json").read_text())["auc_any"]["auc"] == 0.75
    metrics = bag_cross_validations([first, second], tmp_path / "bag")
    assert metrics["auc_any"]["auc"] == 1.0 and metrics["bagged_runs"] == [str(first), str(second)]
    oof = {r["scan_id"]: r for r in json.loads((tmp_path / "bag" / "oof_predictions.json").read_text())}
    assert oof["bleed-a"]["slice_cnn_logits"] == [1.0, 1.5, -1.0]
    assert oof["bleed-a"]["member_logits"]["any"]["slice_cnn"] == pytest.approx(1.25)  # top 2 of the mean
    assert oof["bleed-a"]["slice_cnn_logits_by_replica"] == [[3.0, 3.0, -2.0], [-1.0, 0.0, 0.0]]
    assert (tmp_path / "bag" / "calibration.json").is_file() and (tmp_path / "bag" / "roc_any.png").is_file()
    other = _cv_run(tmp_path / "other", {"bleed-a": [0.0], "bleed-b": [0.0], "clean-a": [0.0], "clean-b": [0.0]},
                    {"bleed-a": 1, "bleed-b": 0, "clean-a": 0, "clean-b": 1})
    with pytest.raises(ValueError, match="not the same scans in the same folds"):
        bag_cross_validations([first, other], tmp_path / "refused")


def test_one_cross_validation_scored_again_gives_its_own_report_and_calibration(tmp_path):
    """`--cv-bag RUN` with one run writes that run's figures and calibration.json again (a stored
    run's calibration for training its recipe, without its fold models), its bag's CNNs kept apart
    and, bagged with another run, each weighted as one CNN."""
    folds = {"bleed-a": 0, "bleed-b": 1, "clean-a": 0, "clean-b": 1}
    logits = {"bleed-a": [3.0, 3.0, -2.0], "bleed-b": [0.0, 0.0, -2.0],
              "clean-a": [1.0, 1.0, -2.0], "clean-b": [-1.0, -1.0, -2.0]}
    run = _cv_run(tmp_path / "one", logits, folds,
                  by_replica={s: [[x + 1 for x in v], [x - 1 for x in v]] for s, v in logits.items()})
    metrics = bag_cross_validations([run], tmp_path / "again")
    written = json.loads((run / "metrics.json").read_text())
    assert metrics["auc_any"] == written["auc_any"]
    assert metrics["slice_cnn"]["by_replica"] == written["slice_cnn"]["by_replica"] and \
        len(metrics["slice_cnn"]["by_replica"]) == 2
    assert json.loads((tmp_path / "again" / "calibration.json").read_text()) == \
        json.loads((run / "calibration.json").read_text())
    single = _cv_run(tmp_path / "single", {s: [-3.0, 0.0, 4.0] for s in logits}, folds)
    bag_cross_validations([run, single], tmp_path / "three")
    oof = {r["scan_id"]: r for r in json.loads((tmp_path / "three" / "oof_predictions.json").read_text())}
    assert oof["bleed-a"]["slice_cnn_logits"] == [1.0, 2.0, 0.0]  # each of the three CNNs a third, not the runs half
    assert len(oof["bleed-a"]["slice_cnn_logits_by_replica"]) == 3
    with pytest.raises(ValueError, match="needs a cross-validation folder"):
        bag_cross_validations([], tmp_path / "none")
