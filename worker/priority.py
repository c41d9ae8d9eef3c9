"""The worklist priority rule: findings -> level, sort score and a short rationale.

Levels, checked in this order (thresholds from the keys of the same name in [priority]):

* STAT (read now): p(any) >= `stat_probability`, or p(any) >= `urgent_probability` with an
  estimated blood volume >= `stat_volume_ml` (a large bleed is urgent even at moderate confidence).
* URGENT (read soon): p(any) >= `urgent_probability`, or the detector flagged the case as
  difficult (p(any) near its operating point: a human should look closely).
* ROUTINE: everything else.

The score sorts the worklist (higher first): the level's rank plus p(any), so every STAT sorts
above every URGENT, and within a level the more probable bleed comes first. The rationale says
which condition decided the level, the leading subtypes, the volume and the difficult-case flag.
"""
from __future__ import annotations

import math

from ichnode.common.analysis import Priority
from ichnode.common.config import PriorityRule
from ichnode.common.vocabulary import LEVEL_RANK


def assign_priority(
    rule: PriorityRule,
    probabilities: dict[str, float],
    volumes_ml: dict[str, float],
    difficult: bool,
) -> Priority:
    """Raises ValueError when p(any) is missing or not a number: never a silent ROUTINE."""
    p_any = float(probabilities.get("any", math.nan))
    if not 0.0 <= p_any <= 1.0:
        raise ValueError(f"probability of any ICH must be a number in 0..1, got {probabilities.get('any')!r}")
    subtypes = sorted(
        ((k, v) for k, v in probabilities.items() if k != "any"), key=lambda kv: kv[1], reverse=True
    )
    top = ", ".join(f"{k} {v:.2f}" for k, v in subtypes[:2] if v >= rule.urgent_probability)
    volume = float(volumes_ml.get("any", 0.0))
    if p_any >= rule.stat_probability:
        level, why = "STAT", f"ICH probability {p_any:.2f} >= {rule.stat_probability:.2f}"
    elif p_any >= rule.urgent_probability and volume >= rule.stat_volume_ml:
        level, why = "STAT", f"estimated blood volume {volume:.0f} mL >= {rule.stat_volume_ml:.0f} mL"
    elif p_any >= rule.urgent_probability:
        level, why = "URGENT", f"ICH probability {p_any:.2f} >= {rule.urgent_probability:.2f}"
    elif difficult:
        level, why = "URGENT", f"difficult case (probability {p_any:.2f} near the threshold)"
    else:
        level, why = "ROUTINE", f"ICH probability {p_any:.2f} < {rule.urgent_probability:.2f}"
    if top:
        why += f"; {top}"
    if volume > 0 and level != "ROUTINE":
        why += f"; volume {volume:.1f} mL"
    if difficult and not why.startswith("difficult"):
        why += "; difficult case: read closely"
    return Priority(level=level, score=round(LEVEL_RANK[level] + p_any, 4), rationale=why)
