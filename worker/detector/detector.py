"""`EnsembleDetector`: the :class:`worker.detector.Detector` the node runs."""
from __future__ import annotations

import numpy as np
import torch

from ichnode.common.vocabulary import LABELS, SUBTYPES
from worker.detector.interface import DetectorOutput
from worker.detector.ensemble import (
    DIFFICULT_RANGE,
    SCAN_MEMBERS,
    Ensemble,
    MemberOutputs,
    Timer,
    describe_windows,
    heatmap,
    subtype_maps,
    to_numpy,
)
from worker.detector.preprocess import Prepared
from worker.geometry import Volume


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


class EnsembleDetector:
    """Holds the weights (loaded once) and turns a Volume into a DetectorOutput."""

    def __init__(self, ensemble: Ensemble, manifest: dict, device: torch.device) -> None:
        self.ensemble = ensemble
        self.manifest = manifest
        self.device = device
        self.name = str(manifest["name"])
        self.version = str(manifest["version"])

    def detect(self, volume: Volume, timings: dict[str, float] | None = None, brain_window_only: bool = False) -> DetectorOutput:
        """Analyse one volume; `timings`, when given, receives seconds per step and member.

        brain_window_only: the volume's HU were clipped to the brain window (RSNA PNG slices)."""
        cfg = self.ensemble.cfg
        timer = Timer(timings, self.device)
        with timer("preprocess"):
            prepared = cfg.prepare(volume.hu, volume.spacing_mm[0], brain_window_only)
            images = prepared.images.to(self.device)
        out = self.ensemble.run_members(images, timings)
        with timer("fusion_and_mapping"):
            return self._output(volume, prepared, out)

    def _output(self, volume: Volume, prepared: Prepared, out: MemberOutputs) -> DetectorOutput:
        cfg = self.ensemble.cfg
        crop, inside = prepared.crop, prepared.inside  # heatmaps and masks are zero outside `inside`
        member_logits = self.ensemble.scan_member_logits(out, prepared.inside_working)
        probs = to_numpy(self.ensemble.combiner(member_logits))
        slice_probs = self.ensemble.slice_probabilities(out)

        heat = to_numpy(crop.to_volume(heatmap(out, slice_probs[:, 0]).cpu()).clamp(0.0, 1.0)) * inside
        masks: dict[str, np.ndarray] = {}
        for name, soft in zip(SUBTYPES, subtype_maps(out)):
            masks[name] = (to_numpy(crop.to_volume(soft.cpu())) >= cfg.mask_threshold) & inside
        any_mask = np.logical_or.reduce(list(masks.values()))
        voxel_ml = volume.voxel_volume_ml
        volumes = {"any": float(any_mask.sum() * voxel_ml)}
        volumes.update({name: float(m.sum() * voxel_ml) for name, m in masks.items()})

        member_probs = torch.sigmoid(member_logits)  # (6, members)
        member_outputs = {
            member: {label: float(member_probs[k, j]) for k, label in enumerate(LABELS)}
            for j, member in enumerate(SCAN_MEMBERS)
        }
        member_outputs["attention_mil"]["top_attention_slice"] = float(out.attention.argmax())
        p_any = float(probs[0])
        return DetectorOutput(
            probabilities={label: float(p) for label, p in zip(LABELS, probs)},
            slice_scores=to_numpy(slice_probs[:, 0]),
            slice_probabilities=to_numpy(slice_probs),
            heatmaps=heat.astype(np.float32),
            masks=masks,
            volumes_ml=volumes,
            difficult=DIFFICULT_RANGE[0] <= p_any <= DIFFICULT_RANGE[1],
            model_name=self.name,
            model_version=self.version,
            member_outputs=member_outputs,
            parameters={
                "windows_hu": describe_windows(),
                "working_size": str(cfg.working_size),
                "head_crop": f"top={crop.top},left={crop.left},side={crop.side}",
                "members": "slice ResNeXt CNN + PCA/BiLSTM; attention MIL; U-Nets "
                "(all-ICH, SDH, SAH, small lesion; each slice averaged with its mirror image) + pixel weight fusion",
                "combiner": "per-label Platt calibration of the weighted mean logit of "
                + ", ".join(f"{m} {w:.2f}" for m, w in zip(SCAN_MEMBERS, self.ensemble.combiner.member_weights())),
                "mask_threshold": f"{cfg.mask_threshold:g}",
                "difficult_range": f"{DIFFICULT_RANGE[0]:g}-{DIFFICULT_RANGE[1]:g}",
                "device": self.device.type,
            },
        )
