"""Comprehensive 3D SR with a TID 1500 Measurement Report of the detector's findings.

Comprehensive 3D SR is the SOP class IHE AIR names for TID 1500 results; it also allows the
TID 1411 groups that reference the SEG's segments. Content (docs/CONFORMANCE.md has the tree):

* one measurement group per label ("any" ICH and each subtype): finding type, presence
  (present/absent), probability, volume in mL when segmented, the key slices as the images the
  probability was derived from, the algorithm (TID 4019); subtypes with a segment use TID 1411
  and reference it, the others TID 1501;
* one "Worklist triage" group: priority level, score and rationale, the difficult-case flag
  and the not-for-diagnostic-use statement.

Every source instance of the series is listed as evidence.
"""
from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import worker.results.codes as rc
from ichnode.common.analysis import Findings
from ichnode.common.vocabulary import DISCLAIMER, LABELS
from worker.detector import DetectorOutput
from worker.findings import key_slice_indices
from worker.geometry import Volume
from worker.results.identity import object_identity, sr_algorithm
from worker.results.seg import segmented_subtypes
from worker.results.sources import distinct, slice_source
from worker.results.uids import ResultUIDs

SERIES_NUMBER = 9902
#: A finding is reported present at or above this probability: the detector's calibrated
#: operating point, in the middle of its "difficult" band (0.40-0.60).
PRESENCE_THRESHOLD = 0.5


def build_sr(
    sources: list[Dataset],
    volume: Volume,
    output: DetectorOutput,
    findings: Findings,
    uids: ResultUIDs,
    seg: Dataset | None,
) -> Dataset:
    algorithm = sr_algorithm(output)
    segments = _referenced_segments(seg, output, findings)
    groups = []
    for label in LABELS:
        images = [
            hd.sr.SourceImageForMeasurement.from_source_image(*slice_source(sources, volume, index))
            for index in _key_slices(label, output, findings)
        ]
        groups.append(_finding_group(label, findings, uids, algorithm, images, segments.get(label)))
    groups.append(_triage_group(findings, uids, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(output, uids),
        procedure_reported=codes.SCT.ComputedTomographyOfHead,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    evidence = distinct(sources) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        **object_identity(uids, output, "sr", SERIES_NUMBER, f"AI ICH triage report - {DISCLAIMER}"),
        is_complete=True,
        coding_schemes=rc.CODING_SCHEMES,
    )


def _observation_context(output: DetectorOutput, uids: ResultUIDs) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device(),
        name=output.model_name,
        manufacturer_name=rc.MANUFACTURER,
        model_name=f"{output.model_name} {output.model_version}",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _key_slices(label: str, output: DetectorOutput, findings: Findings) -> list[int]:
    """The slices that illustrate a label: the study's key slices for "any", else the
    subtype's highest-scoring slice when the subtype is present."""
    if label == "any":
        return key_slice_indices(output)
    if findings.probabilities[label] < PRESENCE_THRESHOLD:
        return []
    return [int(np.argmax(output.slice_probabilities[:, LABELS.index(label)]))]


def _referenced_segments(
    seg: Dataset | None, output: DetectorOutput, findings: Findings
) -> dict[str, hd.sr.ReferencedSegment]:
    """Subtype -> its segment in the SEG (none when no SEG was made)."""
    if seg is None:
        return {}
    return {
        subtype: hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=number,
            source_series=hd.sr.SourceSeriesForSegmentation(findings.series_instance_uid),
        )
        for number, subtype in enumerate(segmented_subtypes(output), start=1)
    }


def _finding_group(
    label: str,
    findings: Findings,
    uids: ResultUIDs,
    algorithm: hd.sr.AlgorithmIdentification,
    images: list[hd.sr.SourceImageForMeasurement],
    segment: hd.sr.ReferencedSegment | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1501 group for a label, TID 1411 (referencing its segment) when it was segmented."""
    finding = rc.FINDINGS[label]
    probability = float(findings.probabilities[label])
    measurements = [
        hd.sr.Measurement(
            name=rc.PROBABILITY,
            value=probability,
            unit=rc.UNIT_PROBABILITY,
            referenced_images=images or None,
        )
    ]
    if label in findings.volumes_ml:
        volume = float(findings.volumes_ml[label])
        measurements.append(hd.sr.Measurement(name=rc.VOLUME, value=volume, unit=rc.UNIT_ML))
    presence = rc.PRESENT if probability >= PRESENCE_THRESHOLD else rc.ABSENT
    common = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking(label), identifier=f"{label} {finding.meaning}"
        ),
        finding_type=finding,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=presence)],
    )
    if segment is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common)


def _triage_group(
    findings: Findings, uids: ResultUIDs, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    priority = findings.priority
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking("triage"), identifier="Worklist triage"
        ),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=rc.PRIORITY_SCORE, value=float(priority.score), unit=rc.UNIT_NONE)
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=rc.PRIORITY, value=rc.PRIORITY_LEVELS[priority.level]),
            hd.sr.QualitativeEvaluation(name=rc.DIFFICULT, value=rc.YES if findings.difficult else rc.NO),
        ],
    )
    # TID 1501 allows TEXT qualitative evaluations; highdicom builds only coded ones.
    container = group[0]
    for name, text in ((rc.PRIORITY_RATIONALE, priority.rationale), (rc.COMMENT, DISCLAIMER)):
        container.ContentSequence.append(
            hd.sr.TextContentItem(name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        )
    return group

