"""Dataset adapters: phantoms, CT-ICH, RSNA 2019 and CQ500 as :class:`training.data.Scan`, and
:func:`load_scans` for the data specs that name them.

Every adapter returns volumes in the project's slice order (ascending along the slice normal,
index 0 most inferior) with scan labels keyed by ichnode.common.vocabulary.LABELS. DICOM series
go through the node's own loader (worker.volume.load_series), so training sees exactly what
inference sees.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pydicom
from PIL import Image

from ichnode.common.vocabulary import LABELS, SUBTYPES
from training.data import Scan
from training.phantom import PhantomStudy, make_studies
from worker.geometry import SliceRef, Volume
from worker.volume import VolumeError, load_series

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The shared data folder beside the repository checkout (../shared/data), as laid out for
#: development and CI.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CTICH_HELDOUT_FRACTION = 0.3  # of the 50 CT-ICH patients, kept out of training for evaluation
CTICH_SPLIT_SEED = 20261123


# --------------------------------------------------------------------------------------------
# Phantoms


def study_volume(study: PhantomStudy) -> Volume:
    """The Volume of an in-memory phantom study (what load_series gives for its files)."""
    first = study.datasets[0]
    return Volume(
        hu=study.hu,
        spacing_mm=tuple(study.truth["params"]["spacing_mm"]),
        orientation=tuple(float(x) for x in first.ImageOrientationPatient),
        positions=np.array([[float(x) for x in ds.ImagePositionPatient] for ds in study.datasets]),
        slices=[SliceRef(str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in study.datasets],
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        gantry_tilt_deg=float(first.GantryDetectorTilt),
    )


def _phantom_scan(volume: Volume, truth: dict, masks: dict[str, np.ndarray], report: str) -> Scan:
    return Scan(
        scan_id=truth["study_id"],
        patient_id=truth["patient_id"],
        volume=volume,
        labels={k: int(v) for k, v in truth["labels"].items()},
        slice_labels=np.asarray(truth["slice_labels"], dtype=np.int64),
        masks={s: np.asarray(masks[s], dtype=bool) for s in SUBTYPES},
        report=report,
    )


def folder_scans(root: Path) -> list[Scan]:
    """Studies written by training.phantom.write_study under root (one folder per study)."""
    scans = []
    for truth_path in sorted(Path(root).glob("*/truth.json")):
        folder = truth_path.parent
        truth = json.loads(truth_path.read_text())
        volume = load_series(sorted((folder / "dicom").glob("*.dcm"))).volume
        if [ref.sop_instance_uid for ref in volume.slices] != truth["sop_instance_uids"]:
            raise ValueError(f"{folder}: loaded slices do not match truth.json (missing or extra files?)")
        with np.load(folder / "masks.npz") as masks:
            scans.append(_phantom_scan(volume, truth, dict(masks), (folder / "report.txt").read_text().strip()))
    return scans


def phantom_scans(
    folder: Path | None = None,
    *,
    seed: int = 0,
    n: int = 0,
    matrix: int = 128,
    n_slices: int | None = None,
    positive_fraction: float = 0.5,
) -> list[Scan]:
    """Phantom scans: those written under `folder`, or else n generated in memory from `seed`."""
    if folder is not None:
        return folder_scans(folder)
    return [
        _phantom_scan(study_volume(study), study.truth, study.masks, study.report)
        for study in make_studies(seed, n, positive_fraction, matrix=matrix, n_slices=n_slices)
    ]


# --------------------------------------------------------------------------------------------
# CT-ICH (PhysioNet): JPG exports of brain and bone windows

#: Assumed, not recorded: an adult head fills most of the 650 px frame, i.e. a field of view of
#: about 23 cm, 0.35 mm per pixel.
CTICH_PIXEL_SPACING_MM = 0.35
CTICH_SLICE_MM = 5.0
#: (centre, width) in HU of the exported windows, from README: not documented by the dataset.
CTICH_BRAIN_WINDOW = (40.0, 100.0)
CTICH_BONE_WINDOW = (370.0, 1660.0)
CTICH_COLUMNS = {"Epidural": "EDH", "Intraparenchymal": "IPH", "Intraventricular": "IVH",
                 "Subarachnoid": "SAH", "Subdural": "SDH"}
AIR_HU = -1024.0
CTICH_DERIVATION = (
    "Pixel values are pseudo-HU rebuilt from the CT-ICH dataset's 8-bit brain and bone window JPGs "
    f"(windows assumed, centre/width {CTICH_BRAIN_WINDOW[0]:g}/{CTICH_BRAIN_WINDOW[1]:g} and "
    f"{CTICH_BONE_WINDOW[0]:g}/{CTICH_BONE_WINDOW[1]:g} HU), not the scanner's values; "
    f"pixel spacing {CTICH_PIXEL_SPACING_MM:g} mm is assumed, not recorded."
)


def ctich_pseudo_hu(brain: np.ndarray, bone: np.ndarray) -> np.ndarray:
    """Pseudo-HU from the 8-bit brain and bone window images of the same slice.

    The brain window (fine steps of 0.4 HU) is used where it is not saturated, the bone window
    (6.5 HU steps) elsewhere; near-black in the bone window is air.
    """
    def unwindow(pixels: np.ndarray, window: tuple[float, float]) -> np.ndarray:
        centre, width = window
        return centre + (pixels.astype(np.float32) / 255.0 - 0.5) * width

    saturated = (brain <= 5) | (brain >= 250)
    hu = np.where(saturated, unwindow(bone, CTICH_BONE_WINDOW), unwindow(brain, CTICH_BRAIN_WINDOW))
    hu[saturated & (bone < 30)] = AIR_HU  # below about -260 HU: air (JPEG noise keeps it off 0)
    return hu.astype(np.float32)


def _ctich_slice(folder: Path, number: int) -> np.ndarray:
    brain = np.asarray(Image.open(folder / "brain" / f"{number}.jpg").convert("L"))
    bone_path = folder / "bone" / f"{number}.jpg"
    if bone_path.is_file():
        bone = np.asarray(Image.open(bone_path).convert("L"))
    else:  # one export lacks a bone image: bright saturated pixels become 700 HU, dark ones air
        log.warning("%s: no bone window image, pseudo-HU from the brain window only", bone_path)
        centre, width = CTICH_BONE_WINDOW
        bone = np.where(brain >= 250, round(((700 - centre) / width + 0.5) * 255), 0).astype(np.uint8)
    return ctich_pseudo_hu(brain, bone)


def ctich_ages(root: Path = SHARED_DATA / "ct-ich") -> dict[int, float]:
    """Patient number -> age in years, from patient_demographics.csv (patients without one left out)."""
    path = Path(root) / "patient_demographics.csv"
    ages = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        column = next((name for name in reader.fieldnames or () if name.startswith("Age")), None)  # "Age\n(years)"
        if column is None:
            raise ValueError(f"{path}: no age column")
        for row in reader:
            if row["Patient Number"].strip() and row[column].strip():
                ages[int(row["Patient Number"])] = float(row[column])
    return ages


def ctich_scans(root: Path = SHARED_DATA / "ct-ich", patients: Sequence[int] | None = None) -> list[Scan]:
    """CT-ICH patients (all, or those numbered in `patients`) with slice and scan labels and age.

    Slice order: the export numbers slices from the skull base up (slice 1 shows the neck or
    skull base, the last one the vertex), which already is our inferior-first order.
    """
    root = Path(root)
    rows: dict[int, dict[int, dict[str, str]]] = defaultdict(dict)
    with open(root / "hemorrhage_diagnosis.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row["PatientNumber"])][int(row["SliceNumber"])] = row
    wanted = sorted(rows) if patients is None else sorted(patients)
    ages = ctich_ages(root)
    scans = []
    for number in wanted:
        if number not in rows:
            raise ValueError(f"CT-ICH patient {number} is not in hemorrhage_diagnosis.csv")
        folder = root / "Patients_CT" / f"{number:03d}"
        slice_rows = rows[number]
        numbers = sorted(slice_rows)
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"CT-ICH patient {number}: slice numbers are not 1..n")
        hu = np.stack([_ctich_slice(folder, s) for s in numbers])
        slice_labels = np.zeros((len(numbers), len(LABELS)), dtype=np.int64)
        fracture = np.array([int(slice_rows[s]["Fracture_Yes_No"]) for s in numbers], dtype=np.int64)
        for i, s in enumerate(numbers):
            row = slice_rows[s]
            for column, subtype in CTICH_COLUMNS.items():
                slice_labels[i, LABELS.index(subtype)] = int(row[column])
            slice_labels[i, 0] = int(row["No_Hemorrhage"] == "0" or slice_labels[i, 1:].any())
        scan_id = f"ctich-{number:03d}"
        scans.append(Scan(
            scan_id=scan_id,
            patient_id=scan_id,
            volume=Volume.from_array(hu, (CTICH_SLICE_MM, CTICH_PIXEL_SPACING_MM, CTICH_PIXEL_SPACING_MM)),
            labels={k: int(slice_labels[:, i].any()) for i, k in enumerate(LABELS)},
            slice_labels=slice_labels,
            derivation=CTICH_DERIVATION,
            age_years=ages.get(number),
            slice_fracture=fracture,
        ))
    return scans


def ctich_hu_slices(root: Path = SHARED_DATA / "ct-ich-hu-slices") -> list[Scan]:
    """The 18 true-HU CT-ICH slices with their radiologists' masks, as one-slice scans.

    The masks do not say the subtype: they are under "any". Pixel spacing is not recorded; the
    JPG exports' assumption (CTICH_PIXEL_SPACING_MM at 650 px) scaled to 512 px stands in.
    """
    root = Path(root)
    scans = []
    for path in sorted((root / "ct").glob("*.dcm")):
        patient, _, number = path.stem.partition("_")
        hu = pydicom.dcmread(path).pixel_array.astype(np.float32)
        mask = pydicom.dcmread(root / "masks" / path.name).pixel_array > 0
        spacing = CTICH_PIXEL_SPACING_MM * 650 / hu.shape[1]
        scans.append(Scan(
            scan_id=f"ctich-{int(patient):03d}-hu-{number}",
            patient_id=f"ctich-{int(patient):03d}",
            volume=Volume.from_array(hu[None], (CTICH_SLICE_MM, spacing, spacing)),
            labels={k: int(k == "any") for k in LABELS},
            masks={"any": mask[None]},
        ))
    return scans


# --------------------------------------------------------------------------------------------
# RSNA 2019 single slices (brain-window PNG, see ../shared/data/rsna-slices/README.md)

RSNA_SLICE_WINDOW = (40.0, 80.0)
RSNA_HELDOUT_FRACTION = 0.2  # of the slices, never trained on: the slice-level test set
RSNA_SPLIT_SEED = 20261201
RSNA_SLICE_COLUMNS = ("any",) + SUBTYPES  # labels.csv columns, in LABELS order


def rsna_slice_hu(grey: np.ndarray) -> np.ndarray:
    """8-bit brain-window grey levels -> HU clipped to the window; black (below 0 HU: air, fat)
    becomes air so that the head crop finds the head as on a full-HU scan."""
    centre, width = RSNA_SLICE_WINDOW
    hu = centre + (grey.astype(np.float32) / 255.0 - 0.5) * width
    hu[grey == 0] = AIR_HU
    return hu


def rsna_slice_split(ids: Sequence[str]) -> dict[str, str]:
    """image id -> "train" or "heldout": a fixed random 20% held out (the slices carry no patient
    grouping, so none is possible; the README's sample has one slice per series or few)."""
    order = np.random.default_rng(RSNA_SPLIT_SEED).permutation(len(ids))
    n_heldout = int(round(RSNA_HELDOUT_FRACTION * len(ids)))
    sorted_ids = sorted(ids)
    return {sorted_ids[i]: ("heldout" if rank < n_heldout else "train") for rank, i in enumerate(order)}


def rsna_slice_scans(root: Path = SHARED_DATA / "rsna-slices", split: str = "all") -> list[Scan]:
    """RSNA slices as one-slice scans (brain window only), all or the "train" / "heldout" split."""
    root = Path(root)
    with open(root / "labels.csv", newline="") as f:
        rows = {row["image"]: row for row in csv.DictReader(f)}
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"rsna-slices split must be all, train or heldout, not {split!r}")
    groups = rsna_slice_split(list(rows))
    scans = []
    for image, row in sorted(rows.items()):
        if split != "all" and groups[image] != split:
            continue
        grey = np.asarray(Image.open(root / "images" / image).convert("L"))
        labels = np.array([[int(row[c]) for c in RSNA_SLICE_COLUMNS]], dtype=np.int64)
        scan_id = Path(image).stem
        scans.append(Scan(
            scan_id=scan_id,
            patient_id=f"rsna-{scan_id}",
            volume=Volume.from_array(rsna_slice_hu(grey)[None]),
            labels={k: int(labels[0, i]) for i, k in enumerate(LABELS)},
            slice_labels=labels,
            brain_window_only=True,
        ))
    return scans


# --------------------------------------------------------------------------------------------
# DICOM datasets: RSNA 2019 and CQ500


def _headers(paths: Iterable[Path]) -> Iterator[tuple[Path, pydicom.Dataset]]:
    for path in paths:
        try:
            yield path, pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # unreadable files are skipped, as the node's loader does
            log.warning("skipping %s: %s", path, exc)


def _by_series(paths: Iterable[Path]) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for path, ds in _headers(paths):
        series[str(ds.get("SeriesInstanceUID", ""))].append((path, ds))
    return series


def _load(paths: Sequence[Path], what: str) -> Volume | None:
    try:
        loaded = load_series(paths)
    except VolumeError as exc:
        log.warning("skipping %s: %s", what, exc)
        return None
    for warning in loaded.warnings:
        log.info("%s: %s", what, warning)
    return loaded.volume


RSNA_SUBTYPES = {"any": "any", "epidural": "EDH", "intraparenchymal": "IPH", "intraventricular": "IVH",
                 "subarachnoid": "SAH", "subdural": "SDH"}


def rsna_scans(root: Path) -> Iterator[Scan]:
    """RSNA 2019 (Kaggle layout): stage_2_train.csv plus ID_*.dcm files anywhere under root.

    Slices are grouped into series by SeriesInstanceUID; a series with unlabelled slices (the
    test set) is skipped.
    """
    root = Path(root)
    slice_labels: dict[str, np.ndarray] = defaultdict(lambda: np.full(len(LABELS), -1, dtype=np.int64))
    with open(root / "stage_2_train.csv", newline="") as f:
        for row in csv.DictReader(f):
            sop, _, subtype = row["ID"].rpartition("_")
            slice_labels[sop][LABELS.index(RSNA_SUBTYPES[subtype])] = int(float(row["Label"]))
    for uid, members in sorted(_by_series(sorted(root.rglob("ID_*.dcm"))).items()):
        stems = {str(ds.SOPInstanceUID): path.stem for path, ds in members}
        if any(stem not in slice_labels or (slice_labels[stem] < 0).any() for stem in stems.values()):
            log.warning("skipping RSNA series %s: slices without labels", uid)
            continue
        volume = _load([path for path, _ in members], f"RSNA series {uid}")
        if volume is None:
            continue
        labels = np.stack([slice_labels[stems[ref.sop_instance_uid]] for ref in volume.slices])
        yield Scan(
            scan_id=uid,
            patient_id=str(members[0][1].get("PatientID", uid)),
            volume=volume,
            labels={k: int(labels[:, i].any()) for i, k in enumerate(LABELS)},
            slice_labels=labels,
        )


CQ500_COLUMNS = {"ICH": "any", "EDH": "EDH", "IPH": "IPH", "IVH": "IVH", "SAH": "SAH", "SDH": "SDH"}
_NOT_PLAIN = re.compile(
    r"bone|lung|\bh[6-9]\d|\bfc[3-9]\d|post[- ]?contrast|contrast[- ]enhanced|with contrast|w/ ?contrast|c\+"
    r"|scout|topogram|localizer",
    re.IGNORECASE,
)


def _normalised_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.split()[0].lower())


def cq500_series_rank(ds: pydicom.Dataset) -> tuple:
    """Sort key, best first: axial plain (soft-tissue kernel) series, then thin, then many slices."""
    text = " ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "ConvolutionKernel", "ImageType"))
    iop = np.array(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    axial = abs(np.cross(iop[:3], iop[3:])[2]) > 0.9
    return (not axial, bool(_NOT_PLAIN.search(text)), float(ds.get("SliceThickness", 99) or 99))


def cq500_scans(root: Path) -> Iterator[Scan]:
    """CQ500: reads.csv (three readers) plus one DICOM folder per study named like `name`.

    Scan labels are the majority of the three readers; of a study's series the axial plain one
    with the thinnest slices is used (ties: more slices).
    """
    root = Path(root)
    folders = {_normalised_name(p.name): p for p in root.iterdir() if p.is_dir()}
    with open(root / "reads.csv", newline="") as f:
        reads = list(csv.DictReader(f))
    for row in reads:
        name = row["name"]
        folder = folders.get(_normalised_name(name))
        if folder is None:
            log.warning("CQ500 %s: no study folder", name)
            continue
        series = _by_series(sorted(p for p in folder.rglob("*") if p.is_file()))
        if not series:
            log.warning("CQ500 %s: no DICOM files", name)
            continue
        best = min(series.values(), key=lambda members: (cq500_series_rank(members[0][1]), -len(members)))
        volume = _load([path for path, _ in best], f"CQ500 {name}")
        if volume is None:
            continue
        labels = {label: int(sum(int(float(row[f"R{r}:{column}"])) for r in (1, 2, 3)) >= 2)
                  for column, label in CQ500_COLUMNS.items()}
        yield Scan(scan_id=name, patient_id=name, volume=volume, labels={k: labels[k] for k in LABELS})


# --------------------------------------------------------------------------------------------
# Splits


def split_by_patient(items: Iterable[T], fractions: float | Sequence[float], seed: int = 0) -> tuple[list[T], ...]:
    """Deterministic split of scans (by patient_id) or of patient ids into groups of patients.

    `fractions` are relative group sizes; a single number f means (1 - f, f), e.g. train and
    validation. Every patient lands in exactly one group; group order follows `fractions`.
    """
    items = list(items)
    sizes = [1.0 - fractions, fractions] if isinstance(fractions, (int, float)) else [float(x) for x in fractions]
    if min(sizes) < 0 or sum(sizes) <= 0:
        raise ValueError(f"bad split fractions {fractions!r}")
    patient = lambda item: item if isinstance(item, str) else item.patient_id  # noqa: E731
    patients = sorted({patient(item) for item in items})
    order = np.random.default_rng(seed).permutation(len(patients))
    bounds = np.rint(np.cumsum(sizes) / sum(sizes) * len(patients)).astype(int)
    group_of = {}
    for group, (start, end) in enumerate(zip(np.concatenate([[0], bounds[:-1]]), bounds)):
        group_of.update({patients[i]: group for i in order[start:end]})
    groups: tuple[list[T], ...] = tuple([] for _ in sizes)
    for item in items:
        groups[group_of[patient(item)]].append(item)
    return groups


# --------------------------------------------------------------------------------------------
# Data specs


def _parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'kind:arg,key=value,...' -> (kind, arg, options); a bare path is ('folder', path, {})."""
    kind, sep, rest = spec.partition(":")
    if not sep or os.sep in kind:
        return "folder", spec, {}
    arg, options = "", {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if eq:
            options[key.strip()] = value.strip()
        else:
            arg = part.strip()
    return kind, arg, options


def load_scans(spec: str) -> list[Scan]:
    """Scans named by a data spec.

    - ``phantom:seed=S,n=N[,matrix=M,slices=K]``: N synthetic studies from helper phantoms;
    - ``ctich:train`` / ``ctich:heldout`` / ``ctich:all`` (optionally ``root=DIR``): the CT-ICH
      patients, split by patient with a fixed seed so held-out patients never reach training;
      ``ctich:all,patients=49+57`` loads only the patients with those numbers (not combinable
      with train / heldout, whose split is drawn over all patients);
    - ``rsna-slices:train`` / ``rsna-slices:heldout`` / ``rsna-slices:all`` (optionally
      ``root=DIR``): the RSNA brain-window PNG slices, one-slice scans, a fixed 20% held out;
    - ``rsna:DIR``, ``cq500:DIR``: those datasets' adapters;
    - a folder: CT-ICH layout if it holds hemorrhage_diagnosis.csv, else written phantom studies.
    """
    kind, arg, opt = _parse_spec(spec)
    if kind == "phantom":
        return phantom_scans(
            seed=int(opt.get("seed", 0)),
            n=int(opt.get("n", 20)),
            matrix=int(opt.get("matrix", 128)),
            n_slices=int(opt.get("slices", 24)),
        )
    if kind == "ctich":
        root = Path(opt.get("root", SHARED_DATA / "ct-ich"))
        if "patients" in opt:
            if arg not in ("", "all"):
                raise ValueError(f"{spec!r}: patients= selects from ctich:all, not from the {arg} split")
            return ctich_scans(root, [int(n) for n in opt["patients"].split("+")])
        scans = ctich_scans(root)
        if arg in ("", "all"):
            return scans
        train, heldout = split_by_patient(scans, CTICH_HELDOUT_FRACTION, seed=CTICH_SPLIT_SEED)
        return {"train": train, "heldout": heldout}[arg]
    if kind == "rsna-slices":
        return rsna_slice_scans(Path(opt.get("root", SHARED_DATA / "rsna-slices")), arg or "all")
    if kind == "rsna":
        return list(rsna_scans(Path(arg)))
    if kind == "cq500":
        return list(cq500_scans(Path(arg)))
    if kind == "folder":
        root = Path(arg)
        if (root / "hemorrhage_diagnosis.csv").is_file():
            return ctich_scans(root)
        return folder_scans(root)
    raise ValueError(f"unknown data spec {spec!r}")
