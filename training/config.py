"""The training config (`ichnode train --config FILE`, `ichnode evaluate --cv FILE`), validated at load.

One pydantic model per TOML section; unknown keys are refused with their name, so a typo in a
config never silently falls back to a default. `[model]` is the detector's own
`worker.detector.ensemble.EnsembleConfig`.
"""
from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ichnode.common.config import ConfigError, read_toml
from training.augment import AugmentConfig
from worker.detector.ensemble import SCAN_MEMBERS, EnsembleConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Section):
    seed: int = 0
    threads: int = Field(default=0, ge=0)  # 0: up to 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: float16 autocast on CUDA, bfloat16 on a CPU with native bfloat16 (3x faster here);
    # off: float32 throughout. Inference is float32 either way.
    mixed_precision: Literal["auto", "off"] = "auto"
    checkpoints: str = ""  # folder for resumable stage checkpoints; empty: no checkpoints
    checkpoint_seconds: float = Field(default=120.0, gt=0)


class DataSection(_Section):
    train: list[str]  # data specs of scans with slice order (all members train on these)
    slices: list[str] = []  # data specs of single slices (the slice CNN trains on these too)
    validation: list[str] = []  # scans with masks for the pixel fusion (and calibration without CV)
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)  # of train, when validation is empty


class MilSection(_Section):
    label_source: Literal["labels", "reports"] = "labels"


class StagesSection(_Section):
    batch: int = Field(default=16, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    # AdamW's decoupled weight decay of every stage's weights (not biases or normalisation); 0: Adam.
    weight_decay: float = Field(default=0.0, ge=0)
    cnn_pretrain_steps: int = Field(default=0, ge=0)  # slice CNN on `slices` and phantoms only (shared by CV folds)
    # Which CNNs of a bag (`[model] cnn_bag_channels`) share a pre-training: those of one input
    # ("per_input"), or none, each pre-trained with its own seed ("per_cnn"), as independent runs are.
    cnn_bag_pretraining: Literal["per_input", "per_cnn"] = "per_input"
    cnn_steps: int = Field(default=300, ge=0)
    # Share of each slice CNN fine-tuning batch drawn from the real patients' scans of `[data] train`
    # (those without voxel masks), balanced like the rest; 0: one pool of all the slices.
    cnn_patient_share: float = Field(default=0.0, ge=0, le=1)
    # Which real patients that share (and `cnn_run_share`) draws from: all, or the children alone
    # (under training.data.CHILD_AGE_YEARS), whose clean scans the CNN ranks above clean adults'
    # (cross-validated with share 0.25 on 2026-12-04: it ranked worse; model card).
    cnn_focus: Literal["patients", "children"] = "patients"
    # Share of each fine-tuning batch that is a run of adjacent slices of one real patient's scan,
    # whose scan score (mean of the `slice_top_k` highest slice logits) is trained as well.
    cnn_run_share: float = Field(default=0.0, ge=0, lt=1)
    # Share of the clean slices of each fine-tuning batch's pooled part drawn in proportion to the
    # CNN's last predicted bleed probability for them (online hard-negative mining); 0: uniform.
    cnn_hard_negative_share: float = Field(default=0.0, ge=0, le=1)
    # Share of each balanced part of a fine-tuning batch that is bleeding slices (0.5 in 0.4.0: the
    # bleeding slices, about one in six of the pool, are drawn about three times as often as they occur).
    cnn_bleeding_share: float = Field(default=0.5, gt=0, lt=1)
    # The fine-tuned slice CNN is the exponential moving average of its weights over the steps,
    # with this decay per step (0.995: about the last 200 steps); 0: the last step's weights.
    cnn_ema_decay: float = Field(default=0.0, ge=0, lt=1)
    # Weight of an auxiliary loss in the slice CNN's fine-tuning: a head used in training only
    # predicts, from the pooled features, the skull-fracture label that CT-ICH records for each
    # slice (Scan.slice_fracture; slices without one do not count); 0: none. Inference never sees it.
    cnn_fracture_weight: float = Field(default=0.0, ge=0)
    # The fine-tuned slice CNNs' batch-norm statistics: the running averages of the last fine-tuning
    # batches ("training": phantoms, brain-window-only slices with zeroed channels, half of them
    # bleeding), or re-estimated in one pass over every slice of the real patients' scans of `[data]
    # train`, prepared as inference prepares a series ("patients"). The weights are the same either way.
    cnn_batch_norm: Literal["training", "patients"] = "training"
    lstm_steps: int = Field(default=300, ge=0)
    mil_steps: int = Field(default=300, ge=0)
    unet_steps: int = Field(default=300, ge=0)
    unet_patch: int = Field(default=0, ge=0)  # at the U-Nets' resolution; 0: whole slices
    specialist_steps: int = Field(default=100, ge=0)
    synthetic_bleeds: int = Field(default=0, ge=0)  # U-Net slices with a bleed synthesised into real anatomy
    cnn_synthetic_bleeds: int = Field(default=0, ge=0)  # the same for the slice CNN's fine-tuning
    fusion_steps: int = Field(default=100, ge=0)

    @model_validator(mode="after")
    def _shares_fit_in_a_batch(self) -> "StagesSection":
        if self.cnn_patient_share + self.cnn_run_share > 1:
            raise ValueError("cnn_patient_share + cnn_run_share must not exceed 1 (shares of one batch)")
        return self


class OutputSection(_Section):
    dir: str
    name: str = "ichnode-ensemble"
    version: str = "0"
    # true: ship the cross-validation's fold models averaged (worker.detector.ensemble.FoldBag)
    # instead of training one more model on all the data; `ichnode evaluate --cv` trains them
    fold_bag: bool = False


class EvaluateSection(_Section):
    out: str = ""  # default: <output dir>/evaluation
    data: list[str] = []
    calibration: str = ""  # calibration.json of a cross-validation run: member weights and Platt terms


class CrossValidationSection(_Section):
    data: str = "ctich:all"  # whose patients are split into folds (they must be among data.train)
    folds: int = Field(default=5, ge=2)
    seed: int = 0
    out: str = ""  # default: <evaluate out>/cv
    # the scan members each fold trains and the weight grid may use; the others get weight 0
    members: list[str] = list(SCAN_MEMBERS)

    @field_validator("members")
    @classmethod
    def _known_members(cls, members: list[str]) -> list[str]:
        unknown = [m for m in members if m not in SCAN_MEMBERS]
        if unknown or not members:
            raise ValueError(f"members {unknown or members} are not among {list(SCAN_MEMBERS)}")
        return members


class TrainingConfig(_Section):
    run: RunSection = RunSection()
    data: DataSection
    model: dict = {}
    mil: MilSection = MilSection()
    stages: StagesSection = StagesSection()
    augment: dict = {}
    output: OutputSection
    evaluate: EvaluateSection = EvaluateSection()
    cv: CrossValidationSection = CrossValidationSection()

    @model_validator(mode="after")
    def _fold_bag_needs_the_cv_calibration(self) -> "TrainingConfig":
        if self.output.fold_bag and not self.evaluate.calibration:
            raise ValueError("[output] fold_bag needs [evaluate] calibration (the cross-validation's calibration.json)")
        return self

    def ensemble(self) -> EnsembleConfig:
        return EnsembleConfig.from_dict(self.model)

    def augmentation(self) -> AugmentConfig:
        return AugmentConfig(**self.augment)

    @property
    def evaluation_dir(self) -> Path:
        return Path(self.evaluate.out) if self.evaluate.out else Path(self.output.dir) / "evaluation"

    @property
    def cv_dir(self) -> Path:
        return Path(self.cv.out) if self.cv.out else self.evaluation_dir / "cv"

    @property
    def cv_checkpoints(self) -> Path:
        """Where the cross-validation keeps its stage checkpoints and fold models."""
        return Path(self.run.checkpoints) if self.run.checkpoints else self.cv_dir / "checkpoints"

    def fold_model_dir(self, fold: int) -> Path:
        """The model that fold `fold` (from 0) of the cross-validation trained."""
        return self.cv_checkpoints / f"fold-{fold}" / "model"


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """`SECTION.KEY=VALUE` settings (`ichnode evaluate --cv --set model.cnn.channels=5`) over a read
    config: VALUE is read as TOML (1, 0.5, true, [1, 2], "text"), else taken as a bare string."""
    for item in overrides:
        key, sep, text = item.partition("=")
        path = key.strip().split(".")
        if not sep or len(path) < 2 or not all(path):
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        table = raw
        for name in path[:-1]:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {name} is not a section")
        table[path[-1]] = value
    return raw


def load_training_config(path: Path, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read, apply `overrides` (`apply_overrides`) and validate, as the node's configuration is:
    ConfigError names the file and the key."""
    raw = apply_overrides(read_toml(path), overrides)
    try:
        cfg = TrainingConfig(**raw)
        cfg.ensemble()
        cfg.augmentation()
    except (ValidationError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return cfg
