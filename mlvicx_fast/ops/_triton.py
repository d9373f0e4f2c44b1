"""Where Triton kernels may run, and the launch settings every op shares.

Triton kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before
``mlvicx_fast`` was imported (Triton's interpreter, used by the tests on machines without a GPU).
"""
from __future__ import annotations

import os

import torch

try:  # Triton ships with the CUDA builds of torch; on a CPU build it is an optional extra.
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_can_run(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can be launched on these tensors here."""
    if not HAS_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in tensors)


def require_triton(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when backend='triton' was asked for where it cannot run."""
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
    if not triton_can_run(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (got {', '.join(devices)}); CPU tensors run "
            "Triton only in its interpreter, with TRITON_INTERPRET=1 set before import"
        )


FP32_DOT_CHOICES = ("tf32x3", "fp16x3", "tf32", "ieee")


def fp32_dot_precision() -> str:
    """How the loss kernels multiply float32 tiles (their PREC argument).

    On a GPU: 'tf32x3' (three TF32 tensor-core products, close to float32 accuracy), or single
    TF32 when the user allowed TF32 for float32 matmuls (``torch.set_float32_matmul_precision``,
    ``torch.backends.cuda.matmul.allow_tf32`` or ``.fp32_precision``). MLVICX_FP32_DOT picks
    one explicitly: 'fp16x3' scales each operand by a power of two into float16's range, splits it
    into two float16 parts (22 significant bits, as many as 'tf32x3') and adds three float16
    products, at half the tensor-core cost (float16 runs at twice the TF32 rate); 'ieee' uses no
    tensor cores. The interpreter computes every mode's products in float32 with numpy ('fp16x3'
    really scales and splits there too).
    """
    choice = os.environ.get("MLVICX_FP32_DOT", "")
    if choice:
        if choice not in FP32_DOT_CHOICES:
            raise ValueError(f"MLVICX_FP32_DOT={choice!r}: expected one of {FP32_DOT_CHOICES}")
        return choice
    if interpreting():
        return "ieee"
    return "tf32" if _matmul_allows_tf32() else "tf32x3"


def _matmul_allows_tf32() -> bool:
    """torch's TF32 setting for float32 CUDA matmuls. Read through ``fp32_precision`` (torch >= 2.9),
    which also reflects the older settings; reading ``allow_tf32`` raises once the newer setting
    was used (torch refuses a mix of the two APIs)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"  # "none" inherits torch.backends.fp32_precision, resolved here
    return bool(matmul.allow_tf32)
