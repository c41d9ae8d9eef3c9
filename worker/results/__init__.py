"""DICOM result objects for one analysed series, following IHE Radiology AI Results (AIR).

For a series the worker sends: a Segmentation of the hemorrhage (when anything was segmented),
a Comprehensive 3D SR measurement report, a Key Object Selection of the key slices and one
heatmap Secondary Capture per key slice. docs/CONFORMANCE.md describes them.
"""
from __future__ import annotations

import pydicom

from ichnode.common.analysis import Findings
from worker.detector import DetectorOutput
from worker.geometry import Volume
from worker.results.kos import build_kos
from worker.results.sc import build_scs
from worker.results.seg import build_seg
from worker.results.sources import conformant
from worker.results.sr import build_sr
from worker.results.uids import ResultUIDs


def build_results(
    sources: list[pydicom.Dataset], volume: Volume, output: DetectorOutput, findings: Findings
) -> list[pydicom.Dataset]:
    """All result datasets; records each one's SOP Instance UID in ``findings.result_uids``.

    ``sources`` are the series' instances in volume order (``sources[i]`` is
    ``volume.slices[i]``).
    """
    if len(sources) != len(volume.slices):
        raise ValueError(f"{len(sources)} sources for {len(volume.slices)} volume slices")
    sources = [conformant(ds, volume.spacing_mm[0]) for ds in sources]
    uids = ResultUIDs(findings.series_instance_uid, output.model_name, output.model_version)
    results: dict[str, pydicom.Dataset] = {}
    seg = build_seg(sources, volume, output, uids)
    if seg is not None:
        results["seg"] = seg
    results["sr"] = build_sr(sources, volume, output, findings, uids, seg)
    results["kos"] = build_kos(sources, output, findings, uids)
    for rank, sc in enumerate(build_scs(sources, volume, output, findings, uids), start=1):
        results[f"sc:{rank}"] = sc
    findings.result_uids.update({kind: ds.SOPInstanceUID for kind, ds in results.items()})
    return list(results.values())
