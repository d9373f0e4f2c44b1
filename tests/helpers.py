"""Small helpers the tests share."""
import sys
from pathlib import Path

import torch

# devices the tests run on: the CPU always, CUDA where there is one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN if either holds NaN)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with the same values (every other column of a wider buffer)."""
    wide = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    wide[:, 1::2] = torch.randn_like(x)
    view = wide[:, ::2]
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


def count_host_ops(fn):
    """benchmarks/common.count_host_ops: Triton launches and torch ops that fn() asks of the host."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from common import count_host_ops as count
    finally:
        sys.path.pop(0)
    return count(fn)
