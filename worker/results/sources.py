"""The source instances as result objects use them: the instance (and frame, for Enhanced CT)
each volume slice came from, and the patient and study attributes results carry over."""
from __future__ import annotations

import copy

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from worker.geometry import Volume


def slice_source(sources: list[Dataset], volume: Volume, index: int) -> tuple[Dataset, list[int] | None]:
    """The source dataset of volume slice ``index`` and, for a multi-frame source, its frame."""
    frame = volume.slices[index].frame_number
    return sources[index], None if frame is None else [frame]


def in_source_order(
    sources: list[Dataset], volume: Volume, array: np.ndarray
) -> tuple[list[Dataset], np.ndarray]:
    """The distinct source images and ``array`` (volume order) rearranged to their frames.

    Single-frame series: the sources in volume order and the array as is. One multi-frame
    (Enhanced CT) source: that dataset and the array placed at each slice's frame number, so
    derived frames line up with the frames they were computed from.
    """
    if volume.slices[0].frame_number is None:
        return list(sources), array
    source = sources[0]
    if any(ds is not source and ds.SOPInstanceUID != source.SOPInstanceUID for ds in sources):
        raise ValueError("multi-frame volumes must come from a single source instance")
    framed = np.zeros((int(source.NumberOfFrames),) + array.shape[1:], dtype=array.dtype)
    for index, ref in enumerate(volume.slices):
        framed[ref.frame_number - 1] = array[index]
    return [source], framed


def distinct(datasets: list[Dataset]) -> list[Dataset]:
    """``datasets`` without repeats (the slices of a multi-frame source share one dataset)."""
    return list({ds.SOPInstanceUID: ds for ds in datasets}.values())


#: Patient and study attributes a result object carries over from its source.
PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription",
)
_VALID = {
    "PatientSex": lambda value: value in ("M", "F", "O"),
    "PatientBirthDate": DA,
    "StudyDate": DA,
    "StudyTime": TM,
}


def _is_valid(keyword: str, value) -> bool:
    try:
        return bool(_VALID[keyword](value))
    except ValueError:
        return False


#: Type 2 patient and study attributes highdicom reads from every source (absent ones raise).
TYPE2_PATIENT_AND_STUDY = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
)


def conformant(ds: Dataset, slice_spacing_mm: float) -> Dataset:
    """``ds``, or a shallow copy with the patient/study values highdicom would reject emptied, the
    absent Type 2 ones present and empty, and an absent or empty Slice Thickness set to the slice
    spacing the loader measured.

    highdicom validates Patient's Sex and the dates and times it copies into derived objects, and
    reads the Type 2 attributes unconditionally; a source that bends those rules (sex "U", a year
    as birth date, no birth date at all) must not cost the series its results. Empty is what the
    standard allows for Type 2, so the results stay valid. The Segmentation's Pixel Measures need
    a Slice Thickness (Type 2 in the source's Image Plane module).
    """
    bad = [k for k in _VALID if ds.get(k) not in (None, "") and not _is_valid(k, ds.get(k))]
    bad += [k for k in TYPE2_PATIENT_AND_STUDY if k not in ds and k not in bad]
    no_thickness = ds.get("SliceThickness") in (None, "")
    if not bad and not no_thickness:
        return ds
    fixed = Dataset(dict(ds.items()))  # own element dict; copy.copy would share it
    if hasattr(ds, "file_meta"):
        fixed.file_meta = ds.file_meta
    replacements = {keyword: "" for keyword in bad}
    if no_thickness:
        replacements["SliceThickness"] = round(slice_spacing_mm, 6)
    for keyword, value in replacements.items():
        if keyword in fixed:
            del fixed[keyword]  # a new element, not a change to the shared one
        setattr(fixed, keyword, value)
    return fixed


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            target[keyword] = copy.deepcopy(source[keyword])
