"""`Findings`: what one analysed series produced, as findings.json and the API give it."""
from __future__ import annotations

from dataclasses import dataclass, field

from worker.detector import LABELS, DetectorOutput
from worker.geometry import Volume
from worker.priority import Priority

KEY_SLICE_COUNT = 3


@dataclass
class Findings:
    study_instance_uid: str
    series_instance_uid: str
    probabilities: dict[str, float]
    volumes_ml: dict[str, float]
    slice_scores: list[float]
    key_slices: list[str]  # SOP Instance UIDs, highest score first
    key_slice_indices: list[int]  # the same slices as volume indices
    priority: Priority
    difficult: bool
    model_name: str
    model_version: str
    result_uids: dict[str, str] = field(default_factory=dict)  # object kind -> SOP Instance UID

    @classmethod
    def from_output(
        cls, study_uid: str, series_uid: str, volume: Volume, output: DetectorOutput, priority: Priority
    ) -> "Findings":
        order = sorted(range(len(output.slice_scores)), key=lambda i: -float(output.slice_scores[i]))
        key = order[:KEY_SLICE_COUNT]
        return cls(
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            probabilities={k: round(float(output.probabilities[k]), 4) for k in LABELS},
            volumes_ml={k: round(float(v), 2) for k, v in output.volumes_ml.items()},
            slice_scores=[round(float(s), 4) for s in output.slice_scores],
            key_slices=[volume.slices[i].sop_instance_uid for i in key],
            key_slice_indices=key,
            priority=priority,
            difficult=output.difficult,
            model_name=output.model_name,
            model_version=output.model_version,
        )

    def as_json(self) -> dict:
        """The findings.json contract (README "findings.json")."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "probabilities": self.probabilities,
            "volumes_ml": self.volumes_ml,
            "slice_scores": self.slice_scores,
            "key_slices": self.key_slices,
            "priority": {"level": self.priority.level, "score": self.priority.score,
                         "rationale": self.priority.rationale},
            "difficult": self.difficult,
            "model": {"name": self.model_name, "version": self.model_version},
            "result_uids": self.result_uids,
        }


def skipped_json(reason: str) -> dict:
    return {"skipped": reason}
