"""What a series' header texts say about body region and contrast, read the same way by the node's
series selection (node.selection) and by the worker, which checks the images where they are silent.

Texts are matched upper-cased. A head series names the head in BodyPartExamined (HEAD, BRAIN,
SKULL, HEADNECK, ...) or, when that is empty, in its descriptions (head, brain, cerebr-, skull,
crani-, "cCT", Kopf, Schaedel, Hirn, craneo, ...). Contrast shows in ContrastBolusAgent (anything
but "none", "no", "N/A", "nativ", ...) or in SeriesDescription: C+, contrast/Kontrast, KM, CTA,
angio, perfusion, CTP, CTV, arterial, venous, or a volume given to the patient ("150cc",
"80 ml") - after removing negations such as "w/o contrast", "non-contrast", "ohne KM".
"""
from __future__ import annotations

import re

HEAD_WORDS = re.compile(r"\b(HEAD|BRAIN|SKULL|CR[AÁÂ]N[IE]|INTRACRANI|CEREBR|KOPF|SCH(AE|Ä|A)DEL|(GE)?HIRN|CCT\b)")
#: Regions that are not the head, named in descriptions when BodyPartExamined is empty.
OTHER_REGION_WORDS = re.compile(
    r"\b(CHEST|THORAX|THORAC\w*|LUNGS?|ABD(OMEN)?|PELVIS|SPINE|LUMBAR|KNEE|HIP|SHOULDER|CARDIAC|HEART|LIVER|KIDNEYS?)\b"
)
NEGATED_CONTRAST = re.compile(
    r"\b(W/?O|WITHOUT|NO|NON|OHNE|SANS|SIN)[\s-]*(IV\s*)?(CONTRAST|KONTRAST|CON\b|KM\b|C\b)|NONCONTRAST|NONCON\b|\bC-"
)
CONTRAST_WORDS = re.compile(
    r"C\+|CONTRAST|KONTRAST|\bKM\b|\bCTA|ANGIO|PERFUSION|\bPERF\b|\bCTP\b|\bCTV\b|ARTERIAL|VENOUS"
    r"|\b\d+\s*(CC|ML)\b"  # a volume of contrast medium, e.g. "150cc", "80 ml"
)
NO_AGENT = re.compile(r"(NONE|NO|N/?A|NIL|-+|0|NATIVE?|OHNE( KM)?|NO CONTRAST|NON.?CONTRAST)")


def head_in_headers(body_part: str, descriptions: str) -> bool | None:
    """True when the headers name the head, False when they name another region, None when silent.

    `descriptions`: SeriesDescription, ProtocolName and StudyDescription joined. A BodyPartExamined
    that names another region wins over the descriptions.
    """
    if body_part:
        return bool(HEAD_WORDS.search(body_part.upper()))
    if HEAD_WORDS.search(descriptions.upper()):
        return True
    return False if OTHER_REGION_WORDS.search(descriptions.upper()) else None


def contrast_in_headers(contrast_agent: str, series_description: str) -> str | None:
    """Why the headers say the series is contrast-enhanced, or None.

    ProtocolName is not searched: it often names the whole examination ("CTA head and neck")
    including its plain head series.
    """
    if contrast_agent and not NO_AGENT.fullmatch(contrast_agent.upper()):
        return f"ContrastBolusAgent '{contrast_agent}'"
    if CONTRAST_WORDS.search(NEGATED_CONTRAST.sub(" ", series_description.upper())):
        return f"SeriesDescription '{series_description}'"
    return None
