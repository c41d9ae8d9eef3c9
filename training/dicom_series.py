"""Writing CT Image Storage series: the one writer behind every CT series the project writes.

`ct_series_datasets` builds the datasets of a single-frame CT series from stored pixel values,
their geometry and UIDs; callers add the header attributes that differ between them (patient,
study, equipment, vendor quirks).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian

#: Type 2 attributes of the CT Image IOD that the writer does not derive itself: present (empty)
#: unless the caller's header gives a value, so every series written is valid.
_TYPE2_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "SeriesNumber", "Manufacturer",
    "PatientPosition", "KVP", "AcquisitionNumber",
)


def ct_series_datasets(
    stored: np.ndarray,
    *,
    positions: np.ndarray,
    orientation: Sequence[float],
    pixel_spacing: tuple[float, float],
    thickness: float,
    spacing: float,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    instance_uids: Sequence[str],
    header: dict[str, Any],
    intercept: float,
    bits_stored: int = 16,
    padding: int | None = None,
    instance_numbers: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Dataset]:
    """One CT Image Storage dataset per slice of `stored`, in the order given.

    stored: (slices, rows, columns) int16 or uint16 stored values (HU = stored + intercept),
    which sets PixelRepresentation. positions: (slices, 3) ImagePositionPatient; orientation:
    the 6 row and column direction cosines; pixel_spacing: (row, column) mm. header: attribute
    keyword -> value for everything else (patient, study, series and equipment attributes).
    instance_numbers: InstanceNumber per slice (default 1..n in the order given). Other transfer
    syntaxes than the two uncompressed ones are encoded with pydicom's encoders.
    """
    if stored.dtype not in (np.int16, np.uint16):
        raise ValueError(f"stored values must be int16 or uint16, not {stored.dtype}")
    n = len(stored)
    normal = np.cross(orientation[:3], orientation[3:])
    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.SOPClassUID = CTImageStorage
    base.Modality = "CT"
    for keyword in _TYPE2_ATTRIBUTES:
        setattr(base, keyword, "")
    base.StudyInstanceUID = study_uid
    base.SeriesInstanceUID = series_uid
    base.FrameOfReferenceUID = frame_of_reference_uid
    base.PositionReferenceIndicator = ""
    base.ImageOrientationPatient = [f"{x + 0.0:.6f}" for x in orientation]  # no "-0.000000"
    base.PixelSpacing = [f"{x:.6f}" for x in pixel_spacing]
    base.SliceThickness = f"{thickness:g}"
    base.SpacingBetweenSlices = f"{spacing:g}"
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = stored.shape[1:]
    base.BitsAllocated = 16
    base.BitsStored = bits_stored
    base.HighBit = bits_stored - 1
    base.PixelRepresentation = int(stored.dtype == np.int16)
    if padding is not None:
        base.PixelPaddingValue = padding
    base.RescaleIntercept = f"{intercept:g}"
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    for keyword, value in header.items():
        setattr(base, keyword, value)

    numbers = list(instance_numbers) if instance_numbers is not None else list(range(1, n + 1))
    out = []
    for k in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = instance_uids[k]
        ds.InstanceNumber = numbers[k]
        ds.ImagePositionPatient = [f"{x:.4f}" for x in positions[k]]
        ds.SliceLocation = f"{positions[k] @ normal:.4f}"
        ds.PixelData = stored[k].tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        else:
            ds.compress(transfer_syntax, stored[k], generate_instance_uid=False)
        out.append(ds)
    return out

