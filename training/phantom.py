"""Synthetic head CT studies with voxel ground truth (phantoms), for tests and for training.

A phantom is drawn entirely from its seed: anatomy (head size, scalp, skull, grey and white matter,
sulci, ventricles, cisterns, falx, skull base and sinuses), acquisition (vendor header profile,
matrix, slice thickness, gantry tilt, head position and rotation, noise) and findings (the five
hemorrhage subtypes, each with its typical shape and place). The head is rendered as an implicit
model on a reduced in-plane grid with several samples through each slice's thickness, averaged
(partial volume), upsampled bilinearly to the matrix, and noise is added. Masks are the voxels
whose blood fraction of one subtype is at least one half, so they line up with the HU voxels.

Coordinates: DICOM patient coordinates (LPS: +x patient left, +y posterior, +z superior). Head
coordinates (u, v, w) are the same axes rotated with the head and centred in it.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from ichnode.common.vocabulary import LABELS, SUBTYPES
from training.dicom_series import ct_series_datasets

#: Transfer syntaxes make_study can write. JPEG Lossless SV1 has no encoder in pydicom 3, so it
#: is refused with a clear error rather than silently written as something else.
ENCODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)
UNENCODABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (JPEGLosslessSV1,)

AIR_HU = -1000.0
PADDED_HU = -1024.0  # what `hu` holds where the stored pixel is the PixelPaddingValue
MAX_RENDER_GRID = 192  # in-plane size the head is modelled at before upsampling to the matrix
SLICE_THICKNESSES = (0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 4.0, 5.0)


@dataclass(frozen=True)
class Vendor:
    manufacturer: str
    model: str
    kernel: str
    signed: bool
    bits_stored: int
    intercept: float
    padding: int | None  # stored PixelPaddingValue written outside the reconstruction circle


VENDORS: tuple[Vendor, ...] = (
    Vendor("SIEMENS", "SOMATOM Definition AS+", "H30s", False, 12, -1024.0, None),
    Vendor("GE MEDICAL SYSTEMS", "LightSpeed VCT", "STANDARD", True, 16, -1024.0, -2000),
    Vendor("TOSHIBA", "Aquilion ONE", "FC21", True, 16, 0.0, -2048),
    Vendor("Philips", "Brilliance 64", "UB", False, 12, -1024.0, None),
)


@dataclass(frozen=True)
class Anatomy:
    a: float  # head half-axes in mm: left-right, antero-posterior, centre to vertex
    b: float
    c: float
    scalp: float  # thicknesses in mm
    skull: float
    extra_axial_csf: float
    sulcal_depth: float
    ventricle_scale: float
    grey: float  # tissue HU
    white: float
    csf: float
    bone: float
    waves: tuple[tuple[float, float, float, float], ...]  # (kx, ky, kz, phase): the gyral pattern
    pineal_hu: float  # 0 when not calcified


@dataclass(frozen=True)
class Acquisition:
    matrix: int
    n_slices: int
    thickness: float
    pixel_spacing: float
    tilt_deg: float
    yaw_deg: float
    pitch_deg: float
    head_offset: tuple[float, float]  # head centre in the axial plane, mm from the isocentre
    top_margin: float  # mm of air above the vertex in the top slice (when coverage allows)
    vendor: int
    noise_sd: float
    cranial_first_numbering: bool
    when: str  # study date and time, YYYYmmddHHMMSS


@dataclass(frozen=True)
class Lesion:
    """One planned hemorrhage. `where` is in head coordinates normalised by the head half-axes."""

    subtype: str
    side: str  # left, right or bilateral
    location: str  # lobe or structure, as a radiologist would name it
    hu: float
    where: tuple[float, float, float]
    thickness_mm: float = 0.0  # EDH, SDH: maximal thickness; IPH: largest diameter
    extent_mm: float = 0.0  # EDH, SDH: half-extent along the convexity; SAH: radius of the region
    radii_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # IPH
    edema_mm: float = 0.0  # IPH
    pattern: str = ""  # IVH: layering or cast; SAH: convexity, sylvian or basal
    planned_ml: float = 0.0


@dataclass
class PhantomStudy:
    datasets: list[pydicom.Dataset]  # one CT series, in volume order
    hu: np.ndarray  # float32 (slices, rows, cols), ascending along the slice normal
    masks: dict[str, np.ndarray]  # subtype -> bool, same shape as hu
    truth: dict
    report: str


# --------------------------------------------------------------------------------------------
# Drawing the parameters


def _rng(seed: int, stream: int) -> np.random.Generator:
    """Independent streams per concern, so e.g. the findings do not depend on the matrix."""
    return np.random.default_rng([seed, stream])


def _draw_anatomy(seed: int) -> Anatomy:
    rng = _rng(seed, 1)
    waves = []
    for _ in range(4):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * math.pi / rng.uniform(20.0, 30.0)
        waves.append((*(k * direction), rng.uniform(0, 2 * math.pi)))
    atrophy = rng.uniform(0.0, 1.0)
    return Anatomy(
        a=rng.uniform(66, 76),
        b=rng.uniform(84, 98),
        c=rng.uniform(70, 80),
        scalp=rng.uniform(4, 7),
        skull=rng.uniform(5, 9),
        extra_axial_csf=0.8 + 2.2 * atrophy,
        sulcal_depth=9 + 8 * atrophy,
        ventricle_scale=0.8 + 0.7 * atrophy + rng.uniform(-0.1, 0.1),
        grey=rng.uniform(35, 40),
        white=rng.uniform(25, 30),
        csf=rng.uniform(0, 10),
        bone=rng.uniform(1100, 1500),
        waves=tuple(tuple(float(x) for x in w) for w in waves),
        pineal_hu=float(rng.uniform(150, 400)) if rng.random() < 0.5 else 0.0,
    )


def _snap_thickness(mm: float) -> float:
    return min(SLICE_THICKNESSES, key=lambda t: abs(t - mm))


def _draw_acquisition(
    seed: int, matrix: int, n_slices: int | None, thickness: float | None
) -> Acquisition:
    rng = _rng(seed, 2)
    coverage = rng.uniform(120, 160)
    if thickness is None:
        if n_slices is None:
            thickness = float(rng.choice(SLICE_THICKNESSES, p=[0.08, 0.06, 0.08, 0.06, 0.12, 0.1, 0.1, 0.4]))
        else:
            thickness = _snap_thickness(coverage / n_slices)
    if n_slices is None:
        n_slices = max(1, int(round(coverage / thickness)))
    fov = rng.uniform(220, 250)
    start = datetime(2024, 1, 1) + timedelta(minutes=int(rng.integers(0, 2 * 365 * 24 * 60)))
    return Acquisition(
        matrix=matrix,
        n_slices=n_slices,
        thickness=float(thickness),
        pixel_spacing=round(fov / matrix, 6),
        tilt_deg=float(round(rng.uniform(8, 25), 1)) if rng.random() < 0.3 else 0.0,
        yaw_deg=rng.uniform(-12, 12),
        pitch_deg=rng.uniform(-8, 8),
        head_offset=(rng.uniform(-8, 8), rng.uniform(-8, 8)),
        top_margin=rng.uniform(0, 10),
        vendor=int(rng.integers(len(VENDORS))),
        noise_sd=rng.uniform(3, 8),
        cranial_first_numbering=bool(rng.random() < 0.4),
        when=start.strftime("%Y%m%d%H%M%S"),
    )


_LOBES = {  # direction of the lobe's convexity for the left side (+u), normalised head coords
    "frontal": (0.55, -0.75, 0.35),
    "frontoparietal": (0.65, -0.3, 0.65),
    "parietal": (0.6, 0.15, 0.75),
    "temporal": (0.92, -0.2, -0.15),
    "occipital": (0.45, 0.85, 0.25),
}
_IPH_SITES = {  # centre for the left side, normalised head coords
    "basal ganglia": (0.27, -0.05, 0.08),
    "thalamus": (0.14, 0.1, 0.08),
    "frontal lobe": (0.35, -0.55, 0.35),
    "parietal lobe": (0.4, 0.15, 0.5),
    "temporal lobe": (0.6, -0.15, -0.05),
    "occipital lobe": (0.3, 0.65, 0.25),
}


def _unit(x) -> tuple[float, float, float]:
    x = np.asarray(x, dtype=float)
    return tuple(float(v) for v in x / np.linalg.norm(x))


def _draw_lesion(subtype: str, rng: np.random.Generator) -> Lesion:
    side = str(rng.choice(["left", "right"]))
    sign = 1.0 if side == "left" else -1.0
    hu = float(rng.uniform(55, 85))
    if subtype in ("EDH", "SDH"):
        lobe = str(rng.choice(list(_LOBES) if subtype == "SDH" else ["frontal", "parietal", "temporal", "occipital"]))
        d = np.array(_LOBES[lobe]) + rng.normal(0, 0.08, 3)
        d[0] = sign * abs(d[0])
        if subtype == "EDH":
            thickness = float(np.exp(rng.uniform(np.log(4), np.log(28))))
            extent = float(rng.uniform(18, 42))
            ml = math.pi * extent**2 * thickness / 2 / 1000
        else:
            thickness = float(np.exp(rng.uniform(np.log(2), np.log(16))))
            extent = float(rng.uniform(25, 65))
            ml = 2 * math.pi * thickness * extent**2 / 3 / 1000
        return Lesion(subtype, side, lobe, hu, _unit(d), thickness_mm=thickness, extent_mm=extent, planned_ml=ml)
    if subtype == "IPH":
        site = str(rng.choice(list(_IPH_SITES)))
        centre = np.array(_IPH_SITES[site]) + rng.normal(0, 0.04, 3)
        centre[0] = sign * abs(centre[0])
        mean_r = float(np.exp(rng.uniform(np.log(5), np.log(25))))
        if site in ("thalamus", "basal ganglia"):
            mean_r = min(mean_r, 18.0)
        radii = tuple(float(mean_r * f) for f in rng.uniform(0.75, 1.3, 3))
        ml = 4 / 3 * math.pi * np.prod(radii) / 1000
        return Lesion(subtype, side, site, hu, tuple(float(x) for x in centre), thickness_mm=2 * max(radii),
                      radii_mm=radii, edema_mm=float(rng.uniform(2, 6)), planned_ml=float(ml))
    if subtype == "IVH":
        pattern = str(rng.choice(["layering", "cast"], p=[0.75, 0.25]))
        side = str(rng.choice(["left", "right", "bilateral"], p=[0.25, 0.25, 0.5]))
        level = float(rng.uniform(0.0, 0.22))  # fraction of b behind the ventricles' centre
        return Lesion(subtype, side, "lateral ventricles", hu, (0.0, level, 0.0), pattern=pattern)
    if subtype == "SAH":
        pattern = str(rng.choice(["convexity", "sylvian", "basal"], p=[0.5, 0.25, 0.25]))
        hu = float(rng.uniform(50, 70))
        if pattern == "basal":
            return Lesion(subtype, "bilateral", "basal cisterns", hu, (0.0, 0.0, -0.17),
                          extent_mm=float(rng.uniform(15, 30)), pattern=pattern)
        if pattern == "sylvian":
            where = (sign * 0.55, -0.2, -0.08)
            return Lesion(subtype, side, "sylvian fissure", hu, where, extent_mm=float(rng.uniform(14, 28)),
                          pattern=pattern)
        lobe = str(rng.choice(["frontal", "frontoparietal", "parietal", "occipital"]))
        d = np.array(_LOBES[lobe]) + rng.normal(0, 0.1, 3)
        d[0] = sign * abs(d[0])
        return Lesion(subtype, side, lobe, hu, _unit(d), extent_mm=float(rng.uniform(14, 32)), pattern=pattern)
    raise ValueError(f"unknown subtype {subtype!r}")


def make_findings(seed: int, *, positive: bool | None = None, subtypes: Sequence[str] | None = None) -> dict:
    """The planned findings of a study (no pixels): what make_report needs, cheap to draw.

    Keys: positive, subtypes, lesions (Lesion fields as dicts), midline_shift_mm, seed.
    """
    rng = _rng(seed, 3)
    if subtypes is not None:
        unknown = set(subtypes) - set(SUBTYPES)
        if unknown:
            raise ValueError(f"unknown subtypes {sorted(unknown)}; expected some of {SUBTYPES}")
        chosen = [s for s in SUBTYPES if s in subtypes]
        if positive is False and chosen:
            raise ValueError("positive=False contradicts the subtypes given")
    else:
        if positive is None:
            positive = bool(rng.random() < 0.5)
        chosen = []
        if positive:
            k = int(rng.choice([1, 1, 1, 2, 2, 3]))
            weights = np.array([0.12, 0.28, 0.15, 0.2, 0.25])
            chosen = sorted((str(x) for x in rng.choice(SUBTYPES, size=k, replace=False, p=weights)), key=SUBTYPES.index)
    lesions = [_draw_lesion(s, rng) for s in chosen]
    mass = {"left": 0.0, "right": 0.0}
    for lesion in lesions:
        if lesion.subtype in ("EDH", "SDH", "IPH"):
            mass[lesion.side] += lesion.planned_ml
    side = max(mass, key=mass.get)
    shift = float(np.clip((mass[side] - 30) / 8, 0, 12))
    return {
        "seed": seed,
        "positive": bool(lesions),
        "subtypes": [l.subtype for l in lesions],
        "lesions": [asdict(l) for l in lesions],
        "midline_shift_mm": round(shift, 1),
        "midline_shift_toward": ("right" if side == "left" else "left") if shift > 0 else None,
    }


# --------------------------------------------------------------------------------------------
# Rendering


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Head -> patient rotation: in-plane rotation (about z) after a nod (about x)."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    rz = np.array([[math.cos(y), -math.sin(y), 0], [math.sin(y), math.cos(y), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    return rz @ rx


@dataclass(frozen=True)
class _Geometry:
    """Patient-space geometry of the series."""

    row_dir: np.ndarray  # ImageOrientationPatient row cosines (along a row: column index)
    col_dir: np.ndarray
    normal: np.ndarray
    positions: np.ndarray  # (slices, 3) ImagePositionPatient
    head_centre: np.ndarray
    rotation: np.ndarray
    spacing: float  # along the normal


def _lesion_height(lesion: Lesion, anat: Anatomy) -> float:
    """Approximate height (head w, mm) of a lesion's centre."""
    if lesion.subtype == "IVH":
        return 0.15 * anat.c
    scale = 0.85 if lesion.subtype in ("EDH", "SDH") or lesion.pattern == "convexity" else 1.0
    return lesion.where[2] * anat.c * scale


def _geometry(anat: Anatomy, acq: Acquisition, lesions: Sequence[Lesion]) -> _Geometry:
    t = math.radians(acq.tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, math.cos(t), -math.sin(t)])  # tilted plane: anterior rows higher
    normal = np.cross(row_dir, col_dir)
    table_step = acq.thickness / math.cos(t)  # the table moves along z; slices sheared by the tilt
    coverage = (acq.n_slices - 1) * acq.thickness
    wanted = anat.c + acq.top_margin + 0.65 * anat.c  # vertex down to the skull base
    if coverage >= wanted:
        top = anat.c + acq.top_margin
    else:  # short coverage: centre it on the findings, or on the cerebrum
        focus = float(np.mean([_lesion_height(l, anat) for l in lesions])) if lesions else 0.2 * anat.c
        top = min(focus + coverage / 2, anat.c + acq.top_margin)
    z0 = top - coverage / math.cos(t)  # the top slice crosses the isocentre at z = top
    half = (acq.matrix - 1) / 2 * acq.pixel_spacing
    centres = np.zeros((acq.n_slices, 3))
    centres[:, 2] = z0 + np.arange(acq.n_slices) * table_step
    positions = centres - half * row_dir - half * col_dir
    return _Geometry(
        row_dir=row_dir,
        col_dir=col_dir,
        normal=normal,
        positions=positions,
        head_centre=np.array([acq.head_offset[0], acq.head_offset[1], 0.0]),
        rotation=_rotation(acq.yaw_deg, acq.pitch_deg),
        spacing=acq.thickness,
    )


def _ellipsoid(u, v, w, centre, radii) -> np.ndarray:
    """Squared normalised distance from an axis-aligned ellipsoid's centre (< 1 inside)."""
    return ((u - centre[0]) / radii[0]) ** 2 + ((v - centre[1]) / radii[1]) ** 2 + ((w - centre[2]) / radii[2]) ** 2


class _Painter:
    """Paints HU and blood-subtype codes at the sample points, later structures over earlier ones."""

    def __init__(self, shape) -> None:
        self.hu = np.full(shape, AIR_HU, dtype=np.float32)
        self.code = np.zeros(shape, dtype=np.uint8)  # 0 = not blood, else 1 + SUBTYPES index

    def paint(self, where: np.ndarray, hu, subtype: str | None = None) -> None:
        self.hu[where] = hu[where] if isinstance(hu, np.ndarray) else hu
        self.code[where] = 0 if subtype is None else 1 + SUBTYPES.index(subtype)


def _render(anat: Anatomy, acq: Acquisition, geo: _Geometry, lesions: Sequence[Lesion], shift_mm: float, grid: int):
    """Average HU and per-subtype blood fraction, (slices, grid, grid), before upsampling.

    shift_mm: midline shift, positive toward the patient's left.
    """
    n_sub = 1 if acq.thickness <= 1.25 else min(4, math.ceil(acq.thickness / 1.25))
    offsets = acq.thickness * ((np.arange(n_sub) + 0.5) / n_sub - 0.5)
    pixel = (np.arange(grid) + 0.5) * acq.matrix / grid - 0.5  # render pixel centres, in matrix pixels
    rot_t = geo.rotation.T
    # head coords = R^T (P - C), P = position_k + o n + col * dx row_dir + row * dy col_dir
    slice_pts = (geo.positions[:, None, :] + offsets[None, :, None] * geo.normal).reshape(-1, 3)
    slice_h = (slice_pts - geo.head_centre) @ rot_t.T  # (S, 3)
    row_h = rot_t @ geo.col_dir * acq.pixel_spacing  # per image row
    col_h = rot_t @ geo.row_dir * acq.pixel_spacing  # per image column
    u, v, w = (
        (slice_h[:, i, None, None] + pixel[None, :, None] * row_h[i] + pixel[None, None, :] * col_h[i]).astype(np.float32)
        for i in range(3)
    )
    shape = u.shape
    a, b, c = anat.a, anat.b, anat.c
    c_eff = np.where(w < 0, 1.5 * c, c).astype(np.float32)  # the face and neck below the centre
    un, vn, wn = u / a, v / b, w / c_eff
    rho = np.sqrt(un * un + vn * vn + wn * wn)
    r = np.sqrt(u * u + v * v + w * w)
    with np.errstate(divide="ignore", invalid="ignore"):
        depth = np.where(rho > 0, r * (1 / rho - 1), 1e3).astype(np.float32)  # below the skin, mm
    f = sum(np.cos(kx * u + ky * v + kz * w + ph) for kx, ky, kz, ph in anat.waves) / 2.0  # gyral field

    p = _Painter(shape)
    skull_local = anat.skull * (0.8 + 0.4 * vn * vn)
    inner = anat.scalp + skull_local
    depth_in = depth - inner  # below the inner table
    p.paint(depth >= 0, 40.0)
    p.paint((depth > 1.2) & (depth < 1.2 + 0.3 * anat.scalp), -90.0)  # subcutaneous fat
    in_skull = (depth >= anat.scalp) & (depth_in < 0)
    table = np.abs((depth - anat.scalp) / skull_local - 0.5) > 0.2
    p.paint(in_skull, np.where(table, anat.bone, 0.45 * anat.bone).astype(np.float32))

    lateral = np.abs(u) > 0.35 * a
    middle_fossa = 0.17 * c * np.exp(-(((np.abs(u) - 0.6 * a) / (0.25 * a)) ** 2) - ((vn + 0.15) / 0.3) ** 2)
    posterior_fossa = 0.34 * c * np.clip((vn - 0.35 * np.abs(un)) / 0.15, 0, 1)  # behind the petrous ridges
    floor = -0.28 * c - np.maximum(middle_fossa, posterior_fossa)  # floor of the cranial cavity
    inside = depth_in >= 0
    below = inside & (w <= floor)
    p.paint(below, 40.0)  # face and neck soft tissue below the skull base
    for sx in (1, -1):  # orbits: fat around the globes
        p.paint(below & (_ellipsoid(u, v, w, (sx * 0.36 * a, -0.8 * b, -0.42 * c), (16, 18, 14)) < 1), -80.0)
        p.paint(below & (_ellipsoid(u, v, w, (sx * 0.36 * a, -0.86 * b, -0.42 * c), (11, 11, 11)) < 1), 15.0)
    p.paint(below & (w > floor - 6), (750 + 350 * f).astype(np.float32))  # skull base
    for centre, radii in (
        ((0, -0.88 * b, -0.15 * c), (14, 7, 12)),  # frontal sinus
        ((0, -0.55 * b, -0.55 * c), (13, 16, 11)),  # ethmoid and sphenoid
        ((0.78 * a, 0.15 * b, -0.55 * c), (9, 9, 9)),  # mastoids
        ((-0.78 * a, 0.15 * b, -0.55 * c), (9, 9, 9)),
    ):
        p.paint((in_skull | below) & (_ellipsoid(u, v, w, centre, radii) < 1), -900.0)

    ic = inside & (w > floor)  # intracranial space
    p.paint(ic, anat.csf)
    ext = anat.extra_axial_csf
    brain = ic & (depth_in >= ext)
    cortex = depth_in < ext + 3.0
    gyral_grey = (np.abs(f) < 0.55) & (depth_in < ext + anat.sulcal_depth + 3.0)
    p.paint(brain, np.where(cortex | gyral_grey, anat.grey, anat.white).astype(np.float32))
    deep_grey = np.zeros(shape, dtype=bool)
    for sx in (1, -1):
        deep_grey |= _ellipsoid(u, v, w, (sx * 0.27 * a, -0.05 * b, 0.08 * c), (9, 16, 10)) < 1
        deep_grey |= _ellipsoid(u, v, w, (sx * 0.14 * a, 0.1 * b, 0.08 * c), (8, 12, 9)) < 1
    p.paint(brain & deep_grey, anat.grey - 1.0)
    p.paint(brain & (w < -0.3 * c), anat.grey - 3.0)  # cerebellum and brainstem

    findings = {l.subtype: l for l in lesions}
    um = u - shift_mm * np.exp(-(((w - 0.2 * c) / (0.5 * c)) ** 2))  # u seen from the shifted midline

    iph_core = np.zeros(shape, dtype=bool)
    if "IPH" in findings:
        l = findings["IPH"]
        centre = (l.where[0] * a, l.where[1] * b, l.where[2] * c)
        q = np.sqrt(_ellipsoid(u, v, w, centre, l.radii_mm)) + 0.06 * f  # a slightly irregular outline
        iph_core = brain & (q < 1)
        p.paint(brain & (q >= 1) & (q < 1 + l.edema_mm / np.mean(l.radii_mm)), anat.white - 10.0)
        p.paint(iph_core, (l.hu + 4 * f).astype(np.float32), "IPH")

    vs = anat.ventricle_scale
    ventricle = np.zeros(shape, dtype=bool)
    horn_width = 5.5 * vs * (1 + 0.6 * np.clip(v / b, 0, None))  # wider atria and occipital horns
    arch = w - 0.2 * c + 0.006 * v * v  # the bodies arch over the thalami
    for sx in (1, -1):
        ventricle |= ((um - sx * (6 * vs + 1.5)) / horn_width) ** 2 + (v / (0.36 * b)) ** 2 + (arch / (11 * vs)) ** 2 < 1
    ventricle |= _ellipsoid(um, v, w, (0, -0.03 * b, 0.02 * c), (1.5 * vs + 0.5, 0.17 * b, 10)) < 1  # third
    ventricle |= _ellipsoid(u, v, w, (0, 0.32 * b, -0.5 * c), (6, 4, 7)) < 1  # fourth
    midbrain = _ellipsoid(u, v, w, (0, 0.05 * b, -0.17 * c), (13, 12, 10)) < 1
    cistern = ((_ellipsoid(u, v, w, (0, 0.05 * b, -0.17 * c), (19, 18, 7)) < 1) & ~midbrain) | (
        _ellipsoid(u, v, w, (0, -0.14 * b, -0.19 * c), (11, 8, 6)) < 1
    )
    sulci = brain & (np.abs(f) < 0.15 + 0.06 * ext) & (depth_in < ext + anat.sulcal_depth)
    fissure = ic & (np.abs(um) < 1.6) & ((w > 0.3 * c) | (np.abs(v) > 0.5 * b))
    sylvian = ic & lateral & (np.abs(v - (-0.2 * b + 0.3 * (np.abs(u) - 0.35 * a))) < 1.8) & (w > -0.3 * c) & (w < 0.05 * c)
    sulcal_csf = ic & ((depth_in < ext) | sulci | fissure | sylvian | cistern)
    ventricle &= ic
    p.paint((sulcal_csf | ventricle) & ~iph_core, anat.csf)
    p.paint(fissure & (np.abs(um) < 0.6), 60.0)  # falx
    if anat.pineal_hu:
        p.paint(_ellipsoid(u, v, w, (0, 0.22 * b, 0.02 * c), (2.5, 2.5, 2.5)) < 1, anat.pineal_hu)

    if "SAH" in findings:
        l = findings["SAH"]
        if l.pattern == "convexity":
            centre = np.array(l.where) * (a, b, c) * (1 - (anat.scalp + anat.skull + ext + 6) / ((a + b + c) / 3))
        else:
            centre = np.array(l.where) * (a, b, c)
        region = (
            ((u - centre[0]) ** 2 + (v - centre[1]) ** 2 + (w - centre[2]) ** 2 < l.extent_mm**2)
            & sulcal_csf & ~ventricle & ~iph_core
        )
        p.paint(region, (l.hu + 4 * f).astype(np.float32), "SAH")
    if "IVH" in findings:
        l = findings["IVH"]
        filled = ventricle & ~iph_core
        if l.side != "bilateral":
            filled &= np.sign(um) == (1 if l.side == "left" else -1)
        if l.pattern == "layering":  # blood is dependent: posterior in a supine patient
            filled &= v > l.where[1] * b
        p.paint(filled, l.hu, "IVH")
    for subtype in ("SDH", "EDH"):
        if subtype not in findings:
            continue
        l = findings[subtype]
        e = np.array(l.where, dtype=np.float32)
        cos_angle = (un * e[0] + vn * e[1] + wn * e[2]) / np.maximum(rho, 1e-6)
        arc = np.arccos(np.clip(cos_angle, -1, 1)) * ((a + b + c) / 3)
        profile = np.clip(1 - (arc / l.extent_mm) ** 2, 0, None)
        if subtype == "SDH":
            profile = np.sqrt(profile)  # crescent: even thickness, tapering ends
        same_side = np.sign(um) == np.sign(e[0])  # neither crosses the midline (falx, sagittal suture)
        collection = ic & same_side & (depth_in < l.thickness_mm * profile) & (np.abs(um) > 1.0)
        p.paint(collection, (l.hu + 3 * f).astype(np.float32), subtype)

    n_slices = acq.n_slices
    hu = p.hu.reshape(n_slices, n_sub, *shape[1:]).mean(axis=1)
    fractions = {
        s: (p.code == 1 + i).reshape(n_slices, n_sub, *shape[1:]).mean(axis=1, dtype=np.float32)
        for i, s in enumerate(SUBTYPES)
        if s in findings
    }
    return hu, fractions


def _upsample(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x))[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def _noise(rng: np.random.Generator, shape, sd: float) -> np.ndarray:
    """Gaussian noise with some spatial correlation (half-resolution component), std ~ sd."""
    white = rng.standard_normal(shape, dtype=np.float32)
    coarse = _upsample(rng.standard_normal((shape[0], max(1, shape[1] // 2), max(1, shape[2] // 2)), dtype=np.float32), shape[1])
    return (sd * (0.6 * white + 0.8 * coarse / max(coarse.std(), 1e-6))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# DICOM


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=["ichnode-phantom", str(seed), *map(str, parts)])


def _datasets(stored: np.ndarray, acq: Acquisition, geo: _Geometry, uids: dict, patient_id: str,
              seed: int, transfer_syntax: str) -> list[Dataset]:
    """The series through the shared CT writer, with this phantom's vendor header profile."""
    vendor = VENDORS[acq.vendor]
    n = acq.n_slices
    header = {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "StudyDate": acq.when[:8], "SeriesDate": acq.when[:8], "AcquisitionDate": acq.when[:8],
        "ContentDate": acq.when[:8],
        "StudyTime": acq.when[8:], "SeriesTime": acq.when[8:], "AcquisitionTime": acq.when[8:],
        "ContentTime": acq.when[8:],
        "AccessionNumber": f"A{seed % 10**9:09d}",
        "Manufacturer": vendor.manufacturer,
        "ManufacturerModelName": vendor.model,
        "InstitutionName": "ichnode phantom",
        "StudyDescription": "CT HEAD WO CONTRAST",
        "SeriesDescription": f"Head {acq.thickness:g}mm",
        "PatientName": f"Phantom^{seed}",
        "PatientID": patient_id,
        "PatientSex": "O",
        "KVP": "120",
        "GantryDetectorTilt": f"{acq.tilt_deg:g}",
        "ConvolutionKernel": vendor.kernel,
        "PatientPosition": "HFS",
        "StudyID": uids["study_id"],
        "SeriesNumber": 2,
        "AcquisitionNumber": 1,
    }
    return ct_series_datasets(
        stored,
        positions=geo.positions,
        orientation=(*geo.row_dir, *geo.col_dir),
        pixel_spacing=(acq.pixel_spacing, acq.pixel_spacing),
        thickness=acq.thickness,
        spacing=geo.spacing,
        study_uid=uids["study"],
        series_uid=uids["series"],
        frame_of_reference_uid=uids["frame_of_reference"],
        instance_uids=uids["instances"],
        header=header,
        intercept=vendor.intercept,
        bits_stored=vendor.bits_stored,
        padding=vendor.padding,
        instance_numbers=[n - k if acq.cranial_first_numbering else k + 1 for k in range(n)],
        transfer_syntax=transfer_syntax,
    )


# --------------------------------------------------------------------------------------------
# Public API


def make_study(
    seed: int,
    *,
    positive: bool | None = None,
    subtypes: Sequence[str] | None = None,
    matrix: int = 512,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    transfer_syntax: str | None = None,
    study_uid: str | None = None,
    patient_id: str | None = None,
) -> PhantomStudy:
    """A synthetic head CT series with voxel masks, truth and report, all determined by `seed`."""
    transfer_syntax = transfer_syntax or ExplicitVRLittleEndian
    if transfer_syntax not in ENCODABLE_TRANSFER_SYNTAXES:
        why = "pydicom has no encoder for it" if transfer_syntax in UNENCODABLE_TRANSFER_SYNTAXES else "unsupported"
        raise ValueError(f"cannot encode transfer syntax {transfer_syntax} ({why}); use one of {ENCODABLE_TRANSFER_SYNTAXES}")
    anat = _draw_anatomy(seed)
    acq = _draw_acquisition(seed, matrix, n_slices, slice_thickness)
    findings = make_findings(seed, positive=positive, subtypes=subtypes)
    lesions = [Lesion(**{**d, "where": tuple(d["where"]), "radii_mm": tuple(d["radii_mm"])}) for d in findings["lesions"]]
    geo = _geometry(anat, acq, lesions)
    vendor = VENDORS[acq.vendor]

    grid = min(matrix, MAX_RENDER_GRID)
    shift = findings["midline_shift_mm"] * (1 if findings["midline_shift_toward"] == "left" else -1)
    coarse_hu, fractions = _render(anat, acq, geo, lesions, shift, grid)
    hu = _upsample(coarse_hu, matrix) + _noise(_rng(seed, 4), (acq.n_slices, matrix, matrix), acq.noise_sd)
    lo = vendor.intercept + (-(2 ** (vendor.bits_stored - 1)) if vendor.signed else 0)
    hi = vendor.intercept + (2 ** (vendor.bits_stored - 1) - 1 if vendor.signed else 2**vendor.bits_stored - 1)
    hu = np.clip(np.rint(hu), max(lo, PADDED_HU), hi).astype(np.float32)
    yy, xx = np.mgrid[:matrix, :matrix]
    outside_fov = (yy - (matrix - 1) / 2) ** 2 + (xx - (matrix - 1) / 2) ** 2 > (matrix / 2) ** 2
    hu[:, outside_fov] = PADDED_HU
    stored = (hu - vendor.intercept).astype(np.int16 if vendor.signed else np.uint16)
    if vendor.padding is not None:
        stored[:, outside_fov] = vendor.padding
    masks = {s: np.zeros(hu.shape, dtype=bool) for s in SUBTYPES}
    for s, fraction in fractions.items():
        masks[s] = _upsample(fraction, matrix) >= 0.5
        masks[s][:, outside_fov] = False

    uids = {
        "study": study_uid or _uid(seed, "study"),
        "study_id": f"PH{seed}"[:16],
    }
    uids["series"] = _uid(seed, uids["study"], "series")
    uids["frame_of_reference"] = _uid(seed, uids["study"], "frame")
    uids["instances"] = [_uid(seed, uids["study"], "instance", k) for k in range(acq.n_slices)]
    datasets = _datasets(stored, acq, geo, uids, patient_id or f"PH{seed:08d}", seed, transfer_syntax)

    voxel_ml = acq.pixel_spacing**2 * geo.spacing / 1000
    present = [s for s in SUBTYPES if masks[s].any()]
    union = np.logical_or.reduce([masks[s] for s in SUBTYPES])
    per_slice = np.stack([union.any(axis=(1, 2))] + [masks[s].any(axis=(1, 2)) for s in SUBTYPES], axis=1)
    findings["lesions"] = [l for l in findings["lesions"] if l["subtype"] in present]
    findings["subtypes"] = present
    findings["positive"] = bool(present)
    truth = {
        **findings,
        "study_instance_uid": uids["study"],
        "series_instance_uid": uids["series"],
        "study_id": uids["study_id"],
        "patient_id": datasets[0].PatientID,
        "labels": {"any": int(bool(present)), **{s: int(s in present) for s in SUBTYPES}},
        "volumes_ml": {"any": round(float(union.sum() * voxel_ml), 3),
                       **{s: round(float(masks[s].sum() * voxel_ml), 3) for s in SUBTYPES}},
        "slice_labels": per_slice.astype(int).tolist(),
        "label_columns": list(LABELS),
        "sop_instance_uids": uids["instances"],
        "transfer_syntax": transfer_syntax,
        "params": {"anatomy": asdict(anat), "acquisition": asdict(acq), "vendor": asdict(vendor),
                   "spacing_mm": [geo.spacing, acq.pixel_spacing, acq.pixel_spacing]},
    }
    return PhantomStudy(datasets=datasets, hu=hu, masks=masks, truth=truth, report=make_report(seed, truth))


def write_study(study: PhantomStudy, out_dir: Path) -> Path:
    """out_dir/<StudyID>/{dicom/<SOPInstanceUID>.dcm, masks.npz, truth.json, report.txt}."""
    folder = Path(out_dir) / study.truth["study_id"]
    dicom_dir = folder / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    for ds in study.datasets:
        ds.save_as(dicom_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    np.savez_compressed(folder / "masks.npz", **study.masks)
    (folder / "truth.json").write_text(json.dumps(study.truth, indent=1))
    (folder / "report.txt").write_text(study.report + "\n")
    return folder


def make_studies(seed: int, n: int, positive_fraction: float = 0.5, **kwargs) -> Iterator[PhantomStudy]:
    """n studies with seeds seed .. seed + n - 1, each positive with probability positive_fraction.

    Keyword arguments go to make_study (matrix, n_slices, ...).
    """
    chooser = _rng(seed, 5)
    for i in range(n):
        yield make_study(seed + i, positive=bool(chooser.random() < positive_fraction), **kwargs)


def phantom_main(out: Path, studies: int, seed: int, positive_fraction: float = 0.5, matrix: int = 512) -> None:
    """`ichnode phantom`: write the studies of make_studies and print each study folder."""
    for study in make_studies(seed, studies, positive_fraction, matrix=matrix):
        print(write_study(study, Path(out)))


# --------------------------------------------------------------------------------------------
# Reports


def _size_word(ml: float) -> str:
    return "small" if ml < 5 else ("moderate" if ml < 30 else "large")


def _lesion_sentence(l: dict, ml: float, rng: np.random.Generator) -> tuple[str, str]:
    """(findings sentence, impression phrase) for one lesion."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    size, side, where = _size_word(ml), l["side"], l["location"]
    if l["subtype"] == "EDH":
        name = pick(["epidural hematoma", "extradural haematoma", "epidural hemorrhage", "acute epidural hematoma"])
        shape = pick(["", " It is biconvex (lentiform) in configuration.", " The collection is lentiform and does not cross the sutures."])
        text = f"There is a {size} {side} {where} {name} measuring {l['thickness_mm']:.0f} mm in maximal thickness.{shape}"
        return text, f"{size.capitalize()} {side} {where} {name}."
    if l["subtype"] == "SDH":
        name = pick(["subdural hematoma", "subdural hemorrhage", "acute subdural hematoma", "SDH"])
        text = pick([
            f"{size.capitalize()} {side} {where} {name} measuring up to {l['thickness_mm']:.0f} mm in thickness.",
            f"A crescentic hyperdense extra-axial collection along the {side} {where} convexity, up to "
            f"{l['thickness_mm']:.0f} mm thick, is consistent with an acute {name}.",
            f"There is an acute {side} {where} {name} with maximal thickness of {l['thickness_mm']:.0f} mm.",
        ])
        return text, f"{side.capitalize()} {where} {name.removeprefix('acute ')}."
    if l["subtype"] == "SAH":
        name = pick(["subarachnoid hemorrhage", "subarachnoid blood", "acute subarachnoid hemorrhage", "SAH"])
        hedged = ml < 5 and rng.random() < 0.3
        amount = pick(["A small amount of", "Trace", "Scattered", "Some"]) if ml < 5 else pick(["Diffuse", "Extensive", "Moderate"])
        if l["pattern"] == "basal":
            place = "in the basal cisterns"
        elif l["pattern"] == "sylvian":
            place = f"in the {side} sylvian fissure"
        else:
            place = pick([f"within the {side} {where} sulci", f"along the {side} {where} convexity"])
        if hedged:
            return f"Possible trace {name} {place}.", f"Possible {name} {place}."
        return f"{amount} {name} {place}.", f"{name[0].upper() + name[1:]} {place}."
    if l["subtype"] == "IPH":
        name = pick(["intraparenchymal hemorrhage", "intracerebral hematoma", "parenchymal hematoma",
                     "intraparenchymal hematoma", "hemorrhagic contusion"])
        scale = (ml / l["planned_ml"]) ** (1 / 3) if l["planned_ml"] else 1.0  # as rendered, not as planned
        dims = sorted((2 * r * scale / 10 for r in l["radii_mm"]), reverse=True)
        edema = pick(["with surrounding vasogenic edema", "with a rim of perilesional edema", "with mild surrounding edema"])
        text = f"{size.capitalize()} {name} in the {side} {where} measuring {dims[0]:.1f} x {dims[1]:.1f} cm {edema}."
        return text, f"{side.capitalize()} {where} {name} ({ml:.0f} mL)."
    if l["subtype"] == "IVH":
        if l["pattern"] == "cast":
            text = pick(["Intraventricular hemorrhage fills the lateral ventricles.",
                         "Dense intraventricular blood casts the lateral ventricles."])
        else:
            place = "occipital horns" if side == "bilateral" else f"{side} occipital horn"
            text = pick([f"Intraventricular extension with blood layering in the {place}.",
                         f"Intraventricular hemorrhage layering dependently in the {place}.",
                         f"There is a small amount of intraventricular blood in the {place}."])
        return text, pick(["Intraventricular hemorrhage.", "Intraventricular extension of hemorrhage."])
    raise ValueError(l["subtype"])


_NEGATIONS = {  # sentences denying a subtype, used when it is absent
    "EDH": ["No epidural hematoma.", "No extra-axial collection."],
    "SDH": ["No subdural hematoma.", "No subdural or epidural collection.", "No extra-axial fluid collection."],
    "SAH": ["No subarachnoid hemorrhage.", "The basal cisterns are clear.", "The sulci and cisterns are clear, without subarachnoid blood."],
    "IPH": ["No intraparenchymal hemorrhage.", "No intracerebral hemorrhage or mass."],
    "IVH": ["No intraventricular hemorrhage.", "The ventricles are normal in size without intraventricular blood."],
}
_NORMAL = [
    "Gray-white matter differentiation is preserved.",
    "The calvarium is intact.",
    "The visualized paranasal sinuses and mastoid air cells are clear.",
    "Mild chronic small vessel ischemic changes in the periventricular white matter.",
    "Mild generalized parenchymal volume loss.",
    "The orbits are unremarkable.",
]


def make_report(seed: int, truth: dict) -> str:
    """Free-text report for the findings in `truth` (make_findings output or make_study truth)."""
    rng = _rng(seed, 6)
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    volumes = truth.get("volumes_ml", {})
    sentences, impression = [], []
    for l in truth["lesions"]:
        text, phrase = _lesion_sentence(l, volumes.get(l["subtype"], l["planned_ml"]) or l["planned_ml"], rng)
        sentences.append(text)
        impression.append(phrase)
    present = set(truth["subtypes"])
    for subtype in SUBTYPES:
        negation_ok = not (subtype == "EDH" and "SDH" in present) and not (subtype == "SDH" and "EDH" in present)
        if subtype not in present and negation_ok and rng.random() < 0.45:
            sentences.append(pick(_NEGATIONS[subtype]))
    shift = truth.get("midline_shift_mm", 0.0)
    if shift > 0:
        sentences.append(f"There is {shift:.0f} mm of {truth['midline_shift_toward']}ward midline shift.")
    else:
        sentences.append(pick(["No midline shift.", "No mass effect or midline shift.", "Midline structures are not displaced."]))
    sentences += list(rng.choice(_NORMAL, size=int(rng.integers(1, 4)), replace=False))
    if truth.get("params", {}).get("anatomy", {}).get("pineal_hu"):
        sentences.append("Physiologic calcification of the pineal gland.")
    if not present:
        caveat = rng.random()
        if caveat < 0.1:
            sentences.append("Streak artifact limits evaluation of the posterior fossa; a small hemorrhage there cannot be excluded.")
        elif caveat < 0.2:
            sentences.append(f"The previously described {pick(['left', 'right'])} subdural hematoma has resolved.")
        impression = [pick([
            "No evidence of acute intracranial hemorrhage.",
            "No acute intracranial abnormality.",
            "Negative for acute intracranial hemorrhage.",
            "No acute intracranial hemorrhage, mass effect or territorial infarct.",
            "Unremarkable noncontrast CT of the head.",
        ])]
    history = pick(["Fall.", "Headache.", "Altered mental status.", "Trauma.", "Dizziness.", "Rule out bleed."])
    order = rng.permutation(len(sentences)) if rng.random() < 0.3 else np.arange(len(sentences))
    findings = " ".join(sentences[i] for i in order)
    numbered = " ".join(f"{i + 1}. {p}" for i, p in enumerate(impression)) if len(impression) > 1 else impression[0]
    return (
        f"EXAMINATION: {pick(['CT head without contrast', 'CT BRAIN NON-CONTRAST', 'Noncontrast head CT'])}.\n"
        f"CLINICAL HISTORY: {history}\n"
        f"TECHNIQUE: Axial images of the head without intravenous contrast.\n"
        f"FINDINGS: {findings}\n"
        f"IMPRESSION: {numbered}"
    )
