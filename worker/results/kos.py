"""Key Object Selection document flagging the key slices, so viewers can jump to them."""
from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ichnode.common.analysis import Findings
from ichnode.common.vocabulary import DISCLAIMER
from worker.detector import DetectorOutput
from worker.findings import key_slice_indices
from worker.results.codes import MANUFACTURER
from worker.results.identity import object_identity
from worker.results.sources import distinct
from worker.results.uids import ResultUIDs

SERIES_NUMBER = 9903


def build_kos(
    sources: list[Dataset], output: DetectorOutput, findings: Findings, uids: ResultUIDs
) -> Dataset:
    key_images = distinct([sources[i] for i in key_slice_indices(output)])
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device(), name=output.model_name, manufacturer_name=MANUFACTURER
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,  # (113000, DCM), CID 7010
        referenced_objects=key_images,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        ),
        description=f"Slices with the highest ICH scores ({DISCLAIMER})",
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=key_images,
        content=content,
        **object_identity(uids, output, "kos", SERIES_NUMBER, f"AI ICH key slices - {DISCLAIMER}"),
    )
