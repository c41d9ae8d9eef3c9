"""The words every part of ichnode uses for the same thing, each defined once.

CT SOP classes (what the listener accepts, selection considers and the loader reads), the
detector's labels and their names, priority levels, the disclaimer and the local coding scheme
shared by the DICOM results and the HL7 messages.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, get_args

from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage

#: CT image SOP classes with one slice per frame (geometry in the functional groups).
MULTI_FRAME_CT_SOP_CLASSES: tuple[str, ...] = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
#: Every CT image SOP class the node receives, selects and analyses.
CT_IMAGE_SOP_CLASSES: tuple[str, ...] = (CTImageStorage, *MULTI_FRAME_CT_SOP_CLASSES)

#: Hemorrhage subtypes, in the output order of every detector member and of the ensemble.
SUBTYPES: tuple[str, ...] = ("EDH", "IPH", "IVH", "SAH", "SDH")
#: Detector labels: any intracranial hemorrhage, then the subtypes.
LABELS: tuple[str, ...] = ("any",) + SUBTYPES
#: What each label stands for, in words (HL7 observation names, local code meanings).
LABEL_NAMES: dict[str, str] = {
    "any": "intracranial hemorrhage",
    "EDH": "extradural hemorrhage",
    "IPH": "intraparenchymal hemorrhage",
    "IVH": "intraventricular hemorrhage",
    "SAH": "subarachnoid hemorrhage",
    "SDH": "subdural hemorrhage",
}

#: Worklist priority levels, most urgent first.
Level = Literal["STAT", "URGENT", "ROUTINE"]
#: Rank of each level: higher reads sooner.
LEVEL_RANK: dict[str, int] = {level: len(get_args(Level)) - 1 - i for i, level in enumerate(get_args(Level))}
LEVEL_MEANINGS: dict[str, str] = {"STAT": "Read immediately", "URGENT": "Read soon", "ROUTINE": "Routine reading"}

#: On every result: DICOM objects, HL7 messages, webhooks. ASCII, since many RIS still read
#: Latin-1 and Pillow's default font has no em dash.
DISCLAIMER = "NOT FOR DIAGNOSTIC USE - triage aid"
#: The local coding scheme of codes no public scheme has (a private scheme, PS3.3 8.1: "99" prefix).
LOCAL_CODING_SCHEME = "99ICHNODE"


class LocalCode(NamedTuple):
    """A code of LOCAL_CODING_SCHEME, the same in the DICOM results and the HL7 messages."""

    value: str
    meaning: str


PRIORITY_SCORE_CODE = LocalCode("PRIOSCORE", "Worklist priority score")
PRIORITY_RATIONALE_CODE = LocalCode("PRIORATIONALE", "Worklist priority rationale")
DIFFICULT_CASE_CODE = LocalCode("DIFFICULT", "Difficult case")
