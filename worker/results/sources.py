"""Map volume slices back to the source instances (and frames, for Enhanced CT) they came from."""
from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

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
