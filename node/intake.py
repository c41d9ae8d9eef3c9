"""Intake: the one path by which a received instance enters the node, by C-STORE or by STOW-RS.

`Intake.accept` takes an instance as a Part 10 file, parses it (pixel data is not decoded),
validates it, writes the bytes to the spool (fsynced) and records the instance, in that order: the
sender's success answer always follows a durable copy of a whole instance. A CT image's Pixel
Data must be complete: native, as long as Rows x Columns x frames x samples x Bits Allocated;
encapsulated, every fragment whole and as many frames as Number of Frames; no element may declare
more bytes than the data set holds. A SOP Instance UID already stored is accepted again and kept
once, as first received; a corrupt copy of it is refused like any corrupt instance, never taken
for a duplicate. UIDs outside the DICOM grammar are kept as
received (ichnode.common.uids) and logged once per study; only a missing or empty one is refused.

Only CT images (`CT_IMAGE_SOP_CLASSES`) are spooled for analysis. With `accept_all_storage` an
object of any other storage SOP class (dose reports, secondary captures, ...) is answered with
success too, so a forwarded study never fails at the sender: it is counted for its study
(`other_objects` in the API), in /metrics and once per series in the log, and discarded or kept in
the spool as `[listener] other_objects` says. Without it, such an object is refused (0x0122).

A refusal raises `Refused` with the status the sender gets. The codes are both the C-STORE Status
(PS3.4 Table B.2-1) and the STOW-RS Failure Reason (PS3.18 uses the same values):
  0x0122 SOP class not supported, without accept_all_storage (C-STORE refuses it at negotiation)
  0xA700 out of resources: free space below storage.min_free_mb (checked first), or the instance
         could not be written
  0xA900 data set does not match SOP class: no Pixel Data, Rows, Columns or Bits Allocated, a
         required UID missing or empty, or a UID that differs from the request's (the C-STORE
         Affected SOP Instance UID, the STOW-RS URL's study)
  0xC000 cannot understand: the data set could not be parsed, or it or its Pixel Data is cut short
  0xC122 transfer syntax not supported (C-STORE negotiates it earlier)
"""
from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from io import BytesIO
from typing import Callable

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)

from ichnode.common.config import ListenerSection
from ichnode.common.uids import is_conformant
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node.headers import InstanceHeader, instance_header
from node.metrics import INSTANCES, OTHER_OBJECTS
from node.spool import Spool
from node.store import Store

log = logging.getLogger("ichnode.intake")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]
REQUIRED_ATTRIBUTES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
IMAGE_ATTRIBUTES = ("Rows", "Columns", "BitsAllocated")  # what the length of native Pixel Data follows from
UNDEFINED_LENGTH = 0xFFFFFFFF
INSTANCE_UIDS = {"StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
                 "SOPInstanceUID": "sop_instance_uid"}  # the header's UIDs, by their DICOM keyword


class Refused(Exception):
    """An instance the node did not store; `status` is the C-STORE Status / STOW-RS Failure Reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class OnceEach:
    """Which keys (study or series UIDs) were already reported, the latest `remembered` of them."""

    def __init__(self, remembered: int = 10_000):
        self.remembered = remembered
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # C-STORE associations run in their own threads

    def first(self, key: str) -> bool:
        """True the first time `key` is asked about."""
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self.remembered:
                self._seen.popitem(last=False)
            return True


#: Studies whose non-conformant UIDs were logged, shared by the C-STORE and STOW-RS intakes.
NONCONFORMANT_UIDS_LOGGED = OnceEach()
#: Series whose objects of other SOP classes were logged.
OTHER_SERIES_LOGGED = OnceEach()


def _log_nonconformant_uids(header: InstanceHeader, source: str) -> None:
    odd = [f"{keyword} {getattr(header, field)!r}" for keyword, field in INSTANCE_UIDS.items()
           if not is_conformant(getattr(header, field))]
    if odd and NONCONFORMANT_UIDS_LOGGED.first(header.study_instance_uid):
        log.warning("study %r from %s: UIDs outside the DICOM UID grammar, e.g. %s; kept as received (files "
                    "named by digest), not logged again for this study", header.study_instance_uid, source,
                    ", ".join(odd))


def _check_lengths(ds: Dataset) -> None:
    """An element whose declared length runs past the end of the data set (pydicom reads what is
    there without a word) means the instance was cut short."""
    for element in ds.elements():  # top level, not decoded
        if (isinstance(element, RawDataElement) and element.value is not None
                and element.length != UNDEFINED_LENGTH and len(element.value) < element.length):
            raise Refused(0xC000, f"{element.tag} declares {element.length} bytes, {len(element.value)} follow")


def _check_fragments(pixel_data: bytes, frames: int) -> None:
    """Encapsulated Pixel Data: every item whole (pydicom's own parsers skip past the end without a
    word), and as many frames as NumberOfFrames says."""
    offset = 0
    while offset < len(pixel_data):
        if offset + 8 > len(pixel_data):
            raise Refused(0xC000, f"Pixel Data: item header cut at byte {offset}")
        group, element, length = struct.unpack_from("<HHL", pixel_data, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise Refused(0xC000, f"Pixel Data: ({group:04X},{element:04X}) at byte {offset}, not an item")
        if offset + 8 + length > len(pixel_data):
            raise Refused(0xC000, f"Pixel Data: fragment of {length} bytes cut at {len(pixel_data) - offset - 8}")
        offset += 8 + length
    found = sum(1 for _ in generate_frames(pixel_data, number_of_frames=frames))
    if found != frames:
        raise Refused(0xC000, f"Pixel Data holds {found} frames, NumberOfFrames {frames}")


class Intake:
    def __init__(self, spool: Spool, store: Store, listener: ListenerSection):
        self.spool = spool
        self.store = store
        self.accept_all_storage = listener.accept_all_storage
        self.keep_other_objects = listener.other_objects == "keep"

    def accept(self, data: bytes, source: str,
               check: Callable[[InstanceHeader], None] | None = None) -> InstanceHeader:
        """Store one Part 10 instance from `source` (calling AE title or client address); returns its
        header. `check(header)` raises `Refused` when the instance does not fit its request."""
        if shortage := self.spool.free_space.shortage():  # logged once per shortage, not per instance
            INSTANCES.labels(outcome="refused 0xA700").inc()
            raise Refused(0xA700, shortage)
        try:
            header, ds = self._parsed(data)
            if check:
                check(header)
            ct_image = header.sop_class_uid in CT_IMAGE_SOP_CLASSES
            if ct_image:
                self._check_ct_image(header, ds)
                new = self._keep_ct_image(header, data, source)
            elif self.accept_all_storage:
                new = self._count_other_object(header, data, source)
            else:
                raise Refused(0x0122, f"SOP class {header.sop_class_uid} is not a CT image storage class")
        except Refused as refused:
            INSTANCES.labels(outcome=f"refused 0x{refused.status:04X}").inc()
            log.log(logging.ERROR if refused.status == 0xA700 else logging.WARNING,
                    "instance from %s refused (0x%04X): %s", source, refused.status, refused.reason)
            raise
        INSTANCES.labels(outcome=("stored" if ct_image else "other") if new else "duplicate").inc()
        _log_nonconformant_uids(header, source)
        if new:
            log.debug("stored %s (series %s) from %s", header.sop_instance_uid, header.series_instance_uid, source)
        else:
            log.info("duplicate %s from %s: already received, the first copy counts", header.sop_instance_uid, source)
        return header

    @staticmethod
    def _parsed(data: bytes) -> tuple[InstanceHeader, Dataset]:
        try:
            ds = dcmread(BytesIO(data))
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
            missing = [kw for kw in REQUIRED_ATTRIBUTES if not ds.get(kw)]
            header = None if missing else instance_header(ds, transfer_syntax)
        except Exception as exc:  # a malformed data set must not take the receiver down
            raise Refused(0xC000, f"cannot parse data set: {exc}") from None
        if missing:
            raise Refused(0xA900, f"missing {', '.join(missing)}")
        return header, ds

    @staticmethod
    def _check_ct_image(header: InstanceHeader, ds: Dataset) -> None:
        """What the worker needs of a CT image: whole pixel data it can decode."""
        if "PixelData" not in ds:
            raise Refused(0xA900, "no Pixel Data in the data set")
        if header.transfer_syntax not in TRANSFER_SYNTAXES:
            raise Refused(0xC122, f"transfer syntax {header.transfer_syntax} is not supported")
        missing = [kw for kw in IMAGE_ATTRIBUTES if ds.get(kw) in (None, "")]
        if missing:
            raise Refused(0xA900, f"missing {', '.join(missing)}")
        try:
            _check_lengths(ds)
            frames = int(ds.get("NumberOfFrames") or 1)
            if UID(header.transfer_syntax).is_encapsulated:
                _check_fragments(ds.PixelData, frames)
            else:
                samples = int(ds.get("SamplesPerPixel") or 1)
                expected = -(-ds.Rows * ds.Columns * frames * samples * ds.BitsAllocated // 8)
                if len(ds.PixelData) < expected:
                    raise Refused(0xC000, f"Pixel Data truncated: {len(ds.PixelData)} of {expected} bytes")
        except (TypeError, ValueError) as exc:  # a value of the wrong form, or fragments pydicom cannot split
            raise Refused(0xC000, f"Pixel Data cannot be checked: {exc}") from None

    def _keep_ct_image(self, header: InstanceHeader, data: bytes, source: str) -> bool:
        """Spool, then record; True for a new instance, False for a duplicate."""
        try:
            path, new = self.spool.write(header.study_instance_uid, header.series_instance_uid,
                                         header.sop_instance_uid, data)
            if new:
                self.store.record_instance(header, self.spool.relative(path), source)
        except OSError as exc:
            raise Refused(0xA700, f"could not be stored: {exc.strerror or exc}") from None
        return new

    def _count_other_object(self, header: InstanceHeader, data: bytes, source: str) -> bool:
        """An object of another SOP class: counted for its study, spooled when configured, never
        analysed; True when new."""
        action = "kept" if self.keep_other_objects else "discarded"
        try:
            path = None
            if self.keep_other_objects:
                path = self.spool.relative(self.spool.write(header.study_instance_uid, header.series_instance_uid,
                                                            header.sop_instance_uid, data)[0])
            new = self.store.record_other_object(header, path, source)
        except OSError as exc:
            raise Refused(0xA700, f"could not be stored: {exc.strerror or exc}") from None
        if new:
            sop_class = UID(header.sop_class_uid).name
            OTHER_OBJECTS.labels(sop_class=sop_class, action=action).inc()
            if OTHER_SERIES_LOGGED.first(header.series_instance_uid):
                log.info("series %r of study %r from %s holds %s objects, not CT images: answered success, %s and "
                         "counted (other_objects), not analysed; logged once per series", header.series_instance_uid,
                         header.study_instance_uid, source, sop_class, action)
        return new
