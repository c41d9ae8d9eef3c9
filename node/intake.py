"""Intake: the one path by which a received instance enters the node, by C-STORE or by STOW-RS.

`Intake.accept` takes an instance as a Part 10 file, parses its header (up to Pixel Data; pixel
data is never decoded, its element is checked in the received bytes), validates it, writes the
bytes as received to the spool (fsynced) and records the instance, in that order: the sender's
success answer always follows a durable copy of a whole instance. Instances received at the same
time on several associations (or STOW-RS requests) are made durable together (`GroupCommit`): one
fsync per new directory entry's folder and one SQLite commit for the group, and no instance of a
group is answered before that commit returns. A CT image's Pixel
Data must be complete: native, as long as Rows x Columns x frames x samples x Bits Allocated;
encapsulated, every fragment whole and as many frames as Number of Frames; no element may declare
more bytes than the data set holds. A SOP Instance UID already stored is accepted again and kept
once, as first received; a corrupt copy of it is refused like any corrupt instance, never taken
for a duplicate. UIDs outside the DICOM grammar are kept as
received (ichnode.common.uids) and logged once per study (in a form that cannot carry a name);
only a missing or empty one is refused. A text element (UIDs included) with a NUL byte inside its
value is refused too (0xA900): that is a malformed header, an element whose length swallowed the
elements after it, the patient's name among them, and none of it may reach the store or the log.

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
         required UID missing or empty, a text element with NUL bytes inside (a malformed header), or a
         UID that differs from the request's (the C-STORE
         Affected SOP Instance UID, the STOW-RS URL's study)
  0xC000 cannot understand: the data set could not be parsed, or it or its Pixel Data is cut short
  0xC122 transfer syntax not supported (C-STORE negotiates it earlier)
"""
from __future__ import annotations

import logging
import sqlite3
import struct
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames
from pydicom.filereader import read_dataset
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
from ichnode.common.log_privacy import redact
from ichnode.common.uids import is_conformant, loggable
from ichnode.common.vocabulary import CT_IMAGE_SOP_CLASSES
from node.headers import InstanceHeader, instance_header
from node.metrics import GROUP_COMMIT_SIZE, INSTANCES, OTHER_OBJECTS
from node.spool import Spool, sync_dirs
from node.store import Received, Store

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
EXPLICIT_LONG_VRS = {b"OB", b"OW", b"UN", b"OF", b"OD", b"OL", b"OV"}  # the VRs Pixel Data may have, 4-byte length
TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
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
    odd = [f"{keyword} {loggable(getattr(header, field))}" for keyword, field in INSTANCE_UIDS.items()
           if not is_conformant(getattr(header, field))]
    if odd and NONCONFORMANT_UIDS_LOGGED.first(header.study_instance_uid):
        log.warning("study %s from %s: UIDs outside the DICOM UID grammar, e.g. %s; kept as received (files "
                    "named by digest), not logged again for this study", loggable(header.study_instance_uid), source,
                    ", ".join(odd))


def _check_lengths(ds: Dataset) -> None:
    """An element whose declared length runs past the end of the data set (pydicom reads what is
    there without a word) means the instance was cut short."""
    for element in ds.elements():  # top level, not decoded
        if (isinstance(element, RawDataElement) and element.value is not None
                and element.length != UNDEFINED_LENGTH and len(element.value) < element.length):
            raise Refused(0xC000, f"{element.tag} declares {element.length} bytes, {len(element.value)} follow")


def _check_tail(tail: bytes | memoryview, transfer_syntax: UID) -> None:
    """The elements after Pixel Data (trailing padding, rarely anything): parsed and whole."""
    if not len(tail):
        return
    try:
        elements = read_dataset(BytesIO(tail), transfer_syntax.is_implicit_VR, True)
    except Exception as exc:
        raise Refused(0xC000, f"cannot parse the elements after Pixel Data: {exc}") from None
    _check_lengths(elements)


def _raw_pixel_data(data: bytes, offset: int, transfer_syntax: UID) -> memoryview | None:
    """The value of the Pixel Data element at `offset` of the received bytes (where a header-only
    parse stopped; encapsulated: its items to the end of the data set), None when the data set ends
    there without one. Native Pixel Data must hold its declared length."""
    if offset + 8 > len(data) or struct.unpack_from("<HH", data, offset) != (0x7FE0, 0x0010):
        return None
    if transfer_syntax.is_implicit_VR:
        length, start = struct.unpack_from("<L", data, offset + 4)[0], offset + 8
    elif data[offset + 4:offset + 6] in EXPLICIT_LONG_VRS:
        if offset + 12 > len(data):
            raise Refused(0xC000, "Pixel Data element header cut short")
        length, start = struct.unpack_from("<L", data, offset + 8)[0], offset + 12
    else:
        raise Refused(0xC000, f"Pixel Data with VR {data[offset + 4:offset + 6]!r}")
    view = memoryview(data)
    if length == UNDEFINED_LENGTH:
        if not transfer_syntax.is_encapsulated:
            raise Refused(0xC000, "native Pixel Data of undefined length")
        return view[start:]
    if start + length > len(data):
        raise Refused(0xC000, f"(7FE0,0010) declares {length} bytes, {len(data) - start} follow")
    _check_tail(view[start + length:], transfer_syntax)
    return view[start:start + length]


def _check_text_elements(ds: Dataset) -> None:
    """A NUL byte inside a text value (trailing padding aside) is the mark of an element whose
    length swallowed the elements after it, the patient's name among them: such a header is
    refused, naming the tag only, so none of those bytes reaches the store, the log or the API."""
    for element in ds.elements():  # top level, not decoded
        if not isinstance(element, RawDataElement) or not element.value:
            continue
        vr = element.VR or (dictionary_VR(element.tag) if dictionary_has_tag(element.tag) else None)  # implicit VR
        if vr in TEXT_VRS and b"\x00" in element.value.rstrip(b"\x00 "):
            raise Refused(0xA900, f"{element.tag} holds NUL bytes inside its value: malformed header")


def _check_fragments(pixel_data: bytes | memoryview, frames: int, transfer_syntax: UID) -> None:
    """Encapsulated Pixel Data: every item whole (pydicom's own parsers skip past the end without a
    word), as many frames as NumberOfFrames says, and whole elements after it."""
    offset = 0
    while offset < len(pixel_data):
        if offset + 8 > len(pixel_data):
            raise Refused(0xC000, f"Pixel Data: item header cut at byte {offset}")
        group, element, length = struct.unpack_from("<HHL", pixel_data, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            _check_tail(pixel_data[offset + 8:], transfer_syntax)
            pixel_data = pixel_data[:offset + 8]
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise Refused(0xC000, f"Pixel Data: ({group:04X},{element:04X}) at byte {offset}, not an item")
        if offset + 8 + length > len(pixel_data):
            raise Refused(0xC000, f"Pixel Data: fragment of {length} bytes cut at {len(pixel_data) - offset - 8}")
        offset += 8 + length
    found = sum(1 for _ in generate_frames(bytes(pixel_data), number_of_frames=frames))
    if found != frames:
        raise Refused(0xC000, f"Pixel Data holds {found} frames, NumberOfFrames {frames}")


class GroupCommit:
    """Makes received objects durable in groups: the first caller to find no commit under way
    commits everything waiting (fsync of the new files' folders and one store transaction), the
    others wait for it and are answered together. There is no added delay: a lone association
    commits each instance at once, concurrent ones share the fsyncs of whoever is waiting.

    The folders' fsync and the store's commit run at the same time (the file system serves both
    flushes with one journal commit, about half the time of one after the other), and every
    instance of the group is answered only when both are over. A crash between the two may leave
    an index row whose file name was not yet durable: that instance was never answered, its sender
    sends it again (the file comes back under the same name, the row is kept), and a worker leaves
    out a file it cannot read, saying so."""

    def __init__(self, store: Store):
        self.store = store
        self._cond = threading.Condition()
        self._waiting: list[_Pending] = []
        self._committing = False
        self._folders = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool-fsync")

    def record(self, item: Received, dirs: list[Path]) -> bool:
        """Durably record `item` whose file (if any) is written and fsynced and whose directory
        entries need `dirs` fsynced; False when its SOP Instance UID was already recorded."""
        pending = _Pending(item, dirs)
        with self._cond:
            self._waiting.append(pending)
            while not pending.done:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                group, self._waiting = self._waiting, []
                self._cond.release()
                try:
                    self._commit(group)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        return pending.new

    def _commit(self, group: list[_Pending]) -> None:
        GROUP_COMMIT_SIZE.observe(len(group))
        folders = self._folders.submit(sync_dirs, [folder for pending in group for folder in pending.dirs])
        try:
            results = self.store.record_received([pending.item for pending in group])
            folders.result()
        except Exception as exc:  # every instance of the group gets it, none is left waiting
            for pending in group:
                pending.error, pending.done = exc, True
            return
        for pending, new in zip(group, results):
            pending.new, pending.done = new, True


@dataclass
class _Pending:
    item: Received
    dirs: list[Path]
    new: bool = False
    error: Exception | None = None
    done: bool = False


class Intake:
    def __init__(self, spool: Spool, store: Store, listener: ListenerSection):
        self.spool = spool
        self.group_commit = GroupCommit(store)
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
            header, ds, offset = self._parsed(data)
            if check:
                check(header)
            ct_image = header.sop_class_uid in CT_IMAGE_SOP_CLASSES
            if ct_image:
                self._check_ct_image(header, ds, data, offset)
                new = self._keep(header, data, source, ct_image=True)
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
    def _parsed(data: bytes) -> tuple[InstanceHeader, Dataset, int | None]:
        """The data set up to Pixel Data and the offset in `data` where the header-only parse stopped;
        a deflated data set is inflated and parsed whole (offset None): its bytes are not its elements."""
        try:
            stream = BytesIO(data)
            ds = dcmread(stream, stop_before_pixels=True)
            transfer_syntax = UID(ds.file_meta.TransferSyntaxUID)
            offset: int | None = stream.tell()
            if transfer_syntax.is_deflated:
                ds, offset = dcmread(BytesIO(data)), None
            _check_text_elements(ds)
            missing = [kw for kw in REQUIRED_ATTRIBUTES if not ds.get(kw)]
            header = None if missing else instance_header(ds, str(transfer_syntax))
        except Refused:
            raise
        except Exception as exc:  # a malformed data set must not take the receiver down
            raise Refused(0xC000, f"cannot parse data set: {redact(str(exc))}") from None
        if missing:
            raise Refused(0xA900, f"missing {', '.join(missing)}")
        return header, ds, offset

    @staticmethod
    def _check_ct_image(header: InstanceHeader, ds: Dataset, data: bytes, offset: int | None) -> None:
        """What the worker needs of a CT image: whole pixel data it can decode."""
        if header.transfer_syntax not in TRANSFER_SYNTAXES:
            raise Refused(0xC122, f"transfer syntax {header.transfer_syntax} is not supported")
        transfer_syntax = UID(header.transfer_syntax)
        _check_lengths(ds)
        if offset is None:
            pixels = ds.get("PixelData")
        else:
            pixels = _raw_pixel_data(data, offset, transfer_syntax)
        if pixels is None:
            raise Refused(0xA900, "no Pixel Data in the data set")
        missing = [kw for kw in IMAGE_ATTRIBUTES if ds.get(kw) in (None, "")]
        if missing:
            raise Refused(0xA900, f"missing {', '.join(missing)}")
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
            if transfer_syntax.is_encapsulated:
                _check_fragments(pixels, frames, transfer_syntax)
            else:
                samples = int(ds.get("SamplesPerPixel") or 1)
                expected = -(-ds.Rows * ds.Columns * frames * samples * ds.BitsAllocated // 8)
                if len(pixels) < expected:
                    raise Refused(0xC000, f"Pixel Data truncated: {len(pixels)} of {expected} bytes")
        except (TypeError, ValueError) as exc:  # a value of the wrong form, or fragments pydicom cannot split
            raise Refused(0xC000, f"Pixel Data cannot be checked: {exc}") from None

    def _keep(self, header: InstanceHeader, data: bytes | None, source: str, ct_image: bool) -> bool:
        """Spool the bytes (unless None: a discarded other object), then record durably; True for a
        new instance, False for a duplicate."""
        try:
            path, dirs = None, []
            if data is not None:
                written, _, dirs = self.spool.write_file(header.study_instance_uid, header.series_instance_uid,
                                                         header.sop_instance_uid, data)
                path = self.spool.relative(written)
            return self.group_commit.record(Received(header, path, source, ct_image), dirs)
        except OSError as exc:
            raise Refused(0xA700, f"could not be stored: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise Refused(0xA700, f"could not be recorded: {exc}") from None

    def _count_other_object(self, header: InstanceHeader, data: bytes, source: str) -> bool:
        """An object of another SOP class: counted for its study, spooled when configured, never
        analysed; True when new."""
        action = "kept" if self.keep_other_objects else "discarded"
        new = self._keep(header, data if self.keep_other_objects else None, source, ct_image=False)
        if new:
            sop_class = UID(header.sop_class_uid).name
            OTHER_OBJECTS.labels(sop_class=sop_class, action=action).inc()
            if OTHER_SERIES_LOGGED.first(header.series_instance_uid):
                log.info("series %r of study %r from %s holds %s objects, not CT images: answered success, %s and "
                         "counted (other_objects), not analysed; logged once per series", header.series_instance_uid,
                         header.study_instance_uid, source, sop_class, action)
        return new
