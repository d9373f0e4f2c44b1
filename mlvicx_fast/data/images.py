"""Reading chest X-rays as grayscale uint8, fitting them to a square, and SIIM run-length masks.

Pixel pipeline (the same for every dataset):

1. Read. PNG through Pillow: 8-bit grayscale as is; 16-bit (``I;16``, ``I``) mapped linearly from
   [min, max] of the image to [0, 255] (16-bit X-rays often hold 10-14 significant bits, so a
   fixed /257 would leave them dark); RGB/RGBA/LA (a few NIH files) converted to luminance.
   DICOM through pydicom: modality LUT (RescaleSlope/Intercept), then the VOI LUT or the
   WindowCenter/Width when present, MONOCHROME1 inverted so that bone is bright, then [min, max]
   to [0, 255]. Compressed transfer syntaxes need a decoder plugin (pylibjpeg +
   pylibjpeg-libjpeg for JPEG, pylibjpeg-openjpeg for JPEG 2000); a missing one raises
   `MissingDecoderError` naming the package, which stops `prepare` (every file would fail).
2. Fit to a square, aspect kept: the image is *padded* (centred, value 0 = black) to a square of
   its longer side, then resized to ``size x size`` with Pillow's antialiased bilinear filter.
   Padding rather than cropping: the lung apices and costophrenic angles sit near the image
   borders of portrait/landscape films, and a centre crop would cut findings (effusion, apical
   pneumothorax) out of the image while keeping their label. Masks go through the same geometry
   (box filter, then threshold at 1/2) so they stay aligned with their image.

SIIM-ACR masks: ``EncodedPixels`` holds pairs ``start length`` over pixels numbered column-major
(down the first column first) on the image's width x height. In ``train-rle.csv`` (the first
release) the form is *relative*: the first start is an offset from pixel 0, each later start an
offset from the end of the previous run. Kaggle's stage-2 ``stage_2_train.csv`` is said to use the
standard Kaggle form instead, *absolute*: each start is a 1-based pixel position, the runs in
increasing order and never overlapping (a row that breaks this is refused: it reads as relative).
`rle_form` tells the two apart over a whole file. ``-1`` means an empty mask; several rows of one
ImageId are unioned. The rows are drawn on SIIM's 1024 x 1024 originals: a downsized copy needs
them decoded on that grid (`prepare --mask-grid 1024`), and masks that do not fit the grid they are
decoded on raise `MaskError`, which stops `prepare` (all rows of one file share one grid, so the
other masks would be wrong too, also the ones that happen to fit).
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageError", "MissingDecoderError", "MaskError", "read_image", "read_png", "read_dicom", "fit_square",
    "fit_square_mask", "rle_decode", "rle_encode", "rle_form", "rle_runs", "RLE_FORMS", "to_uint8",
]


class ImageError(Exception):
    """A file that cannot be read as an image (missing, truncated, not an image): skipped by prepare."""


class MissingDecoderError(RuntimeError):
    """A DICOM needs a decoder plugin that is not installed: stops prepare with the package name."""


class MaskError(RuntimeError):
    """SIIM masks that do not fit the grid they are decoded on (a downsized copy without
    --mask-grid, a wrong --rle form): stops prepare, since all rows of one label file share one
    grid and form, so every other mask of the run would be wrong too."""


def to_uint8(a: np.ndarray) -> np.ndarray:
    """Map [min, max] of `a` linearly to [0, 255] (a constant image gives zeros)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ImageError("pixel values are not finite")
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def read_png(path) -> np.ndarray:
    """An 8- or 16-bit PNG (or any Pillow-readable image) as a 2-D uint8 array."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                return np.asarray(im, dtype=np.uint8).copy()
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return to_uint8(np.asarray(im))
            if mode == "P":
                im = im.convert("RGB")
            return np.asarray(im.convert("L"), dtype=np.uint8).copy()
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"unreadable image ({type(e).__name__}: {e})") from None


_DECODER_HINT = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless (pydicom also decodes it)
}


def _no_decoder_installed(ts) -> bool:
    """Whether pydicom decodes this transfer syntax with a plugin, and none of its plugins is
    installed. A decoder that is installed but failed (corrupt data), or a syntax pydicom does not
    decode at all (private, unknown), is False: that file is unreadable, not the whole run."""
    try:
        from pydicom.pixels.decoders.base import get_decoder

        return not get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        return False


def read_dicom(path) -> np.ndarray:
    """A DICOM file as a 2-D uint8 array (modality LUT, VOI LUT/window, MONOCHROME1 inverted)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pragma: no cover - pydicom is a dependency of the data extra
        raise MissingDecoderError(
            f"{path}: reading DICOM needs pydicom >= 3.0 (pip install 'pydicom>=3', or mlvicx-fast[data])"
        ) from None
    try:
        ds = pydicom.dcmread(str(path))
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, OSError, ...
        raise ImageError(f"unreadable DICOM ({type(e).__name__}: {e})") from None
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except Exception as e:
        msg = str(e)
        if ts is not None and _no_decoder_installed(ts):
            pkg = _DECODER_HINT.get(str(ts), "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
            raise MissingDecoderError(
                f"{path}: pixel data is compressed as {ts.name} ({ts}) and no installed decoder "
                f"handles it; install it with: pip install {pkg}"
            ) from None
        raise ImageError(f"unreadable DICOM pixel data ({type(e).__name__}: {msg.splitlines()[0] if msg else ''})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and getattr(ds, "SamplesPerPixel", 1) > 1:
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    elif arr.ndim == 3:  # multi-frame: the first frame
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageError(f"DICOM pixel array has shape {arr.shape}; expected a 2-D image")
    try:
        arr = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            arr = apply_voi_lut(arr, ds, index=0)
    except Exception as e:
        raise ImageError(f"bad DICOM LUT/window ({type(e).__name__}: {e})") from None
    out = to_uint8(arr)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 255 - out
    return out


def read_image(path) -> np.ndarray:
    """PNG/JPEG via Pillow or DICOM (.dcm, .dicom, or no suffix) via pydicom, as 2-D uint8."""
    path = Path(path)
    if not path.exists():
        raise ImageError("file not found")
    if path.suffix.lower() in (".dcm", ".dicom", ""):
        return read_dicom(path)
    return read_png(path)


def _square_geometry(h: int, w: int) -> Tuple[int, int, int]:
    side = max(h, w)
    return side, (side - h) // 2, (side - w) // 2


def fit_square(img: np.ndarray, size: int) -> np.ndarray:
    """Pad (centred, zeros) to a square of the longer side, then resize to size x size (uint8)."""
    h, w = img.shape
    side, top, left = _square_geometry(h, w)
    if side != h or side != w:
        sq = np.zeros((side, side), dtype=np.uint8)
        sq[top:top + h, left:left + w] = img
        img = sq
    if side == size:
        return np.ascontiguousarray(img)
    im = Image.fromarray(img, mode="L")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0), dtype=np.uint8)


def fit_square_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """The same geometry as `fit_square` for a 0/1 mask: box-filter, threshold at 1/2 -> 0/1 uint8."""
    h, w = mask.shape
    side, top, left = _square_geometry(h, w)
    sq = np.zeros((side, side), dtype=np.uint8)
    sq[top:top + h, left:left + w] = (mask > 0) * np.uint8(255)
    if side == size:
        return (sq > 127).astype(np.uint8)
    small = np.asarray(Image.fromarray(sq, mode="L").resize((size, size), Image.Resampling.BOX))
    return (small >= 128).astype(np.uint8)


RLE_FORMS = ("relative", "absolute")


def _rle_pairs(rle: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        nums = np.array(rle.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"EncodedPixels is not a list of integers: {rle[:40]!r}...") from None
    if nums.size % 2:
        raise ValueError(f"EncodedPixels holds an odd count of numbers ({nums.size}); expected start/length pairs")
    starts, lengths = nums[0::2], nums[1::2]
    if (starts < 0).any() or (lengths < 0).any():
        raise ValueError("EncodedPixels holds a negative start or length")
    return starts, lengths


def _in_order(starts: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether the pairs read as absolute positions give runs in order, none overlapping."""
    return bool((starts[1:] >= starts[:-1] + lengths[:-1]).all())


def rle_form(rows, n_pixels: int = 1024 * 1024) -> str:
    """'absolute' or 'relative': how a file's EncodedPixels rows ('-1' rows left out) are encoded.

    Absolute when every row's runs, read as positions, come in order without overlapping, and
    at least one row read as relative offsets would run past `n_pixels` (SIIM's 1024 x 1024 by
    default): a well-formed relative file never runs past its images, and relative rows of more
    than a few runs are not in order as positions (each offset would have to outgrow the last by a
    run length). Relative otherwise, including a file with no row of two or more runs."""
    past = False
    for rle in rows:
        starts, lengths = _rle_pairs(rle)
        if starts.size > 1 and not _in_order(starts, lengths):
            return "relative"
        past = past or int((starts + lengths).sum()) > n_pixels
    return "absolute" if past else "relative"


def rle_runs(rle: str, form: str = "relative") -> Tuple[np.ndarray, np.ndarray]:
    """The runs of one non-empty EncodedPixels row as 0-based (starts, ends), ends exclusive, in
    the order given. ValueError for a row that is not of that form: not pairs of non-negative
    integers; absolute with a start of 0, or with runs out of increasing order or overlapping
    (standard RLE never has them; relative offsets read as positions mostly do)."""
    if form not in RLE_FORMS:
        raise ValueError(f"rle form must be one of {RLE_FORMS}, got {form!r}")
    given, lengths = _rle_pairs(rle)
    if form == "relative":
        ends = np.cumsum(given + lengths)
        return ends - lengths, ends
    if (given < 1).any():
        raise ValueError("EncodedPixels holds a start of 0; absolute (standard Kaggle) RLE counts pixels from 1")
    if not _in_order(given, lengths):
        j = int(np.flatnonzero(given[1:] < given[:-1] + lengths[:-1])[0]) + 1
        what = "overlaps" if given[j] >= given[j - 1] else "comes before"
        raise ValueError(
            f"EncodedPixels runs are not in increasing order as absolute positions: run {j + 1} (start "
            f"{int(given[j])}) {what} run {j} (pixels {int(given[j - 1])}-{int(given[j - 1] + lengths[j - 1] - 1)}). "
            "Standard (absolute) RLE lists its runs in order without overlap, so this row looks like SIIM's "
            "relative offsets (train-rle.csv: each start counted from the end of the previous run); prepare "
            "reads that form with --rle relative (or auto)")
    return given - 1, given - 1 + lengths


def rle_decode(rle: str, height: int, width: int, form: str = "relative") -> np.ndarray:
    """SIIM column-major RLE (`form` relative or absolute, see the module) -> (height, width)
    uint8 mask of 0/1 ('-1' or '' = empty). ValueError for a row that is not of that form
    (`rle_runs`) or runs past height * width pixels."""
    if form not in RLE_FORMS:
        raise ValueError(f"rle form must be one of {RLE_FORMS}, got {form!r}")
    rle = (rle or "").strip()
    mask = np.zeros(height * width, dtype=np.uint8)
    if rle in ("-1", ""):
        return mask.reshape(width, height).T.copy()
    starts, ends = rle_runs(rle, form)
    if ends.size and ends.max() > height * width:
        hint = ""
        given, lengths = _rle_pairs(rle)
        if form == "relative" and given.size > 1 and _in_order(given, lengths):
            hint = ("; its starts only grow, like absolute pixel positions (the standard Kaggle RLE), "
                    "not offsets from the previous run as in SIIM's train-rle.csv: prepare reads that "
                    "form with --rle absolute")
        raise ValueError(
            f"EncodedPixels runs past the image: it ends at pixel {int(ends.max())}, the image has "
            f"{height}x{width} = {height * width}{hint}"
        )
    # one slice assignment per run: masks hold tens to a few thousand runs, and this measured 3x
    # faster than integrating +1/-1 edges over all height*width pixels (benchmarks/bench_prepare.py)
    for a, e in zip(starts.tolist(), ends.tolist()):
        mask[a:e] = 1
    return mask.reshape(width, height).T.copy()


def rle_encode(mask: np.ndarray, form: str = "relative") -> str:
    """Inverse of `rle_decode`: a 0/1 (height, width) mask -> SIIM RLE of that form ('-1' if empty)."""
    if form not in RLE_FORMS:
        raise ValueError(f"rle form must be one of {RLE_FORMS}, got {form!r}")
    flat = (np.asarray(mask).T.reshape(-1) > 0).astype(np.int8)
    if not flat.any():
        return "-1"
    d = np.diff(np.concatenate([[0], flat, [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    lengths = ends - starts
    given = starts + 1 if form == "absolute" else starts - np.concatenate([[0], ends[:-1]])
    return " ".join(f"{s} {n}" for s, n in zip(given.tolist(), lengths.tolist()))
