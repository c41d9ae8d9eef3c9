"""Who made the results: the algorithm (TID 4019 / Algorithm Identification) and the equipment."""
from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes

from ichnode.common.uids import NODE_VERSION
from ichnode.common.vocabulary import DISCLAIMER
from worker.detector import DetectorOutput
from worker.results.codes import MANUFACTURER


def parameters(output: DetectorOutput) -> dict[str, str]:
    return {str(k): str(v) for k, v in sorted(output.parameters.items())}


def sr_algorithm(output: DetectorOutput) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for SR content."""
    params = [f"{k}={v}" for k, v in parameters(output).items()]
    return hd.sr.AlgorithmIdentification(
        name=output.model_name, version=output.model_version, parameters=params or None
    )


def seg_algorithm(output: DetectorOutput) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=output.model_name,
        family=codes.DCM.ArtificialIntelligence,
        version=output.model_version,
        source=MANUFACTURER,
        parameters=parameters(output) or None,
    )


def software_versions(output: DetectorOutput) -> list[str]:
    return [f"ichnode {NODE_VERSION}", f"{output.model_name} {output.model_version}"]


def contributing_equipment(output: DetectorOutput) -> list[hd.ContributingEquipment]:
    return [
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=output.model_name,
            software_versions=software_versions(output),
            contribution_description=f"Automated intracranial hemorrhage triage; {DISCLAIMER}",
        )
    ]


def object_identity(uids, output: DetectorOutput, kind: str, series_number: int, series_description: str,
                    instance: str | None = None, instance_number: int = 1) -> dict:
    """The constructor arguments every result object shares: its UIDs and numbers, who made it."""
    return {
        "series_instance_uid": uids.series(kind),
        "series_number": series_number,
        "sop_instance_uid": uids.instance(instance or kind),
        "instance_number": instance_number,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": output.model_name,
        "software_versions": software_versions(output),
        "contributing_equipment": contributing_equipment(output),
        "series_description": series_description[:64],
    }
