"""DICOM Segmentation (BINARY) of the hemorrhage, one segment per subtype the detector segmented.

Only subtypes with a non-empty mask get a segment; when every mask is empty no SEG is made
(a Segmentation must have at least one segment, and an empty one would suggest a finding).
Frames without any segmented pixel are omitted; every remaining frame references the source
instance (and frame) it was derived from and carries its own plane position, so viewers place
segments by geometry, never by frame order.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ichnode.common.vocabulary import DISCLAIMER, SUBTYPES
from worker.detector import DetectorOutput
from worker.geometry import Volume
from worker.results.codes import CODING_SCHEMES, FINDINGS
from worker.results.identity import object_identity, seg_algorithm
from worker.results.sources import in_source_order
from worker.results.uids import ResultUIDs

SERIES_NUMBER = 9901
#: Display colours (sRGB) per subtype, distinct on a grey CT background.
COLOURS = {
    "EDH": (255, 128, 0),
    "IPH": (255, 0, 0),
    "IVH": (0, 160, 255),
    "SAH": (255, 255, 0),
    "SDH": (255, 0, 255),
}


def segmented_subtypes(output: DetectorOutput) -> list[str]:
    """Subtypes that get a segment, in segment-number order (segment n is element n-1)."""
    return [s for s in SUBTYPES if s in output.masks and bool(np.any(output.masks[s]))]


def build_seg(
    sources: list[Dataset], volume: Volume, output: DetectorOutput, uids: ResultUIDs
) -> Dataset | None:
    subtypes = segmented_subtypes(output)
    if not subtypes:
        return None
    algorithm = seg_algorithm(output)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{subtype} {FINDINGS[subtype].meaning}"[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=FINDINGS[subtype],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=uids.tracking(subtype),
            tracking_id=subtype,
            display_color=hd.color.CIELabColor.from_rgb(*COLOURS[subtype]),
        )
        for number, subtype in enumerate(subtypes, start=1)
    ]
    masks = np.stack([output.masks[s] for s in subtypes], axis=-1)
    images, frames = in_source_order(sources, volume, masks)
    seg = hd.seg.Segmentation(
        source_images=images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        **object_identity(uids, output, "seg", SERIES_NUMBER, f"AI ICH segmentation - {DISCLAIMER}"),
        device_serial_number=uids.device(),
        content_label="ICHTRIAGE",
        content_description=f"ICH segmentation, {DISCLAIMER}"[:64],
        omit_empty_frames=True,
        coding_schemes=CODING_SCHEMES,
    )
    return seg
