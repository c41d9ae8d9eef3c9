"""The worklist priority rule: findings -> level, sort score and a short rationale.

Levels: STAT (read now), URGENT (read soon), ROUTINE. Thresholds come from the config
(`stat_probability`, `urgent_probability`, `stat_volume_ml`); the score sorts the worklist
(higher first) and is the probability of any ICH lifted by level so STAT always sorts first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

LEVEL_RANK = {"STAT": 2, "URGENT": 1, "ROUTINE": 0}


@dataclass(frozen=True)
class PriorityRule:
    stat_probability: float = 0.70
    urgent_probability: float = 0.30
    stat_volume_ml: float = 30.0

    @classmethod
    def from_settings(cls, settings) -> "PriorityRule":
        return cls(settings.stat_probability, settings.urgent_probability, settings.stat_volume_ml)


@dataclass(frozen=True)
class Priority:
    level: str
    score: float
    rationale: str

    def as_dict(self) -> dict:
        return asdict(self)


def assign_priority(
    rule: PriorityRule,
    probabilities: dict[str, float],
    volumes_ml: dict[str, float],
    difficult: bool,
) -> Priority:
    p_any = float(probabilities.get("any", 0.0))
    subtypes = sorted(
        ((k, v) for k, v in probabilities.items() if k != "any"), key=lambda kv: kv[1], reverse=True
    )
    top = ", ".join(f"{k} {v:.2f}" for k, v in subtypes[:2] if v >= rule.urgent_probability)
    volume = float(volumes_ml.get("any", 0.0))
    if p_any >= rule.stat_probability:
        level, why = "STAT", f"ICH probability {p_any:.2f} >= {rule.stat_probability:.2f}"
    elif p_any >= rule.urgent_probability and volume >= rule.stat_volume_ml:
        level, why = "STAT", f"estimated blood volume {volume:.0f} mL >= {rule.stat_volume_ml:.0f} mL"
    elif p_any >= rule.urgent_probability or difficult:
        level = "URGENT"
        why = (
            f"ICH probability {p_any:.2f} >= {rule.urgent_probability:.2f}"
            if p_any >= rule.urgent_probability
            else f"difficult case (probability {p_any:.2f} near the threshold)"
        )
    else:
        level, why = "ROUTINE", f"ICH probability {p_any:.2f} < {rule.urgent_probability:.2f}"
    if top:
        why += f"; {top}"
    if volume > 0 and level != "ROUTINE":
        why += f"; volume {volume:.1f} mL"
    return Priority(level=level, score=round(LEVEL_RANK[level] + p_any, 4), rationale=why)
