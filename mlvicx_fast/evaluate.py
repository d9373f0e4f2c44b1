"""python -m mlvicx_fast.evaluate: the paper's downstream protocols (DESIGN.md sections 6 and 7).

    cls      classification: pretrained (or random) ResNet18 + one Linear layer, frozen or fine-tuned,
             on prepared NIH / VinBig / RSNA data at label fractions 1/10/30/100 %, several seeds;
             early stopping on validation mean AUC (patience 10), the best epoch scored on test.
    seg      segmentation: U-Net on the same encoder, SIIM-ACR masks, frozen or fine-tuned, Dice.
    compare  paired t-test (scipy ttest_rel) of two methods over runs matched by fraction and seed.
    table    one table (and plot) from the results of several evaluations of the same dataset.
    heatmap  Grad-CAM class activation maps of a fine-tuned classifier, PNG overlays per class.

Choices made here (the paper leaves them open):

* Inputs are the prepared uint8 images at their stored size (``--image-size`` resizes), scaled to
  [0, 1] and normalised with the ImageNet mean/std (gray replicated to 3 channels, or the first
  channel's statistics for a 1-channel stem), as in pretraining. No augmentation by default;
  ``--augment`` fine-tunes on the data loader's random-resized-crop + flip batches.
* Frozen protocol: the encoder runs once per image in eval mode and its (N, 512) pooled features
  are kept; only the Linear layer trains on them (exactly the same model as running the frozen
  encoder every epoch without augmentation, much faster on a CPU).
* Optimiser Adam, no weight decay. Paper batch sizes and learning rates are the defaults: NIH
  batch 64, lr 1e-5 (fine-tune); VinBig and RSNA batch 16, lr 1e-3. The paper gives no probe
  learning rate for NIH; a Linear layer on frozen features barely moves at 1e-5, so the frozen
  NIH default is 1e-3. Segmentation: batch 32, lr 3e-4, loss BCE + soft Dice.
* Label subsets: the first ``round(fraction * n_train)`` rows of a permutation drawn by
  ``numpy.random.default_rng(seed)`` (nested across fractions, as the data loader's); the same
  subset for every method at a given seed, so runs pair up for the t-test. The seed also
  initialises the head (and a random-init encoder) and shuffles the batches.
* RSNA (one binary label): AUC drives early stopping; the run's score is test accuracy at 0.5.
  SIIM-ACR is prepared into train/val/test: the best epoch on val is scored on test (a folder
  prepared before it had a test split is scored on val, with a note: biased upwards).
  The Dice that scores and early-stops is pooled over all pixels of the split (an all-empty
  prediction scores 0); the per-image challenge Dice (empty/empty = 1) rewards predicting nothing
  on the half of a balanced set without pneumothorax, so it is recorded but does not decide.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data.loader import drop_numba_finalizer_errors, upload
from .metrics import EarlyStopping, accuracy, auc_table, dice_per_image, mean_or_none, mean_std_cell, paired_ttest
from .ops.augment import IMAGENET_MEAN, IMAGENET_STD  # the loader's normalisation
from .progress import progress as progress_bar

PathLike = Union[str, os.PathLike]

PAPER_RUNS = 10  # runs per setting in the paper's paired t-test (DESIGN.md section 6)
RANDOM = "random"
RANDOM_NAME = "Random init"

# paper settings (DESIGN.md section 6); lr per protocol
DEFAULTS = {
    "nih": {"batch": 64, "lr": {"finetune": 1e-5, "frozen": 1e-3}},
    "vinbig": {"batch": 16, "lr": {"finetune": 1e-3, "frozen": 1e-3}},
    "rsna": {"batch": 16, "lr": {"finetune": 1e-3, "frozen": 1e-3}},
    "siim": {"batch": 32, "lr": {"finetune": 3e-4, "frozen": 3e-4}},
}
PROTOCOLS = ("frozen", "finetune")
CLS_FRACTIONS = (1.0, 10.0, 30.0, 100.0)
SEG_FRACTIONS = (30.0, 100.0)


class EvaluationError(ValueError):
    """A bad input (path, checkpoint, data folder, option): the message says which and what was expected."""


# ================================================================================================
# encoders
# ================================================================================================
def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint file, or a run folder: RUN/final.pt, else the newest RUN/checkpoints/ckpt-*.pt."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (expected a .pt file, a run folder, "
                                f"or '{RANDOM}' for random init)")
    if path.is_file():
        return path
    if (path / "final.pt").is_file():
        return path / "final.pt"
    from .checkpoint import CheckpointManager

    found = CheckpointManager(path / "checkpoints").list()
    if found:
        return found[-1][1]
    raise FileNotFoundError(f"run folder {str(path)!r} holds neither final.pt nor checkpoints/ckpt-*.pt")


def _read_checkpoint(path: Path) -> Any:
    from .checkpoint import UnsafeCheckpoint, load

    try:
        return load(path)
    except UnsafeCheckpoint as e:
        raise EvaluationError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here; say what the file is not
        raise EvaluationError(f"could not read {str(path)!r} as a torch checkpoint: {type(e).__name__}: {e}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefix(sd: Mapping[str, torch.Tensor],
                  prefixes=("module.", "_orig_mod.", "backbone.", "encoder.")) -> Dict[str, torch.Tensor]:
    """A copy of sd without the wrapper prefixes every key shares (DataParallel's 'module.',
    torch.compile's '_orig_mod.', a 'backbone.' holder)."""
    from .models.resnet import strip_wrappers

    sd = dict(sd)
    strip_wrappers(sd, wrappers=prefixes)
    return sd


def _mismatch(model: nn.Module, sd: Mapping[str, torch.Tensor], ignore: Callable[[str], bool] = lambda k: False) -> str:
    """'' when sd fits model's state_dict (names and shapes), else a short description of the misfit."""
    want = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked (files saved before torch 0.4.1 have none,
    # torchvision's first ImageNet ResNet weights among them)
    missing = [k for k in want if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in want and not ignore(k)]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
              for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape) and not ignore(k)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
    return ", ".join(parts)


def load_pretrained_encoder(path: PathLike, with_context: bool = False, in_chans: Optional[int] = None,
                            backend: str = "auto") -> nn.Module:
    """The downstream encoder of a checkpoint: an nn.Module whose ``forward(x)`` gives (N, 512) pooled
    features and ``forward_taps(x)`` the five stage maps (for the U-Net).

    path: an MLVICX pretraining checkpoint (``kind: 'mlvicx-pretrain'``, ``model``, ``model_args``),
    a run folder (its final.pt, else its newest checkpoints/ckpt-*.pt), or a plain ResNet18
    state_dict with torchvision names (ImageNet or other weights; 'fc.*' is ignored, a 'module.'
    or 'backbone.' prefix is stripped). A 'module.' (DDP) or '_orig_mod.' (torch.compile) prefix
    on the MLVICX weights is stripped too. with_context: keep MLVICX's five context blocks inline
    (only for MLVICX checkpoints). in_chans: 1 or 3 to change the stem (default: the checkpoint's).
    backend: context-block backend ('auto', 'torch', 'triton').

    Raises FileNotFoundError for a missing path, EvaluationError (a ValueError) for a file that is
    not a checkpoint, a checkpoint of another kind, or weights that do not fit the architecture.
    """
    return _load_encoder(path, with_context, in_chans, backend)[0]


def _load_encoder(path: PathLike, with_context: bool, in_chans: Optional[int], backend: str):
    """(encoder, checkpoint file, MLVICX model_args or None for a plain ResNet18)."""
    from .models.mlvicx import MLVICX
    from .models.resnet import ResNet18, convert_stem

    if in_chans not in (None, 1, 3):
        raise EvaluationError(f"in_chans must be 1 or 3, got {in_chans}")
    file = resolve_checkpoint(path)
    obj = _read_checkpoint(file)
    name = str(file)
    if isinstance(obj, Mapping) and "kind" in obj:
        if obj["kind"] != "mlvicx-pretrain":
            raise EvaluationError(f"{name}: checkpoint kind {obj['kind']!r}; expected 'mlvicx-pretrain' "
                                  "(written by python -m mlvicx_fast.train) or a ResNet18 state_dict")
        for key in ("model", "model_args"):
            if key not in obj:
                raise EvaluationError(f"{name}: an 'mlvicx-pretrain' checkpoint without its {key!r} entry")
        args = dict(obj["model_args"])
        try:
            model = MLVICX(**args, backend=backend)
        except TypeError as e:
            raise EvaluationError(f"{name}: model_args {args} do not build MLVICX: {e}") from None
        sd = _strip_prefix(obj["model"], ("module.", "_orig_mod."))
        if not _is_state_dict(sd):
            raise EvaluationError(f"{name}: its 'model' entry is not a state_dict of tensors")
        misfit = _mismatch(model, sd)
        if misfit:
            raise EvaluationError(f"{name} does not fit MLVICX({', '.join(f'{k}={v!r}' for k, v in args.items())}): "
                                  f"{misfit}")
        model.load_state_dict(sd)
        encoder = model.encoder(with_context=with_context)
        if in_chans is not None and in_chans != model.backbone.in_chans:
            stem = ResNet18(in_chans=in_chans)
            stem.load_state_dict(convert_stem(model.backbone.state_dict(), "", in_chans))
            model.backbone = stem
            encoder = model.encoder(with_context=with_context)
        args["in_chans"] = encoder_in_chans(encoder)
        return encoder, file, args
    if isinstance(obj, Mapping) and "state_dict" in obj and _is_state_dict(obj["state_dict"]):
        obj = obj["state_dict"]
    if not _is_state_dict(obj):
        found = type(obj).__name__ + (f" with keys {list(obj)[:5]}" if isinstance(obj, Mapping) else "")
        raise EvaluationError(f"{name}: neither an 'mlvicx-pretrain' checkpoint nor a ResNet18 state_dict "
                              f"(found {found})")
    if with_context:
        raise EvaluationError(f"{name} is a plain ResNet18 state_dict: it has no context blocks (with_context=True "
                              "needs an MLVICX pretraining checkpoint)")
    sd = _strip_prefix(obj)
    if any(k.startswith("context.") for k in sd) and any(k.startswith("backbone.") for k in sd):
        raise EvaluationError(f"{name} looks like a bare MLVICX state_dict: save it as a pretraining checkpoint "
                              "(a dict with kind 'mlvicx-pretrain', 'model' and 'model_args') so the network "
                              "can be rebuilt")
    stem = sd.get("conv1.weight")
    chans = in_chans or (int(stem.shape[1]) if stem is not None and stem.dim() == 4 and stem.shape[1] in (1, 3) else 3)
    encoder = ResNet18(in_chans=chans)
    sd = convert_stem(sd, "", chans)
    misfit = _mismatch(encoder, sd, ignore=lambda k: k.startswith("fc."))
    if misfit:
        raise EvaluationError(f"{name} does not fit ResNet18 (torchvision names): {misfit}")
    encoder.load_state_dict(sd)
    return encoder, file, None


def build_encoder(source: str, with_context: bool = False, in_chans: Optional[int] = None, seed: int = 0,
                  backend: str = "auto") -> Tuple[nn.Module, Dict]:
    """(encoder, description). source: a checkpoint path / run folder, or 'random' (ResNet18 drawn
    from `seed`; with_context adds freshly initialised context blocks)."""
    if source == RANDOM:
        torch.manual_seed(seed)
        chans = in_chans or 3
        if with_context:
            from .models.mlvicx import MLVICX

            args = {"in_chans": chans, "dim": 8}  # the expanders are dropped: keep them small
            model = MLVICX(**args, backend=backend)
            return model.encoder(with_context=True), {"source": RANDOM, "model_args": args}
        from .models.resnet import ResNet18

        return ResNet18(in_chans=chans), {"source": RANDOM, "model_args": None}
    encoder, file, args = _load_encoder(source, with_context, in_chans, backend)
    return encoder, {"source": str(file), "model_args": args}


def encoder_in_chans(encoder: nn.Module) -> int:
    backbone = getattr(encoder, "backbone", encoder)
    return int(backbone.in_chans)


def pooled_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, 512): the last stage map, globally average-pooled (what ResNet18.forward gives)."""
    return encoder.forward_taps(x)[-1].mean(dim=(2, 3))  # a mean: deterministic backward on CUDA too


class Classifier(nn.Module):
    """Encoder + one Linear layer: logits = fc(avgpool(last stage map)). Multi-label: sigmoid per class."""

    def __init__(self, encoder: nn.Module, num_classes: int, num_features: int = 512):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(num_features, num_classes)

    def last_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_taps(x)[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.encoder, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# ================================================================================================
# prepared data
# ================================================================================================
class PreparedData:
    """A folder written by ``python -m mlvicx_fast.data.prepare``: meta.json and per-split .beton or .npy."""

    DECODE_BATCH = 256  # samples per FFCV batch when a .beton split is decoded (_decode_beton)

    def __init__(self, folder: PathLike):
        self.folder = Path(folder).expanduser()
        if not self.folder.exists():
            raise FileNotFoundError(f"data folder {str(self.folder)!r} does not exist (expected the --out folder "
                                    "of python -m mlvicx_fast.data.prepare)")
        meta = self.folder / "meta.json"
        if not meta.is_file():
            hint = sorted(p.name for p in self.folder.iterdir() if (p / "meta.json").is_file()) \
                if self.folder.is_dir() else []
            raise EvaluationError(f"{str(self.folder)!r} has no meta.json: expected the --out folder of python -m "
                                  "mlvicx_fast.data.prepare"
                                  + (f" (did you mean one of {hint} inside it?)" if hint else ""))
        with open(meta) as f:
            self.meta = json.load(f)
        self.dataset: str = self.meta["dataset"]
        self.task: str = self.meta["task"]
        self.classes: List[str] = list(self.meta["classes"])
        self.size: int = int(self.meta["size"])
        self._cache: Dict[str, Dict[str, np.ndarray]] = {}

    def n(self, split: str) -> int:
        return int(self.meta["splits"].get(split, {}).get("n", 0))

    def identity(self) -> Dict[str, Any]:
        """What makes two prepared folders the same data for paired runs: the dataset, the seed that
        drew its splits, the stored size and each split's size (not the path: a copy is the same)."""
        return {"dataset": self.dataset, "seed": self.meta.get("seed"), "size": self.size,
                "splits": {k: int(v.get("n", 0)) for k, v in sorted(self.meta["splits"].items())}}

    def has(self, split: str) -> bool:
        return self.n(split) > 0

    def split(self, split: str) -> Dict[str, np.ndarray]:
        """{'images': (N, S, S) uint8, 'labels': (N, C) uint8, 'masks': (N, S, S) uint8 (SIIM only)}."""
        if split in self._cache:
            return self._cache[split]
        if not self.has(split):
            raise EvaluationError(f"{self.folder}: split {split!r} is empty or missing (meta.json lists "
                                  f"{ {k: v.get('n', 0) for k, v in self.meta['splits'].items()} })")
        npy = self.folder / f"{split}_images.npy"
        beton = self.folder / f"{split}.beton"
        if npy.is_file():
            out = {"images": np.load(npy, mmap_mode="r"), "labels": np.load(self.folder / f"{split}_labels.npy")}
            if (self.folder / f"{split}_masks.npy").is_file():
                out["masks"] = np.load(self.folder / f"{split}_masks.npy", mmap_mode="r")
        elif beton.is_file():
            out = self._read_beton(beton)
        else:
            raise EvaluationError(f"{self.folder}: neither {npy.name} nor {beton.name} found for split {split!r}")
        self._cache[split] = out
        return out

    def _decoded_dir(self) -> Path:
        """Where decoded .beton splits are kept: <folder>/.decoded, or a per-folder cache directory
        under $XDG_CACHE_HOME (~/.cache) when the data folder is read-only."""
        here = self.folder / ".decoded"
        try:
            here.mkdir(exist_ok=True)
            if os.access(here, os.W_OK):
                return here
        except OSError:
            pass
        key = hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:16]
        there = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mlvicx_fast" / "decoded" / key
        there.mkdir(parents=True, exist_ok=True)
        return there

    def _read_beton(self, path: Path) -> Dict[str, np.ndarray]:
        """The split in file order as memory maps: the first read decodes the .beton once into .npy
        files (see _decoded_dir), batch by batch, so memory holds one batch and not the split (NIH's
        train split at 256 px is 5.7 GB); later reads map those files while the .beton is unchanged."""
        cache = self._decoded_dir()
        stat = path.stat()
        stamp = {"beton": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "format": self.meta.get("format"), "fields": self.meta.get("fields")}
        stamp_file = cache / f"{path.stem}.json"
        files = {k: cache / f"{path.stem}_{k}.npy" for k in ("images", "labels", "masks")}
        try:
            ok = json.loads(stamp_file.read_text()) == stamp
        except (OSError, ValueError):
            ok = False
        if not ok:
            stamp_file.unlink(missing_ok=True)  # a decode that stops half-way leaves no valid stamp
            self._decode_beton(path, files)
            stamp_file.write_text(json.dumps(stamp))
        out = {"images": np.load(files["images"], mmap_mode="r"), "labels": np.load(files["labels"])}
        if files["masks"].is_file():
            out["masks"] = np.load(files["masks"], mmap_mode="r")
        return out

    def _decode_beton(self, path: Path, files: Dict[str, Path]) -> None:
        from .data.loader import keep_torch_threads

        try:
            with keep_torch_threads():
                from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
                from ffcv.loader import Loader, OrderOption
        except ImportError:
            raise EvaluationError(f"{path} is an FFCV file and ffcv is not installed; prepare with --format npy "
                                  "or install ffcv (bash scripts/setup.sh)") from None
        jpg = self.meta.get("format") == "jpg"
        pipes = {"image": [SimpleRGBImageDecoder() if jpg else NDArrayDecoder()], "labels": [NDArrayDecoder()],
                 "index": [IntDecoder()]}
        fields = list(self.meta.get("fields", ["image", "labels", "index"]))
        has_mask = "mask" in fields
        if has_mask:
            pipes["mask"] = [NDArrayDecoder()]
        with keep_torch_threads():
            loader = Loader(str(path), batch_size=self.DECODE_BATCH,
                            num_workers=max(1, min(4, os.cpu_count() or 1)),
                            order=OrderOption.SEQUENTIAL, drop_last=False, pipelines=pipes)
        n, size = len(loader.indices), self.size
        tmp = {k: f.with_name(f"{f.name}.{os.getpid()}.part") for k, f in files.items()}  # one per process
        images = np.lib.format.open_memmap(tmp["images"], mode="w+", dtype=np.uint8, shape=(n, size, size))
        masks = (np.lib.format.open_memmap(tmp["masks"], mode="w+", dtype=np.uint8, shape=(n, size, size))
                 if has_mask else None)
        try:
            labels: List[np.ndarray] = []
            at = 0
            with keep_torch_threads():
                batches = iter(loader)
            for batch in progress_bar(batches, total=math.ceil(n / self.DECODE_BATCH), desc=f"decoding {path.name}",
                                      unit="batch", leave=False, disable=n < 4096):
                got = dict(zip(fields, batch))
                img = np.asarray(got["image"])
                if img.ndim == 4:
                    img = img[..., 0]
                images[at:at + len(img)] = img
                if masks is not None:
                    masks[at:at + len(img)] = np.asarray(got["mask"]).reshape(len(img), size, size)
                labels.append(np.asarray(got["labels"]).astype(np.uint8))
                at += len(img)
            if at != n:
                raise EvaluationError(f"{path}: decoded {at} samples, expected {n}")
            with open(tmp["labels"], "wb") as f:  # np.save would append .npy to a '.part' name
                np.save(f, np.concatenate(labels) if labels else np.zeros((0, len(self.classes)), np.uint8))
            del images, masks  # flush the memory maps before the files are renamed
            for k, part in tmp.items():
                if part.is_file():
                    os.replace(part, files[k])
                else:
                    files[k].unlink(missing_ok=True)
        finally:  # a decode that fails (or is interrupted) leaves no partial files behind
            for part in tmp.values():
                part.unlink(missing_ok=True)


def label_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of round(fraction/100 * n) (at least 1) of n training images: the first ones of
    a permutation drawn by `seed`, so one seed's subsets are nested (1 % in 10 % in 30 %), the same
    rows as the data loader's label fractions. fraction is in percent; 100 keeps every image."""
    if not 0 < fraction <= 100:
        raise EvaluationError(f"label fraction must be in (0, 100] percent, got {fraction}")
    if fraction >= 100:
        return np.arange(n)
    k = max(1, int(round(fraction / 100.0 * n)))
    return np.sort(np.random.default_rng(seed).permutation(n)[:k])


def to_input(images: np.ndarray, in_chans: int, device: torch.device, size: Optional[int] = None) -> torch.Tensor:
    """uint8 (N, H, W) -> float (N, in_chans, size, size), [0, 1] then ImageNet-normalised."""
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # a memmap row: torch wants a writable buffer
        images = images.copy()
    x = upload(torch.from_numpy(images), device)  # uint8 over the bus, converted there
    x = x.to(dtype=torch.float32).div_(255.0)[:, None]
    if size is not None and (x.shape[-2] != size or x.shape[-1] != size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # per channel with Python numbers: no small host-to-device copies per batch
    return torch.cat([(x - m) / s for m, s in zip(IMAGENET_MEAN[:in_chans], IMAGENET_STD[:in_chans])], dim=1)


def masks_input(masks: np.ndarray, device: torch.device, size: Optional[int] = None) -> torch.Tensor:
    masks = np.array(masks, copy=True) if not np.asarray(masks).flags.writeable else np.ascontiguousarray(masks)
    m = upload(torch.from_numpy(masks), device).to(dtype=torch.float32)[:, None]
    if size is not None and (m.shape[-2] != size or m.shape[-1] != size):
        m = F.interpolate(m, size=(size, size), mode="nearest-exact")  # at pixel centres, as the image
    return (m > 0).float()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvaluationError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} asked for but CUDA is not available")
    return dev


def _batches(n: int, batch: int, perm: Optional[torch.Tensor] = None, min_last: int = 1):
    """Index batches (numpy, sorted within a batch for memmap reads); a last batch smaller than
    min_last is dropped (BatchNorm cannot train on a single sample)."""
    order = perm.numpy() if perm is not None else np.arange(n)
    for a in range(0, n, batch):
        idx = order[a:a + batch]
        if len(idx) < min_last and a > 0:
            break
        yield np.sort(idx)


# ================================================================================================
# classification
# ================================================================================================
@torch.no_grad()
def extract_features(encoder: nn.Module, images: np.ndarray, rows: np.ndarray, in_chans: int, device, batch: int,
                     size: Optional[int], progress: bool = False, desc: str = "features") -> torch.Tensor:
    """(len(rows), 512) pooled features of images[rows] by the encoder in eval mode (CPU float32)."""
    encoder.eval()
    out = torch.empty(len(rows), 512)
    for a in progress_bar(range(0, len(rows), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        idx = rows[a:a + batch]
        out[a:a + len(idx)] = pooled_features(encoder, to_input(images[idx], in_chans, device, size)).float().cpu()
    return out


@torch.no_grad()
def _predict(forward: Callable[[np.ndarray], torch.Tensor], n: int, batch: int) -> np.ndarray:
    """The logits (float32). AUC ranks them, not their sigmoids: float32 sigmoids saturate to
    exactly 0 or 1 (sigmoid(17) == sigmoid(20) == 1.0), and a confident model's ties bias AUC."""
    parts = [forward(np.arange(a, min(n, a + batch))).float().cpu() for a in range(0, n, batch)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0), dtype=np.float32)


def _probabilities(logits: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # the sigmoid, without overflow warnings

    return expit(np.asarray(logits, dtype=np.float64))


def _score_cls(labels: np.ndarray, logits: np.ndarray, classes: Sequence[str], binary: bool) -> Dict:
    if not np.isfinite(logits).all():  # a run that diverged from its first epoch: no score, not a crash
        return {"per_class_auc": {c: None for c in classes}, "mean_auc": None, "defined_classes": 0,
                "accuracy": None, "diverged": True}
    table = auc_table(labels, logits, classes)  # AUC is the same for any increasing map of the scores
    out = {"per_class_auc": table["per_class"], "mean_auc": table["mean"], "defined_classes": table["defined"]}
    out["accuracy"] = accuracy(labels, _probabilities(logits)) if binary else None
    return out


def train_classifier(model: nn.Module, train_x, train_y: np.ndarray, val_x, val_y: np.ndarray, *,
                     prepare: Callable, classes: Sequence[str], batch: int, lr: float, epochs: int,
                     patience: int, seed: int, device, eval_batch: int, progress: bool = False,
                     desc: str = "train", train_loader=None) -> Dict:
    """Adam + BCE on (train_x, train_y) with early stopping on validation mean AUC; the model ends
    holding its best epoch's weights. prepare(x, idx) -> input batch on device. train_loader, when
    given, replaces (train_x, train_y): an iterable of (inputs, labels) batches, one pass per epoch
    (the data loader's augmented batches). Returns the history."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    stopper = EarlyStopping(patience)
    yt = torch.from_numpy(np.asarray(train_y, dtype=np.float32))
    best_state, history, criterion = None, [], None
    n = len(yt)
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        total, seen = torch.zeros((), device=device), 0  # summed on the device: no host sync per step
        perm = torch.randperm(n, generator=g)  # drawn every epoch, so the loader does not shift the seeds
        batches = ((prepare(train_x, idx), upload(yt[idx], device)) for idx in _batches(n, batch, perm, min_last=2)) \
            if train_loader is None else ((x.float(), y.float()) for x, y in train_loader if len(y) > 1)
        for inputs, targets in batches:
            logits = model(inputs)
            loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(targets)
            seen += len(targets)
        total = float(total)
        model.eval()
        logits = _predict(lambda i: model(prepare(val_x, i)), len(val_y), eval_batch)
        if np.isfinite(logits).all():
            val = auc_table(val_y, logits, classes)
            val_loss = float(F.binary_cross_entropy_with_logits(torch.from_numpy(logits).double(),
                                                               torch.from_numpy(np.asarray(val_y, dtype=np.float64))))
            score = val["mean"] if val["mean"] is not None else -val_loss  # no defined class: lower loss is better
            criterion = "mean_auc" if val["mean"] is not None else "-val_loss"
        else:  # diverged (NaN outputs): never the best epoch
            val, val_loss, score = {"mean": None}, None, None
        if stopper.step(score):
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                        "val_mean_auc": val["mean"]})
        bar.set_postfix(refresh=False, loss=f"{total / max(seen, 1):.3f}",
                        val_auc="—" if val["mean"] is None else f"{val['mean']:.3f}")
        if stopper.stop:
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    # best_val is a mean AUC, or minus the validation loss when no validation class has both labels
    return {"history": history, "best_epoch": stopper.best_epoch, "best_val": stopper.best,
            "best_val_criterion": criterion, "epochs_run": len(history)}


def _method_name(spec: str) -> Tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'random' -> ('Random init', 'random'); 'PATH' -> (a name from PATH, PATH)."""
    # NAME=PATH unless the spec is itself a path (a name has no '/': 'runs/a=b' is one path)
    if "=" in spec and not Path(spec).exists() and "/" not in spec.split("=", 1)[0]:
        name, source = spec.split("=", 1)
        if not name or not source:
            raise EvaluationError(f"--ckpt {spec!r}: expected NAME=PATH, PATH or 'random'")
        return name, source
    if spec == RANDOM:
        return RANDOM_NAME, RANDOM
    p = Path(spec)
    if p.parent.name == "checkpoints":  # RUN/checkpoints/ckpt-*.pt -> RUN
        name = p.parent.parent.name
    elif p.name == "final.pt" or re.match(r"ckpt-\d+\.pt$", p.name):  # RUN/final.pt -> RUN
        name = p.parent.name
    else:  # a run folder, or another file: its name without the suffix
        name = p.stem if p.is_file() else p.name
    return name or spec, spec


def _normalise_methods(methods) -> List[Tuple[str, str]]:
    if isinstance(methods, Mapping):
        pairs = [(str(k), str(v)) for k, v in methods.items()]
    else:
        pairs = [_method_name(str(m)) for m in methods]
    if not pairs:
        raise EvaluationError("no method to evaluate: give at least one --ckpt (a checkpoint, a run folder "
                              "or 'random')")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise EvaluationError(f"method names must differ, got {names}; name them with NAME=PATH")
    slugs = [_slug(n) for n in names]  # the saved models' file names
    if len(set(slugs)) != len(slugs):
        raise EvaluationError(f"method names must differ in their letters, digits, '.', '_' and '-' (they name "
                              f"the saved models' files), got {names}")
    for _, source in pairs:
        if source != RANDOM:
            resolve_checkpoint(source)  # fail before any training
    return pairs


def _settings(dataset: str, protocol: str, batch: Optional[int], lr: Optional[float]) -> Tuple[int, float]:
    """(batch, lr): the given ones, else the paper's for the dataset (NIH's for a dataset the
    paper does not use)."""
    d = DEFAULTS.get(dataset, DEFAULTS["nih"])
    batch = d["batch"] if batch is None else batch
    lr = d["lr"][protocol] if lr is None else lr
    if batch < 2 or not lr > 0:
        raise EvaluationError(f"--batch must be >= 2 (batch norm) and --lr > 0, got {batch} and {lr}")
    return int(batch), float(lr)


def _versions() -> Dict[str, str]:
    import mlvicx_fast

    return {"mlvicx_fast": getattr(mlvicx_fast, "__version__", "?"), "torch": torch.__version__}



def _check_protocols_and_epochs(protocols, epochs: int, patience: int, seeds: Sequence[int] = ()) -> None:
    """Before any work (features are extracted before the first epoch)."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise EvaluationError(f"unknown protocol {p!r}; expected one of {PROTOCOLS}")
    # a protocol or seed named twice would record its runs twice: the table would average copies
    # (a spread of 0 over "two seeds") and compare would pair one of them
    if len(set(protocols)) != len(protocols):
        raise EvaluationError(f"--protocol: {' '.join(protocols)} names a protocol twice")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise EvaluationError(f"--seeds: a seed must be an integer >= 0, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise EvaluationError(f"--seeds: {' '.join(map(str, seeds))} names a seed twice (its runs would "
                              "count as two in the table and one in compare)")
    if epochs < 1:
        raise EvaluationError(f"epochs must be >= 1, got {epochs}")
    if patience < 1:
        raise EvaluationError(f"patience must be >= 1 epoch, got {patience}")

def _check_subset_sizes(n_train: int, fractions: Sequence[float], what: str) -> None:
    """A run that trains BatchNorm (fine-tuning, the U-Net) needs label subsets of at least two
    images: one image cannot be a training batch (BatchNorm's statistics need two values)."""
    for f in fractions:
        k = len(label_subset(n_train, f, 0))  # the size does not depend on the seed
        if k < 2:
            raise EvaluationError(f"--fractions {f:g} keeps {k} of the {n_train} training images; {what} needs at "
                                  "least 2 (BatchNorm trains on batches of 2 or more): name larger fractions with "
                                  "--fractions")


def run_cls(data: PathLike, methods, protocols: Sequence[str] = ("frozen",), fractions: Sequence[float] = CLS_FRACTIONS,
            seeds: Sequence[int] = (0, 1, 2), *, with_context: bool = False, in_chans: Optional[int] = None,
            batch: Optional[int] = None, lr: Optional[float] = None, epochs: int = 100, patience: int = 10,
            image_size: Optional[int] = None, device: str = "auto", out: Optional[PathLike] = None,
            save_models: bool = False, augment: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> Dict:
    """Classification runs for every (method, protocol, fraction, seed); returns the results dict
    (also written as OUT/results.json, OUT/table.md and OUT/plot.png when out is given).
    augment: fine-tune on the data loader's random-resized-crop + flip batches
    (``mlvicx_fast.data.loader``, mode 'classify', same label subsets) instead of whole images.

    methods: {name: checkpoint path | run folder | 'random'} or a list of specs 'NAME=PATH', 'PATH',
    'random'. fractions in percent. batch / lr default to the paper's per dataset (see DEFAULTS).
    """
    prepared = PreparedData(data)
    if prepared.task not in ("multilabel", "binary"):
        raise EvaluationError(f"{prepared.folder} holds a {prepared.task!r} dataset ({prepared.dataset}); "
                              "evaluate cls needs NIH, VinBig or RSNA (use evaluate seg for SIIM)")
    _check_protocols_and_epochs(protocols, epochs, patience, seeds)
    pairs = _normalise_methods(methods)
    fractions = [float(f) for f in fractions]
    for f in fractions:
        label_subset(1, f, 0)  # validates the range
    dev = pick_device(device)
    binary = prepared.task == "binary"
    classes = prepared.classes
    train, val = prepared.split("train"), prepared.split("val")
    test_split = "test" if prepared.has("test") else "val"
    if test_split == "val":
        log(f"note: {prepared.folder} has no test split; the best epoch is scored on val, the split that chose "
            "it, so the score is biased upwards")
    test = prepared.split(test_split)
    n_train = len(train["labels"])
    if "finetune" in protocols:
        _check_subset_sizes(n_train, fractions, "fine-tuning")
    subsets = {(f, s): label_subset(n_train, f, s) for f in fractions for s in seeds}
    size = image_size
    config = {"data": str(prepared.folder), "prepared": prepared.identity(), "dataset": prepared.dataset,
              "task": prepared.task, "protocols": list(protocols), "fractions": fractions, "seeds": list(seeds),
              "with_context": with_context,
              "in_chans": in_chans, "epochs": epochs, "patience": patience, "image_size": image_size or prepared.size,
              "device": str(dev), "optimizer": "Adam", "test_split": test_split, "augment_finetune": augment,
              "settings": {p: dict(zip(("batch", "lr"), _settings(prepared.dataset, p, batch, lr))) for p in protocols}}
    results = {"kind": "mlvicx-eval", "task": "cls", "dataset": prepared.dataset, "classes": classes,
               "metric": "accuracy" if binary else "mean_auc", "config": config, "methods": [n for n, _ in pairs],
               "runs": [], "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "versions": _versions()}
    out_dir = Path(out) if out is not None else None
    for name, source in pairs:
        base, info = build_encoder(source, with_context, in_chans, seed=0)
        chans = encoder_in_chans(base)
        for protocol in protocols:
            bs, rate = _settings(prepared.dataset, protocol, batch, lr)
            cache: Dict[str, Any] = {}
            if protocol == "frozen" and source != RANDOM:
                base.to(dev)
                need = np.unique(np.concatenate(list(subsets.values())))
                t0 = time.perf_counter()
                cache["train"] = torch.zeros(n_train, 512)
                cache["train"][need] = extract_features(base, train["images"], need, chans, dev, 2 * bs, size,
                                                        progress, f"{name}: train features")
                cache["val"] = extract_features(base, val["images"], np.arange(len(val["labels"])), chans, dev,
                                                2 * bs, size, progress, f"{name}: val features")
                cache["test"] = extract_features(base, test["images"], np.arange(len(test["labels"])), chans, dev,
                                                 2 * bs, size, progress, f"{name}: test features")
                cache["seconds"] = time.perf_counter() - t0
            for fraction in fractions:
                for seed in seeds:
                    t0 = time.perf_counter()
                    rows = subsets[(fraction, seed)]
                    if source == RANDOM:  # a fresh random encoder per seed
                        encoder, _ = build_encoder(RANDOM, with_context, chans, seed=seed)
                    else:
                        encoder = copy.deepcopy(base)
                    torch.manual_seed(seed)
                    model = Classifier(encoder, len(classes)).to(dev)
                    desc = f"{name} {protocol} {fraction:g}% seed {seed}"
                    if protocol == "frozen":
                        model.encoder.eval()
                        for p in model.encoder.parameters():
                            p.requires_grad_(False)
                        if source == RANDOM:  # this seed's own random encoder: its features, once per seed
                            if seed not in cache:
                                need = np.unique(np.concatenate([subsets[(f, seed)] for f in fractions]))
                                cache[seed] = {k: extract_features(model.encoder, d["images"],
                                                                   np.arange(len(d["labels"])), chans, dev, 2 * bs,
                                                                   size) for k, d in (("val", val), ("test", test))}
                                cache[seed]["train"] = torch.zeros(n_train, 512)
                                cache[seed]["train"][need] = extract_features(model.encoder, train["images"], need,
                                                                              chans, dev, 2 * bs, size)
                            feats = cache[seed]
                            train_feats = feats["train"][rows]
                        else:
                            feats = cache
                            train_feats = cache["train"][rows]
                        head = model.fc

                        def prep(x, idx):
                            return upload(x[torch.from_numpy(idx)], dev)
                        hist = train_classifier(head, train_feats, train["labels"][rows], feats["val"], val["labels"],
                                                prepare=prep, classes=classes, batch=bs, lr=rate, epochs=epochs,
                                                patience=patience, seed=seed, device=dev, eval_batch=4096,
                                                progress=progress, desc=desc)
                        logits = _predict(lambda i: head(prep(feats["test"], i)), len(test["labels"]), 4096)
                    else:
                        def prep(x, idx):
                            return to_input(x[idx], chans, dev, size)
                        sub_images = _Rows(train["images"], rows)
                        loader = None
                        if augment:
                            from .data.loader import make_loader

                            loader = make_loader(prepared.folder, split="train", mode="classify", batch_size=bs,
                                                 size=image_size or prepared.size, device=dev, seed=seed,
                                                 fraction=fraction / 100.0, fraction_seed=seed, channels=chans,
                                                 out_dtype=torch.float32)
                        hist = train_classifier(model, sub_images, train["labels"][rows], val["images"], val["labels"],
                                                prepare=prep, classes=classes, batch=bs, lr=rate, epochs=epochs,
                                                patience=patience, seed=seed, device=dev, eval_batch=2 * bs,
                                                progress=progress, desc=desc, train_loader=loader)
                        logits = _predict(lambda i: model(prep(test["images"], i)), len(test["labels"]), 2 * bs)
                    scores = _score_cls(test["labels"], logits, classes, binary)
                    run = {"method": name, "checkpoint": info["source"], "protocol": protocol, "fraction": fraction,
                           "seed": seed, "n_train": int(len(rows)), "batch": bs, "lr": rate,
                           "metric": results["metric"],
                           "score": scores["accuracy"] if binary else scores["mean_auc"], **scores,
                           "eval_split": test_split, "best_epoch": hist["best_epoch"], "epochs_run": hist["epochs_run"],
                           "val_best": hist["best_val"], "val_criterion": hist["best_val_criterion"],
                           "history": hist["history"],
                           # the features' time shared out over the runs that use them
                           "seconds": round(time.perf_counter() - t0
                                            + cache.get("seconds", 0.0) / max(1, len(subsets)), 2)}
                    if save_models and out_dir is not None:
                        path = out_dir / "models" / f"{_slug(name)}-{protocol}-{fraction:g}pct-seed{seed}.pt"
                        save_classifier(path, model, info, classes, prepared, protocol, fraction, seed, with_context,
                                        image_size or prepared.size)
                        run["model_file"] = str(path)
                    results["runs"].append(run)
                    ms = "—" if run["score"] is None else f"{run['score']:.4f}"
                    if out_dir is not None:  # keep what has run so far if a later run is stopped
                        write_json(results, out_dir / "results.json")
                    log(f"{desc}: {test_split} {results['metric']} {ms} (best epoch {hist['best_epoch']}, "
                        f"{hist['epochs_run']} epochs, {run['seconds']:.1f} s)")
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def linear_probe(data: PathLike, methods, fraction: float = 10.0, seeds: Sequence[int] = (0, 1, 2), **kwargs) -> Dict:
    """The frozen linear probe at one label fraction for several encoders (the built-in demonstration's
    evaluation half): ``run_cls(data, methods, protocols=("frozen",), fractions=(fraction,), ...)``.
    methods as in run_cls, e.g. {"MLVICX": "runs/demo", "Random init": "random"}; other keyword
    arguments go to run_cls (epochs, patience, image_size, out, progress, ...). Print
    ``format_table(result)``; ``mean_scores(result)`` gives the numbers to check."""
    return run_cls(data, methods, protocols=("frozen",), fractions=(fraction,), seeds=seeds, **kwargs)


def mean_scores(results: Dict) -> Dict[str, Dict[str, Dict[float, Optional[float]]]]:
    """{method: {protocol: {fraction: mean score over seeds (None when no run has one)}}}: mean test
    AUC (accuracy for RSNA, Dice for seg), as in the '... by label fraction' table."""
    out: Dict[str, Dict[str, Dict[float, Optional[float]]]] = {}
    for r in results["runs"]:
        out.setdefault(r["method"], {}).setdefault(r["protocol"], {}).setdefault(float(r["fraction"]), [])
        out[r["method"]][r["protocol"]][float(r["fraction"])].append(r["score"])
    return {m: {p: {f: mean_or_none(v) for f, v in fr.items()} for p, fr in pr.items()} for m, pr in out.items()}


class _Rows:
    """images[rows[idx]] without copying the subset up front."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, idx):
        return self.images[self.rows[idx]]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "method"


def save_classifier(path: Path, model: Classifier, info: Dict, classes, prepared: PreparedData, protocol: str,
                    fraction: float, seed: int, with_context: bool, image_size: int) -> Path:
    from .checkpoint import atomic_save

    state = {"kind": "mlvicx-classifier", "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
             "classes": list(classes), "dataset": prepared.dataset, "task": prepared.task,
             "with_context": with_context, "model_args": info.get("model_args"),
             "in_chans": encoder_in_chans(model.encoder), "image_size": int(image_size), "source": info["source"],
             "protocol": protocol, "fraction": fraction, "seed": seed}
    return atomic_save(state, path)


def load_classifier(path: PathLike, backend: str = "auto") -> Tuple[Classifier, Dict]:
    """A classifier written by ``evaluate cls --save-models`` (kind 'mlvicx-classifier')."""
    from .models.mlvicx import MLVICX
    from .models.resnet import ResNet18

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"classifier {str(path)!r} does not exist (write one with evaluate cls --save-models)")
    obj = _read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("kind") != "mlvicx-classifier":
        kind = obj.get("kind") if isinstance(obj, Mapping) else type(obj).__name__
        raise EvaluationError(f"{path}: kind {kind!r}; expected an 'mlvicx-classifier' written by "
                              "evaluate cls --save-models")
    args = obj.get("model_args")
    if obj["with_context"]:
        args = dict(args or {})
        args.update(in_chans=obj["in_chans"], dim=8)  # only the encoder is kept: small expanders
        encoder = MLVICX(**args, backend=backend).encoder(with_context=True)
    else:
        encoder = ResNet18(in_chans=obj["in_chans"])
    model = Classifier(encoder, len(obj["classes"]))
    misfit = _mismatch(model, obj["state_dict"])
    if misfit:
        raise EvaluationError(f"{path}: weights do not fit the classifier they describe: {misfit}")
    model.load_state_dict(obj["state_dict"])
    model.eval()
    return model, obj


# ================================================================================================
# segmentation
# ================================================================================================
def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


@torch.no_grad()
def _seg_dice(model: nn.Module, images, masks, chans: int, dev, batch: int, size: Optional[int]) -> Dict[str, float]:
    """Dice of the thresholded U-Net output over a split: 'dice' pooled over every pixel of the
    split, 2 sum|P∩T| / (sum|P| + sum|T|) (an empty prediction scores 0, not 1), 'dice_image' the
    mean per-image Dice (empty/empty = 1, the SIIM-ACR challenge convention), 'dice_positive' the
    mean per-image Dice over the images whose mask is not empty."""
    model.eval()
    inter = total = 0.0
    per, pos = [], []
    for idx in _batches(len(masks), batch):
        pred = (model(to_input(images[idx], chans, dev, size)) > 0).cpu()
        target = masks_input(masks[idx], torch.device("cpu"), size) > 0
        inter += float((pred & target).sum())
        total += float(pred.sum() + target.sum())
        per.append(dice_per_image(pred, target))
        pos.append(target.flatten(1).any(1))
    per_t, pos_t = torch.cat(per), torch.cat(pos)
    return {"dice": 2 * inter / total if total > 0 else 1.0, "dice_image": float(per_t.mean()),
            "dice_positive": float(per_t[pos_t].mean()) if pos_t.any() else None}


def run_seg(data: PathLike, methods, protocols: Sequence[str] = ("frozen", "finetune"),
            fractions: Sequence[float] = SEG_FRACTIONS, seeds: Sequence[int] = (0, 1, 2), *, with_context: bool = False,
            in_chans: Optional[int] = None, batch: Optional[int] = None, lr: Optional[float] = None, epochs: int = 100,
            patience: int = 10, image_size: Optional[int] = None, device: str = "auto",
            out: Optional[PathLike] = None, progress: bool = True, log: Callable[[str], None] = print) -> Dict:
    """U-Net segmentation runs on prepared SIIM-ACR data; same arguments and outputs as run_cls.
    Score: Dice pooled over the evaluation split's pixels, of the best validation epoch (early
    stopping on it); per-image and positive-only Dice are recorded too (see `_seg_dice`)."""
    from .models.unet import UNet

    prepared = PreparedData(data)
    if prepared.task != "segmentation":
        raise EvaluationError(f"{prepared.folder} holds a {prepared.task!r} dataset ({prepared.dataset}); "
                              "evaluate seg needs prepared SIIM-ACR masks")
    _check_protocols_and_epochs(protocols, epochs, patience, seeds)
    if image_size is not None and image_size % 32:
        raise EvaluationError(f"--image-size must be a multiple of 32 for the U-Net, got {image_size}")
    pairs = _normalise_methods(methods)
    fractions = [float(f) for f in fractions]
    for f in fractions:
        label_subset(1, f, 0)
    dev = pick_device(device)
    train, val = prepared.split("train"), prepared.split("val")
    has_test = prepared.has("test") and "masks" in prepared.split("test")
    if not has_test:
        log(f"note: {prepared.folder} has no test split (prepared before SIIM got one?); the best epoch is "
            "scored on val, the split that chose it, so the Dice is biased upwards")
    test = prepared.split("test") if has_test else val
    size = image_size
    n_train = len(train["labels"])
    _check_subset_sizes(n_train, fractions, "the U-Net")
    config = {"data": str(prepared.folder), "prepared": prepared.identity(), "dataset": prepared.dataset,
              "task": "segmentation", "protocols": list(protocols), "fractions": fractions, "seeds": list(seeds),
              "with_context": with_context,
              "in_chans": in_chans, "epochs": epochs, "patience": patience, "image_size": image_size or prepared.size,
              "device": str(dev), "optimizer": "Adam", "loss": "BCE + soft Dice",
              "test_split": "test" if has_test else "val",
              "settings": {p: dict(zip(("batch", "lr"), _settings("siim", p, batch, lr))) for p in protocols}}
    results = {"kind": "mlvicx-eval", "task": "seg", "dataset": prepared.dataset, "classes": ["Dice"],
               "metric": "dice", "config": config, "methods": [n for n, _ in pairs], "runs": [],
               "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": _versions()}
    for name, source in pairs:
        base, info = build_encoder(source, with_context, in_chans, seed=0)
        chans = encoder_in_chans(base)
        for protocol in protocols:
            bs, rate = _settings("siim", protocol, batch, lr)
            for fraction in fractions:
                for seed in seeds:
                    t0 = time.perf_counter()
                    rows = label_subset(n_train, fraction, seed)
                    encoder = build_encoder(RANDOM, with_context, chans, seed=seed)[0] if source == RANDOM \
                        else copy.deepcopy(base)
                    torch.manual_seed(seed)
                    model = UNet(encoder).to(dev)
                    if protocol == "frozen":
                        model.freeze_encoder()
                    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=rate)
                    g = torch.Generator().manual_seed(seed)
                    stopper = EarlyStopping(patience)
                    best_state, history = None, []
                    desc = f"{name} {protocol} {fraction:g}% seed {seed}"
                    bar = progress_bar(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False)
                    for epoch in bar:
                        model.train()
                        total, seen = torch.zeros((), device=dev), 0  # on the device: no sync per step
                        for idx in _batches(len(rows), bs, torch.randperm(len(rows), generator=g), min_last=2):
                            x = to_input(train["images"][rows[idx]], chans, dev, size)
                            y = masks_input(train["masks"][rows[idx]], dev, size)
                            logits = model(x)
                            loss = F.binary_cross_entropy_with_logits(logits, y) + soft_dice_loss(logits, y)
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            total += loss.detach() * len(idx)
                            seen += len(idx)
                        total = float(total)
                        d = _seg_dice(model, val["images"], val["masks"], chans, dev, bs, size)["dice"]
                        if stopper.step(d):
                            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_dice": d})
                        bar.set_postfix(refresh=False, loss=f"{total / max(seen, 1):.3f}", val_dice=f"{d:.3f}")
                        if stopper.stop:
                            break
                    bar.close()
                    if best_state is not None:
                        model.load_state_dict(best_state)
                    final = _seg_dice(model, test["images"], test["masks"], chans, dev, bs, size)
                    score = final["dice"]
                    run = {"method": name, "checkpoint": info["source"], "protocol": protocol, "fraction": fraction,
                           "seed": seed, "n_train": int(len(rows)), "batch": bs, "lr": rate, "metric": "dice",
                           "score": score, **final, "val_best": stopper.best,
                           "eval_split": "test" if has_test else "val", "best_epoch": stopper.best_epoch,
                           "epochs_run": len(history), "history": history,
                           "seconds": round(time.perf_counter() - t0, 2)}
                    results["runs"].append(run)
                    if out is not None:
                        write_json(results, Path(out) / "results.json")
                    log(f"{desc}: {run['eval_split']} Dice {'—' if score is None else f'{score:.4f}'} "
                        f"(best epoch {stopper.best_epoch}, {len(history)} epochs, {run['seconds']:.1f} s)")
    if out is not None:
        write_outputs(results, Path(out))
    return results


# ================================================================================================
# tables, plots, JSON
# ================================================================================================
def _clean(obj):
    """NaN/inf -> None, numpy scalars -> Python, recursively (so the JSON is strict)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _rows_of(results: Dict) -> List[Tuple[str, str]]:
    """(method, protocol) rows in the order they ran."""
    seen: List[Tuple[str, str]] = []
    for r in results["runs"]:
        key = (r["method"], r["protocol"])
        if key not in seen:
            seen.append(key)
    return seen


def _runs_of(results: Dict, method: str, protocol: str, fraction: float) -> List[Dict]:
    key = (method, protocol, float(fraction))
    return [r for r in results["runs"] if (r["method"], r["protocol"], float(r["fraction"])) == key]


def _fractions_of(results: Dict) -> List[float]:
    return sorted({float(r["fraction"]) for r in results["runs"]})


def _label(method: str, protocol: str, several_protocols: bool) -> str:
    return f"{method} ({protocol})" if several_protocols else method


def format_table(results: Dict) -> str:
    """Markdown: per label fraction a table laid out like the paper's Table I (rows = methods,
    columns = classes and the mean; mean ± std over seeds, '—' where undefined), then the mean
    score of every method by label fraction."""
    rows = _rows_of(results)
    several = len({p for _, p in rows}) > 1
    fractions = _fractions_of(results)
    metric = results.get("metric", "score")
    split = results["config"].get("test_split", "test")
    title = f"{results.get('dataset', '?').upper()} — {results['task']} ({split} split; mean ± std over seeds)"
    lines = [f"# {title}", ""]
    if results["task"] == "cls":
        classes = results["classes"]
        binary = metric == "accuracy"
        for f in fractions:
            n_seeds = len({r["seed"] for r in results["runs"] if r["fraction"] == f})
            lines += [f"## {f:g}% labels ({n_seeds} seed{'s' if n_seeds != 1 else ''}), AUC", ""]
            head = ["Method"] + list(classes) + ["Mean AUC"] + (["Accuracy"] if binary else [])
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for method, protocol in rows:
                runs = _runs_of(results, method, protocol, f)
                if not runs:
                    continue
                cells = [_label(method, protocol, several)]
                cells += [mean_std_cell([r["per_class_auc"].get(c) for r in runs]) for c in classes]
                cells.append(mean_std_cell([r["mean_auc"] for r in runs]))
                if binary:
                    cells.append(mean_std_cell([r["accuracy"] for r in runs]))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    name = {"mean_auc": "Mean AUC", "accuracy": "Accuracy",
            # not the challenge's per-image Dice (empty/empty = 1): numbers differ from papers that use it
            "dice": "Dice (pooled over the split's pixels)"}.get(metric, metric)
    lines += [f"## {name} by label fraction", ""]
    head = ["Method"] + [f"{f:g}%" for f in fractions]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, protocol in rows:
        cells = [_label(method, protocol, several)]
        for f in fractions:
            cells.append(mean_std_cell([r["score"] for r in _runs_of(results, method, protocol, f)]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_results(results: Dict, path: PathLike) -> Path:
    """Score against label fraction (log axis), one line per method and protocol, ± std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    several = len({p for _, p in _rows_of(results)}) > 1
    for method, protocol in _rows_of(results):
        xs, ys, es = [], [], []
        for f in _fractions_of(results):
            v = [r["score"] for r in _runs_of(results, method, protocol, f) if r["score"] is not None]
            if v:
                xs.append(f)
                ys.append(float(np.mean(v)))
                es.append(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=_label(method, protocol, several))
    ax.set_xscale("log")
    fr = _fractions_of(results)
    ax.set_xticks(fr)
    ax.set_xticklabels([f"{f:g}%" for f in fr])
    ax.set_xlabel("labelled training images")
    ax.set_ylabel({"mean_auc": "mean AUC", "accuracy": "accuracy", "dice": "Dice"}.get(results["metric"], "score"))
    ax.set_title(f"{results.get('dataset', '?')} {results['task']}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run has a score", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _json_kind(path: Path) -> Optional[str]:
    """The "kind" of a JSON file, or None (not JSON, or no kind)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj.get("kind") if isinstance(obj, dict) else None


def write_json(obj: Dict, path: Path) -> Path:
    """Strict JSON (NaN -> null) written through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1, allow_nan=False)
    os.replace(tmp, path)
    return path


def write_outputs(results: Dict, out: Path) -> Dict[str, Path]:
    """OUT/results.json (strict JSON, undefined = null), OUT/table.md, OUT/plot.png."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "results.json", "table": out / "table.md", "plot": out / "plot.png"}
    write_json(results, files["json"])
    files["table"].write_text(format_table(results))
    plot_results(results, files["plot"])
    return files


def read_results(path: PathLike) -> Dict:
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"results file {str(path)!r} does not exist (expected the results.json written by "
                                "evaluate cls or evaluate seg)")
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict) or obj.get("kind") != "mlvicx-eval" or "runs" not in obj:
        raise EvaluationError(f"{path} is not an evaluation result (expected kind 'mlvicx-eval' with 'runs')")
    return obj


# the evaluation settings two results must share for their runs to pair: the same test images
# (else an error) and the same training recipe (else a note beside the comparison or table)
SAME_DATA = ("prepared", "test_split")
SAME_RECIPE = ("image_size", "epochs", "patience", "with_context", "in_chans", "augment_finetune", "settings")


def setting_differences(a: Dict, b: Dict, a_name: str, b_name: str) -> List[str]:
    """Notes on the recipe settings where two results differ; EvaluationError when their data
    differs (results written before configs held the data's identity are compared by path)."""
    ca, cb = a.get("config", {}), b.get("config", {})
    data_keys = SAME_DATA if "prepared" in ca and "prepared" in cb else ("data", "test_split")
    for k in data_keys:
        if ca.get(k) != cb.get(k):
            raise EvaluationError(f"{a_name} and {b_name} were evaluated on different data ({k}: {ca.get(k)} vs "
                                  f"{cb.get(k)}), so their runs do not pair")
    notes = [f"{k}: {ca.get(k)} in {a_name}, {cb.get(k)} in {b_name}" for k in SAME_RECIPE
             if k != "settings" and ca.get(k) != cb.get(k)]
    # settings hold each protocol's batch and lr: only the protocols both ran can differ (a frozen-only
    # result beside a frozen + finetune one is the same recipe when their frozen settings agree)
    sa, sb = ca.get("settings") or {}, cb.get("settings") or {}
    notes += [f"settings of {p}: {sa[p]} in {a_name}, {sb[p]} in {b_name}" for p in sa if p in sb and sa[p] != sb[p]]
    return notes


def merge_results(results: Sequence[Dict], names: Sequence[str] = ()) -> Dict:
    """One results dict holding the runs of several (same task and dataset), for one table: e.g.
    MLVICX, VICReg and random init evaluated by separate commands."""
    if not results:
        raise EvaluationError("no results to merge")
    names = list(names) or [f"results {i + 1}" for i in range(len(results))]
    first = results[0]
    seen: Dict[Tuple, str] = {}
    runs: List[Dict] = []
    notes: List[str] = []
    for r, name in zip(results, names):
        if (r.get("task"), r.get("dataset")) != (first.get("task"), first.get("dataset")):
            raise EvaluationError(f"cannot put {name} ({r.get('task')} on {r.get('dataset')}) in one table with "
                                  f"{names[0]} ({first.get('task')} on {first.get('dataset')})")
        notes += setting_differences(first, r, str(names[0]), str(name))
        for run in r["runs"]:
            key = (run["method"], run["protocol"], float(run["fraction"]), int(run["seed"]))
            if key in seen:
                raise EvaluationError(f"method {key[0]!r} ({key[1]}, {key[2]:g}%, seed {key[3]}) is in both "
                                      f"{seen[key]} and {name}; rename one (NAME=PATH when evaluating)")
            seen[key] = name
            runs.append(run)
    merged = {k: v for k, v in first.items() if k != "runs"}
    merged["config"] = dict(first.get("config", {}), merged_from=[str(n) for n in names])
    merged["methods"] = list(dict.fromkeys(run["method"] for run in runs))
    merged["runs"] = runs
    merged["notes"] = notes
    return merged


# ================================================================================================
# significance
# ================================================================================================
def _pick_method(results: Dict, method: Optional[str], which: str, path: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    if method is not None:
        if method not in methods:
            raise EvaluationError(f"{path}: no runs of method {method!r}; it holds {methods}")
        return method
    if len(methods) != 1:
        raise EvaluationError(f"{path} holds {len(methods)} methods {methods}; choose one with --{which}-method")
    return methods[0]


def compare_results(a: Dict, b: Dict, a_method: Optional[str] = None, b_method: Optional[str] = None,
                    a_name: str = "A", b_name: str = "B") -> Dict:
    """Paired t-test of method A against method B per (protocol, fraction), over the seeds both ran.
    Returns {"a", "b", "metric", "settings": [{protocol, fraction, n, seeds, mean_a, mean_b, mean_diff, t, p}]}."""
    if a.get("task") != b.get("task") or a.get("dataset") != b.get("dataset"):
        raise EvaluationError(f"cannot pair {a_name} ({a.get('task')} on {a.get('dataset')}) with {b_name} "
                              f"({b.get('task')} on {b.get('dataset')}): the task and dataset must match")
    notes = setting_differences(a, b, a_name, b_name)
    ma = _pick_method(a, a_method, "a", a_name)
    mb = _pick_method(b, b_method, "b", b_name)
    if ma == mb and a["runs"] == b["runs"]:
        raise EvaluationError(f"both sides are method {ma!r}; choose two different ones with --a-method / --b-method")
    key = lambda r: (r["protocol"], float(r["fraction"]), int(r["seed"]))  # noqa: E731
    runs_a = {key(r): r["score"] for r in a["runs"] if r["method"] == ma}
    runs_b = {key(r): r["score"] for r in b["runs"] if r["method"] == mb}
    settings = sorted({k[:2] for k in runs_a} | {k[:2] for k in runs_b})
    rows = []
    for protocol, fraction in settings:
        seeds = sorted(k[2] for k in runs_a if k[:2] == (protocol, fraction) and k in runs_b
                       and runs_a[k] is not None and runs_b[k] is not None)
        xa = [runs_a[(protocol, fraction, s)] for s in seeds]
        xb = [runs_b[(protocol, fraction, s)] for s in seeds]
        # runs of either side left out: no run of that seed on the other side, or no score (diverged)
        unpaired = len({k[2] for k in (*runs_a, *runs_b) if k[:2] == (protocol, fraction)} - set(seeds))
        rows.append({"protocol": protocol, "fraction": fraction, "seeds": seeds, "unpaired_seeds": unpaired,
                     **paired_ttest(xa, xb)})
    if not any(r["n"] for r in rows):
        raise EvaluationError(f"no matched runs: {ma!r} and {mb!r} share no (protocol, fraction, seed) with a score")
    return {"kind": "mlvicx-compare", "a": ma, "b": mb, "metric": a.get("metric"), "dataset": a.get("dataset"),
            "task": a.get("task"), "settings": rows, "notes": notes}


def format_comparison(cmp: Dict) -> str:
    f3 = lambda v: "—" if v is None else f"{v:.4f}"  # noqa: E731
    fp = lambda v: "—" if v is None else (f"{v:.2e}" if v < 1e-3 else f"{v:.4f}")  # noqa: E731
    lines = [f"# {cmp['a']} vs {cmp['b']}: paired t-test of {cmp['metric']} ({cmp['dataset']} {cmp['task']})", "",
             f"| protocol | fraction | pairs | {cmp['a']} | {cmp['b']} | mean difference | t | p |",
             "|---|---|---|---|---|---|---|---|"]
    for r in cmp["settings"]:
        lines.append(f"| {r['protocol']} | {r['fraction']:g}% | {r['n']} | {f3(r['mean_a'])} | {f3(r['mean_b'])} | "
                     f"{f3(r['mean_diff'])} | {f3(r['t'])} | {fp(r['p'])} |")
    unpaired = [f"{r['protocol']} {r['fraction']:g}% ({r['unpaired_seeds']})" for r in cmp["settings"]
                if r.get("unpaired_seeds")]
    if unpaired:
        lines += ["", "Seeds left out because one side has no run or no score for them (diverged): "
                  + ", ".join(unpaired) + "."]
    if cmp.get("notes"):
        lines += ["", "The two were evaluated with different settings: " + "; ".join(cmp["notes"]) + "."]
    fewest = min((r["n"] for r in cmp["settings"] if r["n"]), default=0)
    if fewest < PAPER_RUNS:
        lines += ["", f"Note: the paper's significance test pairs {PAPER_RUNS} runs per setting, each on its own "
                      f"resampled label subset; the fewest pairs here are {fewest}, which gives the test little power "
                      f"(for its protocol run cls/seg with --seeds {' '.join(map(str, range(PAPER_RUNS)))}). At 100 % "
                      "labels every seed trains on the same images, so only initialisation and order differ."]
    return "\n".join(lines) + "\n"


# ================================================================================================
# heatmaps
# ================================================================================================
def grad_cam(model: Classifier, x: torch.Tensor, classes: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (Selvaraju et al. 2017) on the last stage map A (512 x h x w) of one image x (1, C, H, W):
    cam_k = relu(sum_c mean_hw(d logit_k / d A_c) A_c), bilinearly resized to H x W and scaled to
    [0, 1] (all zero when relu leaves nothing). Returns (cams (K, H, W), probabilities (num_classes,))."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam: expected one image (1, C, H, W), got shape {tuple(x.shape)}")
    model.eval()
    with torch.enable_grad():
        a = model.last_map(x)
        logits = model.fc(a.mean(dim=(2, 3)))[0]
        cams = []
        for k in classes:
            (grad,) = torch.autograd.grad(logits[k], a, retain_graph=True)
            w = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((w * a).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            cams.append(cam / cam.max() if cam.max() > 0 else cam)
    return torch.stack(cams).detach(), torch.sigmoid(logits).detach()


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 (H, W, 3): the gray image under the 'jet' colour map of cam in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    base = np.repeat((gray.astype(np.float32) / 255.0)[..., None], 3, axis=2)
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255 + 0.5).astype(np.uint8)


def _image_ids(index_csv: Path) -> List[str]:
    """The image ids of a prepared split, in row order ([] when its index file is missing)."""
    import csv

    if not index_csv.is_file():
        return []
    with open(index_csv, newline="") as f:
        return [row["image_id"] for row in csv.DictReader(f)]


def run_heatmap(model_path: PathLike, out: PathLike, images: Sequence[PathLike] = (), data: Optional[PathLike] = None,
                split: str = "test", n: int = 4, classes: Optional[Sequence[str]] = None, size: Optional[int] = None,
                alpha: float = 0.45, device: str = "auto", progress: bool = True) -> Dict:
    """Grad-CAM overlays: OUT/<image>/<class>.png (size x size, default the classifier's training
    size), OUT/<image>/input.png, and OUT/heatmaps.json with every image's class probabilities (and
    its labels for images from --data, named <split>-<row>-<image id>)."""
    from PIL import Image

    from .data.images import fit_square, read_image

    model, meta = load_classifier(model_path)
    dev = pick_device(device)
    model.to(dev)
    size = int(size or meta["image_size"])
    names = list(meta["classes"])
    wanted = list(classes) if classes else names
    bad = [c for c in wanted if c not in names]
    if bad:
        raise EvaluationError(f"unknown classes {bad}; the classifier knows {names}")
    ks = [names.index(c) for c in wanted]
    items: List[Tuple[str, np.ndarray]] = []
    for p in images:
        p = Path(p).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"image {str(p)!r} does not exist")
        # images of one name from different folders (a/x.png, b/x.png) get x, x-2, ...: each its own
        # folder and entry, not the last one written over the others
        stem, k = p.stem, 1
        while _slug(stem) in {_slug(t) for t, _ in items}:
            k += 1
            stem = f"{p.stem}-{k}"
        try:
            items.append((stem, fit_square(read_image(p), size)))
        except Exception as e:  # noqa: BLE001 - unreadable image: name it
            raise EvaluationError(f"could not read image {str(p)!r}: {e}") from None
    truth: Dict[str, Dict[str, int]] = {}
    if data is not None:
        prepared = PreparedData(data)
        d = prepared.split(split)
        ids = _image_ids(prepared.folder / f"{split}_index.csv")
        for j in range(min(n, len(d["images"]))):
            img = np.asarray(d["images"][j])
            if img.shape[0] != size:
                img = fit_square(img, size)
            stem = f"{split}-{j:05d}" + (f"-{Path(ids[j]).stem}" if j < len(ids) else "")
            items.append((stem, img))
            truth[stem] = {c: int(v) for c, v in zip(prepared.classes, d["labels"][j]) if c in wanted}
    if not items:
        raise EvaluationError("no images: give image files and/or --data with --split and --n")
    out = Path(out)
    report = {"model": str(model_path), "classes": wanted, "size": size, "images": {}}
    for stem, gray in progress_bar(items, desc="heatmaps", unit="img", disable=not progress):
        x = to_input(gray[None], encoder_in_chans(model.encoder), dev)
        cams, probs = grad_cam(model, x, ks)
        folder = out / _slug(stem)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray).save(folder / "input.png")
        files = {}
        for c, cam in zip(wanted, cams.cpu().numpy()):
            path = folder / f"{_slug(c)}.png"
            Image.fromarray(overlay(gray, cam, alpha)).save(path)
            files[c] = str(path)
        report["images"][stem] = {"probabilities": {c: float(probs[names.index(c)]) for c in wanted}, "files": files}
        if stem in truth:
            report["images"][stem]["labels"] = truth[stem]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "heatmaps.json", "w") as f:
        json.dump(report, f, indent=1)
    return report


# ================================================================================================
# command line
# ================================================================================================
def _fraction_list(values: Sequence[str]) -> List[float]:
    out = []
    for v in values:
        try:
            f = float(str(v).rstrip("%"))
        except ValueError:
            raise EvaluationError(f"--fractions: {v!r} is not a number (percent, e.g. 1 10 30 100)") from None
        out.append(f)
    if len(set(out)) != len(out):
        raise EvaluationError(f"--fractions: {' '.join(map(str, values))} names a fraction twice")
    return out


CLS_EPILOG = """\
reads:
  --data    a folder written by python -m mlvicx_fast.data.prepare {nih,vinbig,rsna} (meta.json,
            train/val/test .beton or .npy); for the phantom set, its nih/ subfolder
  --ckpt    repeatable: NAME=PATH, PATH or 'random'. PATH: a pretraining checkpoint of
            python -m mlvicx_fast.train (RUN/final.pt, RUN/checkpoints/ckpt-*.pt), a run folder,
            or a ResNet18 state_dict with torchvision names (ImageNet weights)
writes (--out):
  results.json  every run: method, protocol, fraction, seed, per-class and mean test AUC
                (null = undefined: one label value only), accuracy (RSNA), best epoch, history
  table.md      per fraction: rows = methods, columns = classes and mean (paper Table I)
  plot.png      score against label fraction
  models/       the best classifier of every run (--save-models), for evaluate heatmap
defaults (paper): NIH batch 64, lr 1e-5 fine-tune (1e-3 frozen); VinBig/RSNA batch 16, lr 1e-3;
  early stopping on validation mean AUC, patience 10; Adam; frozen = features computed once.
example:
  python -m mlvicx_fast.evaluate cls --data ~/data/nih256 --ckpt MLVICX=runs/mlvicx --ckpt random \\
      --protocol frozen finetune --fractions 1 10 30 100 --seeds 0 1 2 --out eval/nih
"""

SEG_EPILOG = """\
reads:
  --data    a folder written by python -m mlvicx_fast.data.prepare siim (or the phantom's siim/)
  --ckpt    as in evaluate cls (NAME=PATH, PATH, run folder, ResNet18 state_dict, or 'random')
writes (--out):
  results.json  every run: method, protocol, fraction, seed, Dice of the best validation epoch
                (on test when the data has a test split with masks): 'dice' pooled over all
                pixels (the score), 'dice_image' per-image mean with empty/empty = 1 (SIIM-ACR
                challenge), 'dice_positive' over images with a pneumothorax
  table.md, plot.png  Dice by method and label fraction
defaults (paper): fractions 30 100, batch 32, lr 3e-4, U-Net decoder random, BCE + soft Dice,
  early stopping on validation Dice, patience 10.
example:
  python -m mlvicx_fast.evaluate seg --data ~/data/siim256 --ckpt MLVICX=runs/mlvicx --ckpt random \\
      --protocol frozen finetune --out eval/siim
"""

COMPARE_EPILOG = """\
reads:  two results.json files (or folders holding one) of evaluate cls / evaluate seg on the same
        dataset; runs are paired by protocol, label fraction and seed
writes: the table to stdout, and --out FILE.json with n, means, mean difference, t and p per setting
        (t and p are null for fewer than two pairs or identical differences)
example:
  python -m mlvicx_fast.evaluate compare eval/nih-mlvicx/results.json eval/nih-vicreg/results.json
  python -m mlvicx_fast.evaluate compare eval/nih eval/nih --a-method MLVICX --b-method "Random init"
"""

TABLE_EPILOG = """\
reads:  results.json files (or folders holding one) of evaluate cls / evaluate seg on one dataset,
        e.g. one per pretraining method evaluated by separate commands
writes: the merged table to stdout; with --out DIR: DIR/results.json (all runs), DIR/table.md,
        DIR/plot.png
example:
  python -m mlvicx_fast.evaluate table eval/nih-mlvicx eval/nih-vicreg eval/nih-random --out eval/nih-all
"""

HEATMAP_EPILOG = """\
reads:  --model, a classifier saved by evaluate cls --save-models (OUT/models/*.pt); images as
        files (PNG or DICOM) and/or the first --n images of --split from a prepared --data folder
writes (--out): OUT/<image>/input.png and OUT/<image>/<class>.png (Grad-CAM overlay on the
        X-ray, at the classifier's image size or --size), OUT/heatmaps.json (probabilities, and
        labels for --data images, whose folders are named <split>-<row>-<image id>)
example:
  python -m mlvicx_fast.evaluate heatmap --model eval/nih/models/MLVICX-finetune-100pct-seed0.pt \\
      --data ~/data/nih256 --n 8 --classes Effusion Cardiomegaly --out eval/heatmaps
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlvicx_fast.evaluate",
                                description="Downstream evaluation of pretrained encoders (MLVICX paper protocols).",
                                epilog="run 'python -m mlvicx_fast.evaluate <command> --help' for each command",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{cls,seg,compare,table,heatmap,demo}")
    raw = argparse.RawDescriptionHelpFormatter

    def common(s, fractions, protocols):
        s.add_argument("--data", required=True, help="prepared dataset folder (holds meta.json)")
        s.add_argument("--ckpt", action="append", required=True, metavar="[NAME=]PATH|random",
                       help="encoder to evaluate (repeat for several rows)")
        s.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=list(protocols),
                       help=f"frozen (head/decoder only) and/or finetune (default {' '.join(protocols)})")
        s.add_argument("--fractions", nargs="+", default=[f"{f:g}" for f in fractions],
                       help=f"label fractions in percent (default {' '.join(f'{f:g}' for f in fractions)})")
        s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                       help="seeds per setting (default 0 1 2; the paper's significance test uses 10: 0 1 ... 9)")
        s.add_argument("--with-context", action="store_true", help="keep MLVICX's context blocks in the encoder")
        s.add_argument("--in-chans", type=int, choices=(1, 3), default=None,
                       help="stem channels (default: the checkpoint's)")
        s.add_argument("--batch", type=int, default=None, help="batch size (default: the paper's for the dataset)")
        s.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's for the dataset)")
        s.add_argument("--epochs", type=int, default=100, help="at most this many epochs (default 100)")
        s.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (default 10)")
        s.add_argument("--image-size", type=int, default=None, help="resize inputs to this side (default: as stored)")
        s.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
        s.add_argument("--deterministic", action="store_true",
                       help="deterministic algorithms, so a seed's run repeats exactly on a GPU too (slower; "
                            "a CPU run repeats without it)")
        s.add_argument("--out", required=True,
                       help="output folder (created); one that holds results.json is refused (another evaluation's: "
                            "use another --out, then 'evaluate table A B --out M' merges them), unless --overwrite")
        s.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
        s.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("cls", help="classification: linear probe / fine-tune, AUC tables",
                       description="Pretrained (or random) ResNet18 + one Linear layer on NIH, VinBig or RSNA.",
                       epilog=CLS_EPILOG, formatter_class=raw)
    common(s, CLS_FRACTIONS, ("frozen",))
    s.add_argument("--save-models", action="store_true", help="keep every run's best classifier in OUT/models")
    s.add_argument("--augment", action="store_true",
                   help="fine-tune on random-resized-crop + flip batches of the data loader (default: whole images)")

    s = sub.add_parser("seg", help="segmentation: U-Net on SIIM-ACR, Dice",
                       description="U-Net with the pretrained ResNet18 as encoder (decoder random) on SIIM-ACR masks.",
                       epilog=SEG_EPILOG, formatter_class=raw)
    common(s, SEG_FRACTIONS, PROTOCOLS)

    s = sub.add_parser("compare", help="paired t-test of two methods over matched runs",
                       description="Paired t-test (scipy.stats.ttest_rel) of method A against method B.",
                       epilog=COMPARE_EPILOG, formatter_class=raw)
    s.add_argument("a", help="results.json of method A (or its folder)")
    s.add_argument("b", help="results.json of method B (or its folder)")
    s.add_argument("--a-method", default=None, help="method of A when A holds several")
    s.add_argument("--b-method", default=None, help="method of B when B holds several")
    s.add_argument("--out", default=None, help="also write the comparison as JSON here")

    s = sub.add_parser("table", help="one Table I from several results.json files",
                       description="Merge the runs of several evaluations (same task and dataset) into one table.",
                       epilog=TABLE_EPILOG, formatter_class=raw)
    s.add_argument("results", nargs="+", help="results.json files or their folders")
    s.add_argument("--out", default=None, help="folder for the merged results.json, table.md and plot.png")

    s = sub.add_parser("heatmap", help="Grad-CAM overlays of a fine-tuned classifier",
                       description="Grad-CAM class activation maps over chest X-rays (paper Fig. 2).",
                       epilog=HEATMAP_EPILOG, formatter_class=raw)
    s.add_argument("--model", required=True, help="classifier .pt from evaluate cls --save-models")
    s.add_argument("images", nargs="*", help="image files (PNG or DICOM)")
    s.add_argument("--data", default=None, help="prepared dataset folder to take images from")
    s.add_argument("--split", default="test", help="split of --data (default test)")
    s.add_argument("--n", type=int, default=4, help="how many images of --data (default 4)")
    s.add_argument("--classes", nargs="+", default=None, help="classes to map (default all)")
    s.add_argument("--size", type=int, default=None, help="image side (default: the classifier's)")
    s.add_argument("--alpha", type=float, default=0.45, help="heat-map opacity (default 0.45)")
    s.add_argument("--device", default="auto")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("demo", help="built-in demonstration: pretrain on the phantom set, 10%% linear probe vs random init",
                       description=DEMO_DOC, formatter_class=raw)
    s.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    s.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="probe seeds (default 0 1 2)")
    s.add_argument("--ablations", action="store_true",
                   help="also pretrain with --lambda 0 and with --global-weight 0 and probe those")
    s.add_argument("--pretrained", default=None, help="use this run folder for the MLVICX row instead of pretraining")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _require_eval_packages() -> None:
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("scipy", "scipy"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise EvaluationError(f"evaluate needs {', '.join(missing)}: pip install -e '.[eval]' "
                              f"(or pip install {' '.join(missing)})")


DEMO_DOC = """Built-in demonstration, no download: pretrain MLVICX on the phantom chest X-ray set with
the training command's built-in default, then train the frozen linear probe at 10 % labels (3 seeds)
on the MLVICX encoder and on a random-init one, and print the table. Expected: MLVICX beats random
init by at least 0.05 mean AUC (exit status 1 otherwise). About 12 minutes on 2 CPU cores; with
--ablations also the global-only (--lambda 0) and multi-level-only (--global-weight 0) pretrainings,
about 30 minutes.

writes OUT/mlvicx (the pretraining run; with --ablations also OUT/ablation1 and OUT/ablation2),
OUT/probe (results.json, table.md, plot.png). Run again with the same --out, the demo reuses a
finished pretraining and continues a stopped one (remove the folder to pretrain anew).

example:
  python -m mlvicx_fast.evaluate demo --out runs/demo
"""


def _demo_pretraining(run: Path, flags: Sequence[str]) -> Optional[List[str]]:
    """The train command line for a demo's pretraining in run, or None when run already holds it,
    finished (a demo run again reuses it: remove the folder to pretrain anew). A pretraining that
    was stopped is continued (--resume); a folder holding another run stops the demo."""
    from . import train

    if not train.run_contents(run):
        return ["--out", str(run), *flags]
    want = dataclasses.asdict(train.resolve(train.Config(**train.given_options(list(flags)))))
    # what the run computes: the options a resume may change aside, but the data set
    have = train.folder_config(run)
    differs = (["no config.json"] if have is None else
               train.run_differences(have, want, skip=train.SAME_RUN_SKIP - {"data"}))
    if differs:
        raise EvaluationError(f"{run} holds a run that is not this demo's pretraining ({'; '.join(differs)}); "
                              "remove it or give demo another --out")
    if (run / "final.pt").is_file():
        print(f"[demo] {run} holds this demo's finished pretraining: reusing it (remove the folder to pretrain again)")
        return None
    if not train.CheckpointManager(run / "checkpoints").list():
        raise EvaluationError(f"{run} holds a pretraining stopped before its first checkpoint; remove it "
                              "to pretrain again")
    print(f"[demo] continuing the stopped pretraining in {run}")
    return ["--resume", str(run)]


def run_demo(out: PathLike, seeds: Sequence[int] = (0, 1, 2), ablations: bool = False,
             pretrained: Optional[PathLike] = None, progress: bool = True) -> Tuple[Dict, Optional[float]]:
    """The built-in demonstration (see DEMO_DOC); returns (results, MLVICX - random mean AUC), the
    gain None when either has no mean AUC (all its probes diverged or had no defined class)."""
    from . import train

    out = Path(out)
    runs: Dict[str, PathLike] = {}
    plan = [("MLVICX", [])]
    if ablations:
        plan += [("VICReg (--lambda 0)", ["--lambda", "0"]), ("multi-level only (--global-weight 0)", ["--global-weight", "0"])]
    for i, (name, flags) in enumerate(plan):
        if i == 0 and pretrained:
            runs[name] = pretrained
            continue
        run = out / ("mlvicx" if i == 0 else f"ablation{i}")
        argv = _demo_pretraining(run, flags)
        if argv is not None and train.main(argv + ([] if progress else ["--quiet"])) != 0:
            raise EvaluationError(f"the pretraining run {run} did not finish")
        runs[name] = run
    cfg = train.resolve(train.Config())  # the built-in default's data set and view size on this machine
    data, _ = train.resolve_data(cfg)
    results = linear_probe(data, {**runs, "Random init": "random"}, fraction=10.0, seeds=seeds,
                           image_size=cfg.image_size, out=out / "probe", progress=progress)
    scores = mean_scores(results)
    ours, random_init = scores["MLVICX"]["frozen"][10.0], scores["Random init"]["frozen"][10.0]
    if ours is None or random_init is None:  # every probe diverged or had no defined class: no gain
        return results, None
    return results, ours - random_init


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    drop_numba_finalizer_errors()  # see mlvicx_fast/data/loader.py
    try:
        _require_eval_packages()
        if args.command in ("cls", "seg", "demo", "heatmap") and \
                pick_device(getattr(args, "device", "auto")).type == "cpu":
            from .host import reuse_freed_memory

            reuse_freed_memory()  # ~20 % off a CPU training step (see mlvicx_fast/host.py)
        if args.command in ("cls", "seg"):
            held = Path(args.out) / "results.json"
            if held.is_file() and not args.overwrite:
                raise EvaluationError(f"--out {args.out} already holds results.json (another evaluation's runs, replaced "
                                      "at the first run of this one): give another --out and merge them with "
                                      "'evaluate table A B --out M', or --overwrite to replace them")
            if args.image_size is not None and (args.image_size < 32 or (args.command == "seg" and args.image_size % 32)):
                raise EvaluationError(f"--image-size {args.image_size}: must be >= 32"
                                      + (" and a multiple of 32 (the U-Net halves it five times)" if args.command == "seg"
                                         else ""))
            if args.deterministic:
                from .checkpoint import make_deterministic

                make_deterministic()
            run = run_cls if args.command == "cls" else run_seg
            kwargs = dict(protocols=args.protocol, fractions=_fraction_list(args.fractions), seeds=args.seeds,
                          with_context=args.with_context, in_chans=args.in_chans, batch=args.batch, lr=args.lr,
                          epochs=args.epochs, patience=args.patience, image_size=args.image_size, device=args.device,
                          out=args.out, progress=not args.quiet)
            if args.command == "cls":
                kwargs.update(save_models=args.save_models, augment=args.augment)
            results = run(args.data, args.ckpt, **kwargs)
            print()
            print(format_table(results))
            print(f"wrote {Path(args.out) / 'results.json'}, table.md and plot.png")
        elif args.command == "compare":
            a, b = read_results(args.a), read_results(args.b)
            cmp = compare_results(a, b, args.a_method, args.b_method, args.a, args.b)
            print(format_comparison(cmp))
            if args.out:
                target = Path(args.out)
                if target.is_dir():  # every other --out is a folder
                    target = target / "compare.json"
                if target.is_file() and _json_kind(target) == "mlvicx-eval":
                    raise EvaluationError(f"--out {args.out} is an evaluation's results.json; the comparison would "
                                          "replace it: give another file or a folder")
                print(f"wrote {write_json(cmp, target)}")
        elif args.command == "table":
            merged = merge_results([read_results(r) for r in args.results], args.results)
            print(format_table(merged))
            for note in merged["notes"]:
                print(f"note: the results differ in {note}", file=sys.stderr)
            if args.out:
                write_outputs(merged, Path(args.out))
                print(f"wrote {Path(args.out) / 'results.json'}, table.md and plot.png")
        elif args.command == "demo":
            results, gain = run_demo(args.out, args.seeds, args.ablations, args.pretrained, progress=not args.quiet)
            print()
            print(format_table(results))
            if gain is None:
                print("evaluate demo: no gain to report: MLVICX or random init has no mean AUC (all its probes "
                      "diverged or had no defined class; see the table)", file=sys.stderr)
                return 1
            print(f"MLVICX - random init, frozen probe at 10% labels: {gain:+.3f} mean AUC (expected >= +0.05)")
            return 0 if gain >= 0.05 else 1
        elif args.command == "heatmap":
            rep = run_heatmap(args.model, args.out, args.images, args.data, args.split, args.n, args.classes,
                              args.size, args.alpha, args.device, progress=not args.quiet)
            print(f"wrote {len(rep['images'])} x {len(rep['classes'])} overlays under {args.out}")
        return 0
    except (EvaluationError, FileNotFoundError) as e:
        print(f"evaluate {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
