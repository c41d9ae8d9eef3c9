"""Scan labels from free-text head CT reports: labeling functions combined by a label model.

As in paper 000 (data programming): each labeling function (LF) looks at a report and votes 1
(finding present), 0 (absent) or abstains. The LFs are regular expressions over sentences with
NegEx-style context: a mention is *negated* ("no ...", "without ...", "negative for ...",
"... has resolved"), *uncertain* ("cannot be excluded", "possible ...", "questionable ...") or
*affirmed*. A Dawid-Skene label model then learns, without ground truth, how each LF's votes
(abstaining included) depend on the true label, by EM on a set of unlabelled reports, and turns
the votes of a report into a probability per label (ichnode.common.vocabulary.LABELS).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ichnode.common.vocabulary import LABELS, SUBTYPES

ABSTAIN = -1

# --------------------------------------------------------------------------------------------
# Reading a report: sections, sentences, mentions in context

TERMS: dict[str, str] = {
    "EDH": r"epidural|extradural|\bedh\b",
    "SDH": r"subdural|\bsdh\b",
    "SAH": r"subarachnoid|\bsah\b",
    "IPH": r"intraparenchymal|intracerebral|intra-axial (?:hemorrhage|haemorrhage|hematoma|haematoma)"
    r"|parenchymal (?:hemorrhage|haemorrhage|hematoma|haematoma|bleed)|\biph\b|hemorrhagic contusion|contusion",
    "IVH": r"intraventricular|\bivh\b|ventricular extension",
    "blood": r"hemorrhag\w*|haemorrhag\w*|hematoma|haematoma|\bbleed\w*|\bblood\b|\bich\b",
    "extra_axial": r"extra-?axial (?:fluid )?(?:collection|hemorrhage|hematoma|blood)",
    "hyperdense": r"hyperdens\w*|high[- ]density",
    "midline_shift": r"midline shift",
}
_NEGATION_BEFORE = re.compile(
    r"\b(?:no|not|without|negative for|free of|absence of|absent|rather than|neither|nor|resolved|"
    r"resolution of|rule out|ruled out)\b"
)
_NEGATION_AFTER = re.compile(
    r"^\W*(?:\w+\W+){0,3}?(?:(?:is|are|was|were|has|have) )?(?:not (?:seen|identified|present|demonstrated|visualized)"
    r"|absent|resolved|no longer)"
)
_UNCERTAIN = re.compile(
    r"cannot be (?:excluded|ruled out)|can ?not be (?:excluded|ruled out)|cannot exclude|not excluded|"
    r"\b(?:questionable|equivocal|indeterminate|versus|vs\.?|differential)\b"
)
_HEDGE = re.compile(r"\b(?:possible|possibly|probable|probably|suspected|suspicious for|may represent|could represent)\b")
_PSEUDO_NEGATION = re.compile(r"\bno (?:significant )?(?:change|interval change|increase)\b")
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|except|whereas)\b")
_GLOBAL_NEGATIVE = re.compile(
    r"no (?:evidence of |definite |)acute intracranial (?:hemorrhage|haemorrhage|abnormality|process|findings?|pathology)"
    r"|negative for (?:acute )?intracranial (?:hemorrhage|haemorrhage)|no intracranial (?:hemorrhage|haemorrhage)"
    r"|(?:unremarkable|normal|negative) (?:non-?contrast |noncontrast )?(?:ct|study|exam\w*)(?: of the (?:head|brain))?"
    r"|negative (?:non-?contrast |noncontrast )?(?:head|brain) ct"
)
_NEGATION_WINDOW_WORDS = 8


@dataclass(frozen=True)
class Mention:
    term: str  # key of TERMS
    status: str  # affirmed, negated, uncertain or hedged
    section: str  # findings or impression
    sentence: str


@dataclass(frozen=True)
class Report:
    text: str
    mentions: tuple[Mention, ...]

    def has(self, term: str, status: str, section: str | None = None) -> bool:
        return any(m.term == term and m.status == status and (section is None or m.section == section)
                   for m in self.mentions)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.;!?])\s+|\n+", text) if s.strip()]


def _status(clause: str, start: int, end: int) -> str:
    if _UNCERTAIN.search(clause):
        return "uncertain"
    before = " ".join(clause[:start].split()[-_NEGATION_WINDOW_WORDS:])
    before = _PSEUDO_NEGATION.sub(" ", before)
    if _NEGATION_BEFORE.search(before) or _NEGATION_AFTER.search(clause[end:]):
        return "negated"
    if _HEDGE.search(clause[:start]):
        return "hedged"
    return "affirmed"


def read_report(text: str) -> Report:
    """Mentions of every TERMS group, each with its negation/uncertainty status and section."""
    lower = text.lower()
    findings, _, impression = lower.partition("impression:")
    mentions = []
    for section, body in (("findings", findings), ("impression", impression)):
        for sentence in _sentences(body):
            for clause in _CLAUSE_BREAK.split(sentence):
                for term, pattern in TERMS.items():
                    for match in re.finditer(pattern, clause):
                        mentions.append(Mention(term, _status(clause, *match.span()), section, sentence))
    return Report(text=text, mentions=tuple(mentions))


# --------------------------------------------------------------------------------------------
# Labeling functions


@dataclass(frozen=True)
class LabelingFunction:
    name: str
    label: str  # one of LABELS
    vote: Callable[[Report], int]  # 1, 0 or ABSTAIN
    polarity: int  # the vote it casts when it does not abstain


def _globally_negative(r: Report) -> bool:
    return bool(_GLOBAL_NEGATIVE.search(r.text.lower()))


def _any_affirmed_bleed(r: Report) -> bool:
    return any(r.has(t, "affirmed") for t in (*SUBTYPES, "blood", "extra_axial"))


def _if(condition: Callable[[Report], bool], value: int) -> Callable[[Report], int]:
    return lambda r: value if condition(r) else ABSTAIN


def _subtype_lfs(s: str) -> list[LabelingFunction]:
    lfs = [
        LabelingFunction(f"{s}_affirmed", s, _if(lambda r: r.has(s, "affirmed"), 1), 1),
        LabelingFunction(f"{s}_in_impression", s, _if(lambda r: r.has(s, "affirmed", "impression"), 1), 1),
        LabelingFunction(f"{s}_hedged", s, _if(lambda r: r.has(s, "hedged"), 1), 1),
        LabelingFunction(f"{s}_negated", s, _if(lambda r: r.has(s, "negated") and not r.has(s, "affirmed"), 0), 0),
        LabelingFunction(f"{s}_global_negative", s,
                         _if(lambda r: _globally_negative(r) and not _any_affirmed_bleed(r), 0), 0),
    ]
    if s in ("EDH", "SDH"):
        shape = r"lentiform|biconvex" if s == "EDH" else r"crescent"
        lfs += [
            LabelingFunction(f"{s}_shape", s, _if(lambda r: any(
                m.term in ("extra_axial", "blood", "hyperdense") and m.status == "affirmed" and re.search(shape, m.sentence)
                for m in r.mentions), 1), 1),
            LabelingFunction(f"{s}_no_extra_axial", s,
                             _if(lambda r: r.has("extra_axial", "negated") and not r.has(s, "affirmed"), 0), 0),
        ]
    if s == "SAH":
        lfs.append(LabelingFunction("SAH_cisterns_clear", s, _if(
            lambda r: bool(re.search(r"cisterns are (?:clear|patent|preserved)", r.text.lower())) and not r.has(s, "affirmed"), 0), 0))
    if s == "IVH":
        lfs.append(LabelingFunction("IVH_layering", s, _if(
            lambda r: bool(re.search(r"(?:layering|blood|hemorrhage)[^.]*(?:occipital|posterior) horn", r.text.lower())), 1), 1))
    return lfs


def _any_lfs() -> list[LabelingFunction]:
    return [
        LabelingFunction("any_subtype_affirmed", "any", _if(lambda r: any(r.has(s, "affirmed") for s in SUBTYPES), 1), 1),
        LabelingFunction("any_bleed_affirmed", "any", _if(lambda r: r.has("blood", "affirmed") or r.has("extra_axial", "affirmed"), 1), 1),
        LabelingFunction("any_in_impression", "any", _if(
            lambda r: any(r.has(t, "affirmed", "impression") for t in (*SUBTYPES, "blood")), 1), 1),
        LabelingFunction("any_hedged", "any", _if(lambda r: any(r.has(t, "hedged") for t in (*SUBTYPES, "blood")), 1), 1),
        LabelingFunction("any_hyperdense", "any", _if(lambda r: r.has("hyperdense", "affirmed"), 1), 1),
        LabelingFunction("any_midline_shift", "any", _if(
            lambda r: any(m.term == "midline_shift" and m.status == "affirmed" and re.search(r"\d\s*mm", m.sentence)
                          for m in r.mentions), 1), 1),
        LabelingFunction("any_global_negative", "any", _if(lambda r: _globally_negative(r) and not _any_affirmed_bleed(r), 0), 0),
        LabelingFunction("any_bleed_negated", "any", _if(
            lambda r: r.has("blood", "negated") and not _any_affirmed_bleed(r), 0), 0),
    ]


LABELING_FUNCTIONS: dict[str, list[LabelingFunction]] = {"any": _any_lfs(), **{s: _subtype_lfs(s) for s in SUBTYPES}}


def apply_lfs(reports: Sequence[str]) -> dict[str, np.ndarray]:
    """label -> (n_reports, n_lfs of that label) votes in {1, 0, ABSTAIN}."""
    read = [read_report(text) for text in reports]
    return {
        label: np.array([[lf.vote(r) for lf in lfs] for r in read], dtype=np.int8).reshape(len(read), len(lfs))
        for label, lfs in LABELING_FUNCTIONS.items()
    }


# --------------------------------------------------------------------------------------------
# Label model


def _outcome(votes: np.ndarray) -> np.ndarray:
    """Votes {1, 0, ABSTAIN} -> outcome index {0: voted 0, 1: voted 1, 2: abstained}."""
    return np.where(votes == ABSTAIN, 2, votes).astype(np.int64)


class LabelModel:
    """Dawid-Skene per label: P(LF outcome | true label) for outcomes (0, 1, abstain), fit by EM.

    Abstaining is an outcome, so LFs that only ever vote one way (most of them) still carry
    information. A Dirichlet prior (an LF votes in half of the reports where its vote would be
    right and in 2% of those where it would be wrong) keeps the estimates sane on a few reports;
    with many reports the data dominate.
    """

    def __init__(self, fire_rate: float = 0.5, false_fire_rate: float = 0.02, prior_strength: float = 10.0,
                 iterations: int = 100) -> None:
        self.fire_rate = fire_rate  # prior: how often an LF votes when the true label is its polarity
        self.false_fire_rate = false_fire_rate  # ... and when it is not
        self.prior_strength = prior_strength  # in reports
        self.iterations = iterations
        self.class_prior: dict[str, float] = {}
        self.conditionals: dict[str, np.ndarray] = {}  # label -> (n_lfs, 2 classes, 3 outcomes)

    def _pseudo_counts(self, label: str) -> np.ndarray:
        """Dirichlet prior counts per LF and class over the outcomes (voted 0, voted 1, abstained)."""
        lfs = LABELING_FUNCTIONS[label]
        counts = np.full((len(lfs), 2, 3), 0.05)
        for j, lf in enumerate(lfs):
            right, wrong = lf.polarity, 1 - lf.polarity  # the classes under which its vote is right / wrong
            counts[j, right, lf.polarity] += self.prior_strength * self.fire_rate
            counts[j, right, 2] += self.prior_strength * (1 - self.fire_rate)
            counts[j, wrong, lf.polarity] += self.prior_strength * self.false_fire_rate
            counts[j, wrong, 2] += self.prior_strength * (1 - self.false_fire_rate)
        return counts

    def _posterior(self, label: str, outcomes: np.ndarray) -> np.ndarray:
        log_cond = np.log(self.conditionals[label])  # (m, 2, 3)
        m = outcomes.shape[1]
        log_like = np.stack([log_cond[np.arange(m), y, outcomes].sum(axis=1) for y in (0, 1)], axis=1)
        prior = self.class_prior[label]
        log_like += np.log([1 - prior, prior])
        log_like -= log_like.max(axis=1, keepdims=True)
        p = np.exp(log_like)
        return p[:, 1] / p.sum(axis=1)

    def fit(self, reports: Sequence[str]) -> "LabelModel":
        votes = apply_lfs(reports)
        for label in LABELS:
            outcomes = _outcome(votes[label])
            n, m = outcomes.shape
            pseudo = self._pseudo_counts(label)
            # start from the vote of the non-abstaining LFs (ties and no votes: 0.5)
            cast = votes[label] != ABSTAIN
            q = np.where(cast.any(axis=1), (votes[label] == 1).sum(axis=1) / np.maximum(cast.sum(axis=1), 1), 0.5)
            for _ in range(self.iterations):
                counts = pseudo.copy()
                for y, weight in ((0, 1 - q), (1, q)):
                    for o in range(3):
                        counts[:, y, o] += ((outcomes == o) * weight[:, None]).sum(axis=0)
                self.conditionals[label] = counts / counts.sum(axis=2, keepdims=True)
                self.class_prior[label] = float((q.sum() + 1) / (n + 4))  # Beta(1, 3): findings are the minority
                new_q = self._posterior(label, outcomes)
                converged = np.abs(new_q - q).max() < 1e-6 if n else True
                q = new_q
                if converged:
                    break
        return self

    def predict_proba(self, reports: Sequence[str]) -> np.ndarray:
        """(n_reports, len(LABELS)) probabilities; "any" is at least the largest subtype's."""
        if not self.conditionals:
            raise RuntimeError("fit the label model first")
        votes = apply_lfs(reports)
        proba = np.stack([self._posterior(label, _outcome(votes[label])) for label in LABELS], axis=1)
        proba[:, 0] = np.maximum(proba[:, 0], proba[:, 1:].max(axis=1, initial=0.0))
        return proba

    def lf_accuracies(self, label: str) -> dict[str, float]:
        """P(the true label is the LF's polarity | the LF fired), under the fitted model."""
        cond, prior = self.conditionals[label], self.class_prior[label]
        out = {}
        for j, lf in enumerate(LABELING_FUNCTIONS[label]):
            fired = np.array([1 - prior, prior]) * cond[j, :, lf.polarity]
            out[lf.name] = float(fired[lf.polarity] / fired.sum())
        return out


def predict_proba(reports: Sequence[str]) -> np.ndarray:
    """Fit a label model on these (unlabelled) reports and return their label probabilities."""
    return LabelModel().fit(reports).predict_proba(reports)
