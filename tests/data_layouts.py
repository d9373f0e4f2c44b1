"""Build the four datasets' folder layouts in a temp dir: real label rows (tests/data excerpts),
generated pixels (random PNGs of several bit depths and shapes, DICOMs written with pydicom)."""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).parent / "data"


def excerpt_rows(name):
    with gzip.open(DATA / name, "rt", newline="") as f:
        text = f.read()
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    return text, [h.strip() for h in header], list(reader)


def random_image(rng, h, w, dtype=np.uint8):
    hi = 255 if dtype == np.uint8 else 4095
    base = rng.integers(0, hi + 1, size=(h, w)).astype(dtype)
    return base


def write_png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.dtype == np.uint16:
        Image.fromarray(arr).save(path)  # mode I;16
    elif mode == "RGBA":
        Image.fromarray(np.stack([arr] * 3 + [np.full_like(arr, 255)], axis=2), mode="RGBA").save(path)
    else:
        Image.fromarray(arr, mode="L").save(path)


def write_dicom(path, arr, photometric="MONOCHROME2", slope=None, intercept=None, window=None, syntax="explicit"):
    """A minimal DX DICOM holding `arr` (uint8 or uint16) with the given LUT attributes."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless,
                             generate_uid)

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if arr.dtype == np.uint8 else 16
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = str(slope)
        ds.RescaleIntercept = str(intercept or 0)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if syntax == "jpeg":
        assert arr.dtype == np.uint8
        buf = io.BytesIO()
        Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=95)
        ds.PixelData = pydicom.encaps.encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PhotometricInterpretation = "MONOCHROME2"
    elif syntax == "j2k-no-decoder":  # JPEG 2000 header claim; no decoder is installed for it
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    else:
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        if syntax == "rle":
            ds.compress(RLELossless, arr)
    ds.save_as(str(path), enforce_file_format=True)


# ------------------------------------------------------------------------------------------------
def make_nih(root: Path, rng, old_csv=False, bad=True):
    """NIH layout from the excerpt; returns {image id: 'Finding Labels'} and the bad ids by reason."""
    text, header, rows = excerpt_rows("nih_Data_Entry_2017_v2020.csv.gz")
    root.mkdir(parents=True, exist_ok=True)
    if old_csv:  # Data_Entry_2017.csv: trailing comma and ages like '058Y'
        with open(root / "Data_Entry_2017.csv", "w", newline="") as f:
            f.write("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
                    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
            for r in rows:
                r = list(r)
                r[4] = f"{int(r[4]):03d}Y"
                f.write(",".join(r) + ",\n")
    else:
        (root / "Data_Entry_2017_v2020.csv").write_text(text)
    ids = [r[0] for r in rows]
    labels = {r[0]: r[1] for r in rows}
    test = [i for i in ids if int(i[:8]) % 5 == 0]
    (root / "train_val_list.txt").write_text("".join(i + "\n" for i in ids if i not in test))
    (root / "test_list.txt").write_text("".join(i + "\n" for i in test))
    bad_ids = {}
    for k, iid in enumerate(ids):
        folder = root / f"images_{1 + k % 3:03d}" / "images"
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        kind = k % 3
        arr = random_image(rng, h, w, np.uint16 if kind == 1 else np.uint8)
        write_png(folder / iid, arr, mode="RGBA" if kind == 2 and k % 2 else None)
    if bad:
        (root / "images_001" / "images" / ids[0]).unlink(missing_ok=True)
        for d in root.glob("images_*/images"):
            (d / ids[0]).unlink(missing_ok=True)
        bad_ids[ids[0]] = "file not found"
        for d in root.glob("images_*/images"):
            p = d / ids[1]
            if p.exists():
                p.write_bytes(p.read_bytes()[:40])  # truncated PNG
        bad_ids[ids[1]] = "unreadable image"
    return labels, bad_ids


def make_vinbig(root: Path, rng):
    text, header, rows = excerpt_rows("vinbig_train.csv.gz")
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.csv").write_text(text)
    ids = sorted({r[0] for r in rows})
    for k, iid in enumerate(ids):
        arr = random_image(rng, int(rng.integers(30, 50)), int(rng.integers(30, 50)), np.uint16)
        kw = [dict(), dict(photometric="MONOCHROME1"), dict(slope=2, intercept=-100),
              dict(window=(2000, 3000))][k % 4]
        write_dicom(root / "train" / f"{iid}.dicom", arr, **kw)
    return rows


def make_rsna(root: Path, rng):
    text, header, rows = excerpt_rows("rsna_stage_2_train_labels.csv.gz")
    root.mkdir(parents=True, exist_ok=True)
    (root / "stage_2_train_labels.csv").write_text(text)
    ids = sorted({r[0] for r in rows})
    for k, pid in enumerate(ids):
        arr = random_image(rng, 40, 36, np.uint8)
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", arr, syntax="jpeg" if k % 3 == 0 else "explicit")
    return rows


def make_siim(root: Path, rng, side=1024):
    text, header, rows = excerpt_rows("siim_train-rle.csv.gz")
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-rle.csv").write_text(text)
    ids = sorted({r[0] for r in rows})
    for k, iid in enumerate(ids):
        arr = np.zeros((side, side), np.uint8)
        arr[::7] = rng.integers(0, 256, size=(len(arr[::7]), side))
        write_dicom(root / "dicom-images-train" / f"1.2.{k}" / f"1.3.{k}" / f"{iid}.dcm", arr)
    return rows
