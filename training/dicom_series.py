"""Writing CT Image Storage series: the one writer behind phantoms and `ichnode export-dicom`.

`ct_series_datasets` builds the datasets of a single-frame CT series from stored pixel values,
their geometry and UIDs; callers add the header attributes that differ between them (patient,
study, equipment, vendor quirks). `write_scan_series` writes a training `Scan` with it, so any
dataset adapter's scan (e.g. CT-ICH, which ships JPG windows) can go through `ichnode analyze`.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from training.data import Scan

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
    keyword -> value for everything else (patient, study, series and equipment attributes); it
    may override what every head series here shares: BodyPartExamined HEAD, Images in
    Acquisition = the slice count, and a brain window (40/80) as the default display.
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
    base.BodyPartExamined = "HEAD"
    base.ImagesInAcquisition = n
    base.WindowCenter, base.WindowWidth = "40", "80"  # brain window
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


def _export_uid(scan_id: str, *parts) -> str:
    return generate_uid(entropy_srcs=["ichnode-export", scan_id, *map(str, parts)])


def write_scan_series(scan: Scan, out_dir: Path) -> Path:
    """Write `scan` as a CT series, one file per slice, to out_dir/<scan_id>/; returns that folder.

    HU are rounded to integers (int16, intercept -1024); SliceThickness is the slice spacing (a
    Volume keeps no thickness). UIDs derive from the scan id, so exporting a scan again gives
    the same series. ImageType is DERIVED\\SECONDARY: the pixels come from a training dataset,
    and `scan.derivation` (how its HU were obtained, e.g. rebuilt from 8-bit windows) goes into
    DerivationDescription and ImageComments.
    """
    volume = scan.volume
    intercept = -1024.0
    limits = np.iinfo(np.int16)
    stored = np.clip(np.rint(volume.hu - intercept), limits.min, limits.max).astype(np.int16)
    n = len(stored)
    study_uid = _export_uid(scan.scan_id, "study")
    note = f"Training scan {scan.scan_id} exported by ichnode export-dicom. {scan.derivation or ''}".strip()
    header = {
        "ImageType": ["DERIVED", "SECONDARY", "AXIAL"],
        "DerivationDescription": note,
        "ImageComments": note,
        "PatientName": f"Training^{scan.patient_id}",
        "PatientID": scan.patient_id,
        "StudyID": scan.scan_id[-16:],
        "StudyDescription": "CT HEAD WO CONTRAST (training data export)",
        "SeriesDescription": f"Head {volume.spacing_mm[0]:g}mm {scan.scan_id}",
        "SeriesNumber": 1,
        "GantryDetectorTilt": f"{volume.gantry_tilt_deg:g}",
    }
    datasets = ct_series_datasets(
        stored,
        positions=volume.positions,
        orientation=volume.orientation,
        pixel_spacing=volume.spacing_mm[1:],
        thickness=volume.spacing_mm[0],
        spacing=volume.spacing_mm[0],
        study_uid=study_uid,
        series_uid=_export_uid(scan.scan_id, study_uid, "series"),
        frame_of_reference_uid=_export_uid(scan.scan_id, study_uid, "frame"),
        instance_uids=[_export_uid(scan.scan_id, study_uid, "instance", k) for k in range(n)],
        header=header,
        intercept=intercept,
    )
    folder = Path(out_dir) / scan.scan_id
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        ds.save_as(folder / f"{k + 1:04d}.dcm", enforce_file_format=True)
    return folder
