"""Checkpoints that survive being killed mid-write, and the RNG state that makes resuming exact.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed over
its final name (`os.replace` is atomic on POSIX), so a reader sees either the old file or the
whole new one. :class:`CheckpointManager` keeps the last `keep` step checkpoints
(``ckpt-00001234.pt``) and loads the newest one that reads back.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

PathLike = Union[str, os.PathLike]
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def _atomic_write(path: PathLike, write, mode: str) -> Path:
    """write(f) into a temporary file beside path, flushed to disk, then renamed over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; a saved file gets the usual mode
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(path: PathLike) -> None:
    """Remove the temporary files `_atomic_write` left in path's folder for files of its kind
    (ckpt-*.pt, or the same name) when a process was killed mid-write: call after a write of path."""
    path = Path(path)
    kind = "ckpt-*" if _NAME.match(path.name) else path.name
    for stale in path.parent.glob(f".{kind}.*.tmp"):
        stale.unlink(missing_ok=True)


def atomic_save(obj: Any, path: PathLike) -> Path:
    """torch.save(obj) to path through a temporary file and an atomic rename."""
    return _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: PathLike, text: str) -> Path:
    """A text file written through a temporary file and an atomic rename."""
    return _atomic_write(path, lambda f: f.write(text), "w")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def rng_state() -> Dict[str, Any]:
    """Every random number generator a training step draws from (tensors and plain values only,
    so the checkpoint loads with torch's weights-only unpickler)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):
        np_state = (np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                    np_state["has_gauss"], np_state["cached_gaussian"])
    np.random.set_state(np_state)  # else numpy's own tuple (checkpoints written before 2026-12-02)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # saved by a process that saw more GPUs than this one (rank 0 of 8, resumed on 1): the
        # devices this process has (the training step draws nothing from the CUDA generators)
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def make_deterministic() -> None:
    """Reproducible runs on a GPU too: deterministic torch algorithms (a warning where an op has
    none), the loss kernels' fixed tiles and products instead of timing them (MLVICX_AUTOTUNE=0:
    two processes may time differently), and the fixed cuBLAS workspace reproducible results need
    (read when cuBLAS makes its handle, so before the first matrix product on the GPU)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ.setdefault("MLVICX_AUTOTUNE", "0")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class CheckpointManager:
    """Step checkpoints in one folder: save atomically, keep the newest `keep`, load the newest good one."""

    def __init__(self, folder: PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"CheckpointManager: keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.folder / f"ckpt-{step:08d}.pt"

    def list(self) -> List[Tuple[int, Path]]:
        """(step, path) of the step checkpoints present, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        path = atomic_save(state, self.path(step))
        for _, old in self.list()[:-self.keep]:
            old.unlink(missing_ok=True)
        remove_stale_temps(self.path(step))
        return path

    def load_latest(self, map_location="cpu") -> Optional[Tuple[Path, Dict[str, Any]]]:
        """The newest checkpoint that loads, or None when there is none."""
        for _, path in reversed(self.list()):
            try:
                return path, load(path, map_location)
            except UnsafeCheckpoint:
                raise  # not damaged, refused: say so rather than pass over it
            except Exception:  # noqa: BLE001 - a damaged file: fall back to the one before
                continue
        return None


class UnsafeCheckpoint(ValueError):
    """A file that needs more than torch's weights-only unpickler allows."""


def _numpy_array_globals() -> list:
    """What unpickling a numeric numpy array needs (the RNG state of checkpoints written before
    2026-12-02 holds one); object arrays need more, so they stay refused. A file names
    `_reconstruct` by the module of the numpy that wrote it, numpy.core (1.x) or numpy._core (2.x):
    both spellings are allowed where torch takes (object, name) pairs (torch >= 2.6)."""
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    names = [reconstruct, np.ndarray, np.dtype] + [type(np.dtype(t)) for t in numeric]
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6):
        names += [(reconstruct, f"numpy.{mod}.multiarray._reconstruct") for mod in ("core", "_core")]
    return names


@contextlib.contextmanager
def _allow_numpy_arrays():
    """The allow-list above for this load only, where torch can scope it (torch >= 2.5)."""
    scoped = getattr(torch.serialization, "safe_globals", None)
    if scoped is None:
        torch.serialization.add_safe_globals(_numpy_array_globals())
        yield
    else:
        with scoped(_numpy_array_globals()):
            yield


def load(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Load a checkpoint with torch's weights-only unpickler: tensors, numbers, strings, containers
    (and numeric numpy arrays, for older checkpoints of this package). A file that holds other
    Python objects, whose unpickling can run any code, raises UnsafeCheckpoint naming them; if you
    trust it, load it yourself with torch.load(..., weights_only=False) and save its state_dict."""
    try:
        with _allow_numpy_arrays():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = []
        with contextlib.suppress(Exception):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if not names and not re.search(r"Unsupported global|but got <class", str(e)):
            raise  # not a pickle at all, or a damaged one
        what = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "") if names else "objects"
        raise UnsafeCheckpoint(
            f"{str(path)!r} holds Python objects beyond tensors and plain values ({what}); unpickling them "
            "could run any code, so it is not loaded. If you trust the file, load it with "
            "torch.load(path, weights_only=False) and torch.save its state_dict (the tensors) instead"
        ) from None
