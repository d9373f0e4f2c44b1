"""The four chest X-ray datasets as downloaded: their label files, folder layouts and splits.

Each ``scan_<name>(root, ...)`` reads the label file(s) under `root`, finds the image files, and
returns a `Scan`: one `Record` per image (id, path or None when the file is missing, split,
labels; SIIM also its RLE rows) plus the class names. Nothing is decoded here; `prepare` does that.

| dataset | label file (first found)                         | images                          |
|---------|---------------------------------------------------|---------------------------------|
| nih     | Data_Entry_2017_v2020.csv, Data_Entry_2017.csv    | images*/**/<Image Index>        |
|         | + train_val_list.txt, test_list.txt (splits)      |                                 |
| vinbig  | train.csv (image_id, class_name[, class_id])      | train/<image_id>.dicom|.dcm|.png|
| rsna    | stage_2_train_labels.csv (patientId, Target)      | stage_2_train_images/<id>.dcm   |
| siim    | train-rle.csv or stage_2_train.csv                | **/<ImageId>.dcm|.png           |
|         | (ImageId, EncodedPixels; relative or absolute RLE)|                                 |

Labels (also written to meta.json as ``labels_from``): NIH splits ``Finding Labels`` on ``|``
('No Finding' = all zero). VinBig-CXR has each image read by three radiologists, one row per
finding box and radiologist (``rad_id``); an image is positive for a class if *any* of its
radiologists marked that class (the union of its rows, the boxes themselves unused), and a
radiologist's 'No finding' row adds nothing, so an image is all-zero only when none of them marked
a finding. RSNA: Target, the maximum over an image's rows. SIIM: positive when any of its
``EncodedPixels`` rows is not ``-1``; the mask is the union of its rows.

Splits: NIH keeps the official test list; its train_val list is divided into train and val by
patient (seeded). VinBig and RSNA ship one labelled set; it is divided into train/val/test at
random (seeded). SIIM: as many positive as negative images, the larger group drawn down to the
smaller (seeded; before missing files are dropped, so the kept set can end slightly uneven), then
a seeded train/val/test split (70/10/20 % by default: segmentation stops early on val and is
scored on test). A label file without its required columns, a label name outside the known
set, or a malformed value stops with an error naming the file, the line and what was expected.
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .images import RLE_FORMS, rle_form, rle_runs

__all__ = [
    "NIH_LABELS", "VINBIG_LABELS", "RSNA_LABELS", "SIIM_LABELS", "Record", "Scan", "LabelFileError",
    "scan_nih", "scan_vinbig", "scan_rsna", "scan_siim", "SCANNERS", "read_csv",
]

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
# VinBig-CXR class_id 0..13; class 14 is "No finding" (no positive)
VINBIG_LABELS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD",
    "Infiltration", "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion",
    "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis",
)
VINBIG_NO_FINDING = "No finding"
RSNA_LABELS = ("Pneumonia",)
SIIM_LABELS = ("Pneumothorax",)
# how each scanner turns label rows into labels (the module docstring; meta.json's labels_from)
NIH_RULE = "Finding Labels split on '|'; 'No Finding' sets no class"
VINBIG_RULE = ("an image is positive for a class if any of its radiologists (rad_id) marked it, over all its rows "
               "(boxes unused); 'No finding' rows add nothing")
RSNA_RULE = "Target, the maximum over an image's rows"
SIIM_RULE = "positive if any EncodedPixels row of the image is not -1; the mask is the union of its rows"


class LabelFileError(ValueError):
    """A label file that cannot be trusted (missing columns, unknown label, bad value): stops prepare."""


@dataclass
class Record:
    image_id: str
    path: Optional[Path]
    split: str
    labels: np.ndarray  # uint8 (n_classes,)
    rle: List[str] = field(default_factory=list)  # SIIM only: the EncodedPixels rows of this image


@dataclass
class Scan:
    dataset: str
    classes: Sequence[str]
    records: List[Record]
    task: str  # "multilabel", "binary" or "segmentation"
    notes: Dict[str, int] = field(default_factory=dict)  # counts of rows left out, by reason
    rle_form: str = ""  # SIIM only: how its EncodedPixels are encoded, relative or absolute (images.rle_form)
    labels_from: str = ""  # how the labels were derived from the label file (meta.json's labels_from)
    label_file: Optional[Path] = None
    rle_detected: str = ""  # SIIM only: the form the file reads as (images.rle_form), whatever --rle forced
    rle_extent: int = 0  # SIIM only: the pixel after the furthest run of any row: its grid holds at least this many


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    if path.suffix == ".zip":
        z = zipfile.ZipFile(path)
        names = [n for n in z.namelist() if n.endswith(".csv")]
        if len(names) != 1:
            raise LabelFileError(f"{path}: expected one .csv inside the zip, found {names}")
        return io.TextIOWrapper(z.open(names[0]), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def read_csv(path: Path, required: Sequence[str]) -> List[Dict[str, str]]:
    """Rows of a CSV as dicts (header names stripped); LabelFileError if a required column is absent."""
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise LabelFileError(f"{path}: the file is empty; expected a header with columns {list(required)}") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise LabelFileError(
                f"{path}: missing required column(s) {missing}; expected columns {list(required)}, "
                f"found {header}"
            )
        idx = {c: header.index(c) for c in header}
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header) and any(idx[c] >= len(row) for c in required):
                raise LabelFileError(
                    f"{path}, line {line_no}: {len(row)} fields, the header has {len(header)} "
                    f"(columns {list(required)} must be present)"
                )
            d = {c: (row[i].strip() if i < len(row) else "") for c, i in idx.items()}
            d["_line"] = str(line_no)
            rows.append(d)
    return rows


def _find_file(root: Path, names: Iterable[str], what: str) -> Path:
    for name in names:
        for cand in (root / name, root / (name + ".gz"), root / (name + ".zip")):
            if cand.is_file():
                return cand
    raise LabelFileError(f"{root}: no {what} found; expected one of {list(names)} (optionally .gz/.zip)")


def _index_files(dirs: Iterable[Path], suffixes: Sequence[str]) -> Dict[str, Path]:
    """name -> path, and stem -> path, for every file with one of `suffixes` under `dirs`.

    When several files share a stem (a DICOM and a PNG copy of it), the earlier suffix in
    `suffixes` wins, then the earlier of `dirs`, then the first in sorted path order, so the
    choice does not depend on the file system's listing order. Folders whose name holds 'mask'
    are not searched: they hold masks named like their images (png_masks/<ImageId>.png beside
    png_images/<ImageId>.png)."""
    suffixes = tuple(s.lower() for s in suffixes)
    rank: Dict[str, Tuple[int, int, str]] = {}
    found: Dict[str, Path] = {}
    for j, d in enumerate(dirs):
        if not d.is_dir():
            continue
        for dirpath, subdirs, files in os.walk(d):
            subdirs[:] = sorted(x for x in subdirs if "mask" not in x.lower())
            for fn in files:
                kind = next((i for i, sfx in enumerate(suffixes) if fn.lower().endswith(sfx)), None)
                if kind is None:
                    continue
                p = Path(dirpath) / fn
                for key in (fn, fn.rsplit(".", 1)[0]):
                    if key not in rank or (kind, j, str(p)) < rank[key]:
                        rank[key], found[key] = (kind, j, str(p)), p
    return found


def _random_split(ids: Sequence[str], fractions: Dict[str, float], seed: int) -> Dict[str, str]:
    """Seeded assignment of ids to splits; `fractions` (without 'train') take their share first."""
    order = np.random.default_rng(seed).permutation(len(ids))
    out, start = {}, 0
    for name, frac in fractions.items():
        n = int(round(frac * len(ids)))
        for i in order[start:start + n]:
            out[ids[i]] = name
        start += n
    for i in order[start:]:
        out[ids[i]] = "train"
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


# ----------------------------------------------------------------------------------------------
# NIH ChestX-ray14
# ----------------------------------------------------------------------------------------------
def parse_nih_labels(text: str, where: str) -> np.ndarray:
    y = np.zeros(len(NIH_LABELS), dtype=np.uint8)
    for name in (t.strip() for t in text.split("|")):
        if name == "No Finding":
            continue
        if name not in NIH_LABELS:
            raise LabelFileError(
                f"{where}: unknown finding {name!r}; expected 'No Finding' or one of {list(NIH_LABELS)}"
            )
        y[NIH_LABELS.index(name)] = 1
    return y


def _read_list(path: Path) -> List[str]:
    with open(path) as f:
        return [ln.strip() for ln in f if ln.strip()]


def scan_nih(root, seed: int = 0, val_fraction: float = 0.1, csv_path=None, **_) -> Scan:
    _check_fractions(val_fraction, 0.0)  # NIH's test split is its official list
    root = Path(root)
    csv_path = Path(csv_path) if csv_path else _find_file(
        root, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], "NIH label file"
    )
    rows = read_csv(csv_path, ["Image Index", "Finding Labels"])
    labels: Dict[str, np.ndarray] = {}
    patient: Dict[str, str] = {}
    for r in rows:
        iid = r["Image Index"]
        y = parse_nih_labels(r["Finding Labels"], f"{csv_path}, line {r['_line']} ({iid})")
        if iid in labels and not np.array_equal(labels[iid], y):
            raise LabelFileError(f"{csv_path}, line {r['_line']}: {iid} appears twice with different labels")
        labels[iid] = y
        patient[iid] = r.get("Patient ID") or iid.split("_")[0]
    lists = {}
    for name in ("train_val_list.txt", "test_list.txt"):
        p = root / name
        if not p.is_file():
            raise LabelFileError(f"{root}: the official split list {name} is missing (NIH ships train_val_list.txt and test_list.txt)")
        lists[name] = _read_list(p)
    files = _index_files([d for d in sorted(root.glob("images*")) if d.is_dir()], (".png", ".jpg", ".jpeg"))
    # train_val -> train / val by patient, seeded
    tv = lists["train_val_list.txt"]
    patients = sorted({patient.get(i, i.split("_")[0]) for i in tv})
    val_patients = {p for p, s in _random_split(patients, {"val": val_fraction}, seed).items() if s == "val"}
    notes = {"listed in a split file but not in the CSV": 0}
    records = []
    for split_file, ids in (("train_val_list.txt", tv), ("test_list.txt", lists["test_list.txt"])):
        for iid in ids:
            if iid not in labels:
                notes["listed in a split file but not in the CSV"] += 1
                continue
            if split_file == "test_list.txt":
                split = "test"
            else:
                split = "val" if patient.get(iid, iid.split("_")[0]) in val_patients else "train"
            records.append(Record(iid, files.get(iid), split, labels[iid]))
    listed = set(tv) | set(lists["test_list.txt"])
    notes["in the CSV but in no split file"] = sum(1 for i in labels if i not in listed)
    return Scan("nih", NIH_LABELS, records, "multilabel", notes, labels_from=NIH_RULE, label_file=csv_path)


# ----------------------------------------------------------------------------------------------
# VinBig-CXR
# ----------------------------------------------------------------------------------------------
def scan_vinbig(root, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, csv_path=None, **_) -> Scan:
    _check_fractions(val_fraction, test_fraction)
    root = Path(root)
    csv_path = Path(csv_path) if csv_path else _find_file(root, ["train.csv", "vinbigdata-train.csv"], "VinBig label file")
    rows = read_csv(csv_path, ["image_id", "class_name"])
    labels: Dict[str, np.ndarray] = {}
    for r in rows:
        iid, name = r["image_id"], r["class_name"]
        where = f"{csv_path}, line {r['_line']} ({iid})"
        y = labels.setdefault(iid, np.zeros(len(VINBIG_LABELS), dtype=np.uint8))
        if name == VINBIG_NO_FINDING:
            cls = 14
        elif name in VINBIG_LABELS:
            cls = VINBIG_LABELS.index(name)
            y[cls] = 1
        else:
            raise LabelFileError(
                f"{where}: unknown class_name {name!r}; expected {VINBIG_NO_FINDING!r} or one of {list(VINBIG_LABELS)}"
            )
        cid = r.get("class_id", "")
        if cid != "" and cid != str(cls):
            raise LabelFileError(f"{where}: class_id {cid!r} does not match class_name {name!r} (expected {cls})")
    ids = sorted(labels)
    split = _random_split(ids, {"test": test_fraction, "val": val_fraction}, seed)
    files = _index_files([root / "train", root], (".dicom", ".dcm", ".png"))
    records = [Record(i, files.get(i), split[i], labels[i]) for i in ids]
    return Scan("vinbig", VINBIG_LABELS, records, "multilabel", {}, labels_from=VINBIG_RULE, label_file=csv_path)


# ----------------------------------------------------------------------------------------------
# RSNA Pneumonia
# ----------------------------------------------------------------------------------------------
def scan_rsna(root, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, csv_path=None, **_) -> Scan:
    _check_fractions(val_fraction, test_fraction)
    root = Path(root)
    csv_path = Path(csv_path) if csv_path else _find_file(
        root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"], "RSNA label file"
    )
    rows = read_csv(csv_path, ["patientId", "Target"])
    target: Dict[str, int] = {}
    for r in rows:
        t = r["Target"]
        if t not in ("0", "1"):
            raise LabelFileError(f"{csv_path}, line {r['_line']} ({r['patientId']}): Target {t!r}; expected 0 or 1")
        target[r["patientId"]] = max(target.get(r["patientId"], 0), int(t))
    ids = sorted(target)
    split = _random_split(ids, {"test": test_fraction, "val": val_fraction}, seed)
    dirs = [root / "stage_2_train_images", root / "stage_1_train_images", root]
    files = _index_files(dirs, (".dcm", ".dicom", ".png"))
    records = [Record(i, files.get(i), split[i], np.array([target[i]], dtype=np.uint8)) for i in ids]
    return Scan("rsna", RSNA_LABELS, records, "binary", {}, labels_from=RSNA_RULE, label_file=csv_path)


# ----------------------------------------------------------------------------------------------
# SIIM-ACR Pneumothorax
# ----------------------------------------------------------------------------------------------
def scan_siim(root, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, balanced: bool = True,
              csv_path=None, rle: str = "auto", **_) -> Scan:
    # a test split of its own: evaluate's segmentation stops early on val, so scoring val as well
    # would report the best of up to 100 epochs on the split that chose the epoch
    _check_fractions(val_fraction, test_fraction)
    if rle not in ("auto",) + RLE_FORMS:
        raise ValueError(f"--rle must be auto, {' or '.join(RLE_FORMS)}, got {rle!r}")
    root = Path(root)
    csv_path = Path(csv_path) if csv_path else _find_file(
        root, ["train-rle.csv", "stage_2_train.csv"], "SIIM label file"
    )
    rows = read_csv(csv_path, ["ImageId", "EncodedPixels"])
    rles: Dict[str, List[str]] = {}
    encoded: List[Dict[str, str]] = []  # the rows that hold runs
    for r in rows:
        enc = r["EncodedPixels"]
        toks = enc.split()
        if enc != "-1" and (not toks or len(toks) % 2 or not all(t.isdigit() for t in toks)):
            raise LabelFileError(
                f"{csv_path}, line {r['_line']} ({r['ImageId']}): EncodedPixels {enc[:40]!r} is neither '-1' "
                "nor pairs of non-negative integers"
            )
        lst = rles.setdefault(r["ImageId"], [])
        if enc != "-1":
            lst.append(enc)
            encoded.append(r)
    # the form, checked on every row: a forced --rle that the file cannot be in stops here (absolute
    # rows come in order; SIIM's relative ones mostly do not) rather than drawing garbage masks
    detected = rle_form(r["EncodedPixels"] for r in encoded)
    form = detected if rle == "auto" else rle
    extent = 0
    for r in encoded:
        try:
            extent = max(extent, int(rle_runs(r["EncodedPixels"], form)[1].max()))
        except ValueError as e:
            told = f" (--rle {rle} was given; the file reads as {detected})" if rle != "auto" else ""
            raise LabelFileError(f"{csv_path}, line {r['_line']} ({r['ImageId']}): {e}{told}") from None
    ids = sorted(rles)
    pos = [i for i in ids if rles[i]]
    neg = [i for i in ids if not rles[i]]
    notes = {}
    if balanced:
        rng = np.random.default_rng(seed)
        k = min(len(pos), len(neg))
        keep_neg = sorted(neg[j] for j in rng.choice(len(neg), size=k, replace=False)) if k else []
        keep_pos = sorted(pos[j] for j in rng.choice(len(pos), size=k, replace=False)) if k else []
        notes["left out to balance positives and negatives"] = len(ids) - 2 * k
        ids = sorted(keep_pos + keep_neg)
    split = _random_split(ids, {"test": test_fraction, "val": val_fraction}, seed + 1)
    files = _index_files([root], (".dcm", ".dicom", ".png"))
    records = [
        Record(i, files.get(i), split[i], np.array([1 if rles[i] else 0], dtype=np.uint8), rles[i]) for i in ids
    ]
    return Scan("siim", SIIM_LABELS, records, "segmentation", notes, rle_form=form, labels_from=SIIM_RULE,
                label_file=csv_path, rle_detected=detected, rle_extent=extent)


SCANNERS = {"nih": scan_nih, "vinbig": scan_vinbig, "rsna": scan_rsna, "siim": scan_siim}
