"""The detector's output for one series as the result contract's `Findings` (findings.json)."""
from __future__ import annotations

from ichnode.common.analysis import Findings, ModelIdentity, Priority
from ichnode.common.vocabulary import LABELS
from worker.detector import DetectorOutput
from worker.geometry import Volume

KEY_SLICE_COUNT = 3


def key_slice_indices(output: DetectorOutput) -> list[int]:
    """The volume indices of the key slices: the highest slice scores, highest first."""
    order = sorted(range(len(output.slice_scores)), key=lambda i: -float(output.slice_scores[i]))
    return order[:KEY_SLICE_COUNT]


def findings_from_output(
    study_uid: str, series_uid: str, volume: Volume, output: DetectorOutput, priority: Priority
) -> Findings:
    return Findings(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        probabilities={k: round(float(output.probabilities[k]), 4) for k in LABELS},
        volumes_ml={k: round(float(v), 2) for k, v in output.volumes_ml.items()},
        slice_scores=[round(float(s), 4) for s in output.slice_scores],
        key_slices=[volume.slices[i].sop_instance_uid for i in key_slice_indices(output)],
        priority=priority,
        difficult=output.difficult,
        model=ModelIdentity(name=output.model_name, version=output.model_version),
    )
