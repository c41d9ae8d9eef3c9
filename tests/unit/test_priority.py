import math

import pytest

from ichnode.common.config import PriorityRule, Settings, load_settings
from worker.priority import assign_priority

RULE = PriorityRule(stat_probability=0.70, urgent_probability=0.30, stat_volume_ml=30.0)


def probs(any_: float, **subtypes: float) -> dict[str, float]:
    return {"any": any_, "EDH": 0.0, "IPH": 0.0, "IVH": 0.0, "SAH": 0.0, "SDH": 0.0, **subtypes}


@pytest.mark.parametrize(
    ("p_any", "volume", "difficult", "level", "reason"),
    [
        (0.95, 0.0, False, "STAT", "ICH probability 0.95 >= 0.70"),
        (0.70, 0.0, False, "STAT", "ICH probability 0.70 >= 0.70"),  # threshold is inclusive
        (0.45, 42.0, False, "STAT", "estimated blood volume 42 mL >= 30 mL"),
        (0.20, 42.0, False, "ROUTINE", "ICH probability 0.20 < 0.30"),  # volume alone does not escalate
        (0.69, 10.0, False, "URGENT", "ICH probability 0.69 >= 0.30"),
        (0.30, 0.0, False, "URGENT", "ICH probability 0.30 >= 0.30"),
        (0.25, 0.0, True, "URGENT", "difficult case (probability 0.25 near the threshold)"),
        (0.29, 0.0, False, "ROUTINE", "ICH probability 0.29 < 0.30"),
        (0.0, 0.0, False, "ROUTINE", "ICH probability 0.00 < 0.30"),
    ],
)
def test_level_table(p_any, volume, difficult, level, reason):
    priority = assign_priority(RULE, probs(p_any), {"any": volume}, difficult)
    assert priority.level == level
    assert priority.rationale.startswith(reason)


def test_every_stat_sorts_above_every_urgent_and_urgent_above_routine():
    stat = assign_priority(RULE, probs(0.31), {"any": 31.0}, False)  # STAT by volume, low p
    urgent = assign_priority(RULE, probs(0.69), {"any": 0.0}, False)
    routine = assign_priority(RULE, probs(0.29), {"any": 0.0}, False)
    assert stat.level == "STAT" and urgent.level == "URGENT" and routine.level == "ROUTINE"
    assert stat.score > urgent.score > routine.score
    assert assign_priority(RULE, probs(0.9), {}, False).score > assign_priority(RULE, probs(0.8), {}, False).score


def test_rationale_names_leading_subtypes_volume_and_difficult_flag():
    priority = assign_priority(RULE, probs(0.55, SDH=0.5, SAH=0.4, IVH=0.35), {"any": 12.34}, True)
    assert priority.level == "URGENT"
    assert priority.rationale == (
        "ICH probability 0.55 >= 0.30; SDH 0.50, SAH 0.40; volume 12.3 mL; difficult case: read closely"
    )


def test_routine_rationale_has_no_volume_and_no_subtypes_below_urgent():
    priority = assign_priority(RULE, probs(0.1, SDH=0.2), {"any": 0.4}, False)
    assert priority.rationale == "ICH probability 0.10 < 0.30"


def test_thresholds_come_from_settings():
    rule = load_settings(environ={"ICHNODE_STAT_PROBABILITY": "0.9", "ICHNODE_URGENT_PROBABILITY": "0.5",
                                  "ICHNODE_STAT_VOLUME_ML": "10"}).priority
    assert assign_priority(rule, probs(0.8), {"any": 0.0}, False).level == "URGENT"
    assert assign_priority(rule, probs(0.6), {"any": 12.0}, False).level == "STAT"
    assert assign_priority(rule, probs(0.4), {"any": 0.0}, False).level == "ROUTINE"


@pytest.mark.parametrize("bad", [{}, {"any": math.nan}, {"any": 1.5}, {"any": -0.1}])
def test_missing_or_invalid_probability_is_an_error_not_routine(bad):
    with pytest.raises(ValueError, match="probability of any ICH"):
        assign_priority(RULE, bad, {}, False)


def test_inconsistent_thresholds_are_rejected():
    with pytest.raises(ValueError, match="urgent_probability"):
        PriorityRule(stat_probability=0.3, urgent_probability=0.5)
    with pytest.raises(ValueError, match="stat_volume_ml"):
        PriorityRule(stat_volume_ml=-1)


def test_default_thresholds_are_the_shipped_models_cross_validated_operating_point():
    import json

    from worker.detector.store import SHIPPED_DIR

    calibration = json.loads((SHIPPED_DIR / "evaluation" / "cv" / "calibration.json").read_text())
    point = (calibration["urgent_probability"], calibration["stat_probability"])
    assert (Settings().priority.urgent_probability, Settings().priority.stat_probability) == point
