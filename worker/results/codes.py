"""Coded concepts and device identity shared by the result objects.

Sources of the codes (see docs/CONFORMANCE.md "Codes"):

* DCM, SCT codes that DICOM PS3.16 lists are taken from ``pydicom.sr.codedict`` (generated from
  PS3.16), so they are spelled exactly as the standard spells them.
* SCT disorder codes for the hemorrhage types not in PS3.16 were checked against SNOMED CT
  International value-set expansions (tx.fhir.org) and published finding lists.
* Extradural and intraventricular hemorrhage, the worklist priority and the triage attributes
  could not be checked against a SNOMED CT source available to the project and use the local
  coding scheme ``99ICHNODE`` (ichnode.common.vocabulary.LOCAL_CODING_SCHEME), declared in every
  object's Coding Scheme Identification Sequence.
"""
from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from ichnode.common.vocabulary import (
    DIFFICULT_CASE_CODE,
    LABEL_NAMES,
    LEVEL_MEANINGS,
    LOCAL_CODING_SCHEME,
    PRIORITY_RATIONALE_CODE,
    PRIORITY_SCORE_CODE,
)

MANUFACTURER = "ichnode"


def local(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, LOCAL_CODING_SCHEME, meaning)


#: The finding each detector label stands for, keyed like ``vocabulary.LABELS``.
FINDINGS: dict[str, CodedConcept] = {
    "any": CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "EDH": local("EDH", LABEL_NAMES["EDH"].capitalize()),
    "IPH": CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "IVH": local("IVH", LABEL_NAMES["IVH"].capitalize()),
    "SAH": CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
    "SDH": CodedConcept("35486000", "SCT", "Subdural intracranial hemorrhage"),
}

PRESENT = codes.SCT.Present  # CID 240
ABSENT = codes.SCT.Absent
YES = codes.SCT.Yes  # CID 230
NO = codes.SCT.No
PROBABILITY = codes.DCM.Probability  # (122157, DCM)
VOLUME = codes.SCT.Volume  # (118565006, SCT)
PRIORITY = codes.SCT.Priority  # (260870009, SCT)
COMMENT = codes.DCM.Comment  # (121106, DCM)
UNIT_PROBABILITY = CodedConcept("{probability}", "UCUM", "probability")
UNIT_ML = CodedConcept("ml", "UCUM", "milliliter")
UNIT_NONE = codes.UCUM.NoUnits  # ("1", UCUM)
PRIORITY_LEVELS = {level: local(level, meaning) for level, meaning in LEVEL_MEANINGS.items()}
PRIORITY_SCORE = local(*PRIORITY_SCORE_CODE)
PRIORITY_RATIONALE = local(*PRIORITY_RATIONALE_CODE)
DIFFICULT = local(*DIFFICULT_CASE_CODE)


#: Declares the local scheme in each object's Coding Scheme Identification Sequence.
CODING_SCHEMES = [
    CodingSchemeIdentificationItem(
        designator=LOCAL_CODING_SCHEME,
        name="ichnode local codes",
        responsible_organization="ichnode project",
    )
]
