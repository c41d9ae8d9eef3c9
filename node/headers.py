"""`instance_header`: the few attributes of a received instance the node keeps in its store.

Series assembly and selection run on these summaries, so the node never re-reads the spool.
"""
from __future__ import annotations

from pydantic import BaseModel
from pydicom.dataset import Dataset


class InstanceHeader(BaseModel):
    """Summary of one instance. Enhanced (multi-frame) CT keeps its shared geometry only."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None = None
    body_part: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    kernel: str | None = None
    image_type: list[str] = []  # upper case
    contrast_agent: str | None = None
    images_in_acquisition: int | None = None
    instance_number: int | None = None
    image_position: list[float] | None = None
    image_orientation: list[float] | None = None
    slice_thickness: float | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: int = 1
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    transfer_syntax: str | None = None  # as received, when it came over the network


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _floats(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    value = ds.get(keyword)
    try:
        values = [float(v) for v in value] if value is not None else None
    except (TypeError, ValueError):
        return None
    return values if values is not None and len(values) == count else None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def instance_header(ds: Dataset, transfer_syntax: str | None = None) -> InstanceHeader:
    image_type = ds.get("ImageType")
    thickness = _floats(ds, "SliceThickness", 1)
    return InstanceHeader(
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        kernel=_text(ds, "ConvolutionKernel"),
        image_type=[str(v).upper() for v in image_type] if image_type else [],
        contrast_agent=_text(ds, "ContrastBolusAgent"),
        images_in_acquisition=_int(ds, "ImagesInAcquisition"),
        instance_number=_int(ds, "InstanceNumber"),
        image_position=_floats(ds, "ImagePositionPatient", 3),
        image_orientation=_floats(ds, "ImageOrientationPatient", 6),
        slice_thickness=thickness[0] if thickness else None,
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        number_of_frames=_int(ds, "NumberOfFrames") or 1,
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        study_description=_text(ds, "StudyDescription"),
        transfer_syntax=transfer_syntax,
    )
