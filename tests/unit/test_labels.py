"""Report labels: labeling functions with negation and uncertainty, and the label model."""
from __future__ import annotations

import numpy as np
import pytest

from ichnode.common.vocabulary import LABELS
from training.labels import LABELING_FUNCTIONS, LabelModel, apply_lfs, predict_proba, read_report
from training.phantom import make_findings, make_report


def statuses(text: str) -> set[tuple[str, str]]:
    return {(m.term, m.status) for m in read_report(text).mentions}


@pytest.mark.parametrize("text, expected", [
    ("No evidence of acute intracranial hemorrhage.", {("blood", "negated")}),
    ("No subdural or epidural collection.", {("SDH", "negated"), ("EDH", "negated")}),
    ("Small left frontal subdural hematoma measuring 6 mm.", {("SDH", "affirmed")}),
    ("Right basal ganglia intraparenchymal hematoma without intraventricular extension.",
     {("IPH", "affirmed"), ("IVH", "negated")}),
    ("Subarachnoid hemorrhage cannot be excluded.", {("SAH", "uncertain")}),
    ("Possible trace subarachnoid hemorrhage in the left sylvian fissure.", {("SAH", "hedged")}),
    ("The previously seen subdural hematoma has resolved.", {("SDH", "negated")}),
    ("Subdural hematoma is not seen.", {("SDH", "negated")}),
    ("Negative for extradural haematoma.", {("EDH", "negated")}),
    ("No midline shift, but there is a small extradural hematoma.", {("EDH", "affirmed"), ("midline_shift", "negated")}),
    ("No significant change in the left subdural hematoma.", {("SDH", "affirmed")}),
    ("Hemorrhagic contusion of the right temporal lobe.", {("IPH", "affirmed")}),
])
def test_mentions_carry_negation_and_uncertainty(text, expected):
    assert expected <= statuses(text)


def votes_of(text: str) -> dict[str, int]:
    votes = apply_lfs([text])
    return {lf.name: int(votes[label][0, j]) for label, lfs in LABELING_FUNCTIONS.items() for j, lf in enumerate(lfs)}


def test_labeling_functions_vote_or_abstain():
    negative = votes_of("FINDINGS: No subdural or epidural collection. IMPRESSION: No acute intracranial abnormality.")
    assert negative["SDH_negated"] == negative["EDH_negated"] == negative["any_global_negative"] == 0
    assert negative["SDH_affirmed"] == negative["any_subtype_affirmed"] == -1
    uncertain = votes_of("FINDINGS: Streak artifact; a small hemorrhage cannot be excluded.")
    assert set(uncertain.values()) == {-1}  # nobody votes on an uncertain mention
    positive = votes_of("FINDINGS: Acute left subdural hematoma, 8 mm. No epidural hematoma. IMPRESSION: Left SDH.")
    assert positive["SDH_affirmed"] == positive["SDH_in_impression"] == positive["any_subtype_affirmed"] == 1
    assert positive["EDH_negated"] == 0 and positive["SDH_global_negative"] == -1


def phantom_reports(seeds) -> tuple[list[str], np.ndarray]:
    reports, truth = [], []
    for seed in seeds:
        findings = make_findings(seed)
        reports.append(make_report(seed, findings))
        truth.append([int(findings["positive"])] + [int(s in findings["subtypes"]) for s in LABELS[1:]])
    return reports, np.array(truth)


def test_label_model_recovers_phantom_truth_without_labels():
    reports, truth = phantom_reports(range(100))
    assert 0.3 < truth[:, 0].mean() < 0.7
    model = LabelModel().fit(reports)
    proba = model.predict_proba(reports)
    assert proba.shape == (100, len(LABELS))
    accuracy = ((proba >= 0.5) == truth).mean(axis=0)
    assert accuracy[0] >= 0.95 and accuracy.min() >= 0.95, dict(zip(LABELS, accuracy))
    held_out, held_truth = phantom_reports(range(1000, 1050))  # the fitted model generalises
    assert ((model.predict_proba(held_out) >= 0.5) == held_truth).mean() >= 0.95
    assert model.lf_accuracies("any")["any_subtype_affirmed"] > 0.9


def test_predict_proba_on_a_few_reports():
    proba = predict_proba([
        "FINDINGS: Large left subdural hematoma with 6 mm of rightward midline shift. IMPRESSION: Left SDH.",
        "IMPRESSION: No acute intracranial abnormality.",
        "FINDINGS: Intraparenchymal hematoma in the right thalamus with intraventricular extension.",
    ])
    sdh, negative, iph = proba
    assert sdh[LABELS.index("any")] > 0.9 and sdh[LABELS.index("SDH")] > 0.9 and sdh[LABELS.index("EDH")] < 0.5
    assert negative.max() < 0.2
    assert iph[LABELS.index("IPH")] > 0.5 and iph[LABELS.index("IVH")] > 0.5 and iph[LABELS.index("SDH")] < 0.5
    assert np.all(proba[:, 0] >= proba[:, 1:].max(axis=1))
