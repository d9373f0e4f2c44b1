r"""Multi-level aggregation of MLVICX, pooled first and exact.

Official form (``ResizeAndProject`` of the MLVICX code, then the head's pooling): for maps
y_p of shape (N, C_p, H_p, W_p), p = 1..T, projections W_p (D, C_p, 1, 1) with bias b_p (D,)::

    u    = sum_p conv1x1(resize_{R x R}(y_p); W_p, b_p)       (N, D, R, R), bilinear, align_corners=False
    out  = flatten(adaptive_avg_pool_{Q x Q}(u))              (N, D * Q * Q), order (d, i, j)

with R = 64, Q = 4, D = 512 in MLVICX. Resizing, the 1x1 projection and average pooling are all
linear and act on different axes, and every row of the resize and of the pooling sums to one, so

    adaptive_avg_pool_Q(resize_R(W_p y_p + b_p)) = W_p (K_h y_p K_w^T) + b_p

where K_h (Q x H_p) and K_w (Q x W_p) are the 1-D "linear resize to R, then adaptive average
pool to Q" matrices (bilinear resizing is separable into the two 1-D linear resizes). Here
``K = kron(K_h, K_w)`` (Q*Q x H_p*W_p) is built exactly, by applying F.interpolate and
F.adaptive_avg_pool1d to an identity in float64, and cached per (size, R, Q, device, dtype), the
``MATRIX_CACHE_SIZE`` most recently used kept (built in the graph under torch.compile, see
``pooling_matrix``).
Each map is reduced by one matrix product that reads it once (``K @ y`` over the pixels, in
either layout), the T pooled maps are concatenated over channels and projected by one product
with the concatenated weights; no R x R map exists, forward or backward.

Inputs: a sequence of T >= 1 maps (N, C_p, H_p, W_p), any H_p, W_p >= 1, NCHW or channels_last,
one dtype; weights (D, C_p, 1, 1) or (D, C_p); biases (D,) or None. Output (N, D*Q*Q).

Implementation: plain torch matmuls, gradients by autograd. Its cost is one read of each map
and a few MFLOP per sample; a Triton kernel would have to beat cuBLAS on these thin products and
was not written (no GPU measurement showed a need). ``aggregate_official`` is the reference.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# a network meets five tap sizes per input size; evaluation at many input sizes (or many devices)
# must not grow the cache for good, so the least recently used matrix goes first
MATRIX_CACHE_SIZE = 64
_MATRICES: "OrderedDict[Tuple, torch.Tensor]" = OrderedDict()


def linear_resize_matrix(size: int, resize: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(resize, size) matrix R with R @ v = linear_resize(v, resize) for a 1-D signal v of length
    ``size`` (align_corners=False), built by resizing the unit signals: F.interpolate's own weights."""
    eye = torch.eye(size, dtype=torch.float64, device=device).unsqueeze(1)  # row i is the unit signal e_i
    resized = F.interpolate(eye, size=resize, mode="linear", align_corners=False)  # (size, 1, resize)
    return resized.squeeze(1).t().contiguous().to(dtype=dtype)


def resize_pool_matrix(size: int, resize: int = 64, pool: int = 4,
                       device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(pool, size) matrix K with K @ v = adaptive_avg_pool1d(linear_resize(v, resize), pool)
    for a 1-D signal v of length ``size`` (linear interpolation, align_corners=False)."""
    resized = linear_resize_matrix(size, resize, device=device, dtype=torch.float64).t().unsqueeze(1)
    pooled = F.adaptive_avg_pool1d(resized, pool)  # (size, 1, pool): column i of K
    return pooled.squeeze(1).t().contiguous().to(dtype=dtype)


def pooling_matrix(height: int, width: int, resize: int = 64, pool: int = 4,
                   device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(pool*pool, height*width) matrix kron(K_h, K_w), cached: row i*pool + j, column h*W + w.

    Under torch.compile it is built in the graph, on the device (one small fused kernel), and the
    cache is left alone: looking it up would make dynamo guard on the cache's contents, so the entry
    the first trace adds would recompile the whole network on its second call."""
    def build():
        k_h = resize_pool_matrix(height, resize, pool, device=device, dtype=torch.float64)
        k_w = resize_pool_matrix(width, resize, pool, device=device, dtype=torch.float64)
        # kron(K_h, K_w) as an outer product: torch.kron fails on a (4, 1) K whose strides
        # .contiguous() leaves as they are (a side of 1 beside a side above 1)
        return (k_h[:, None, :, None] * k_w[None, :, None, :]).reshape(pool * pool, height * width).to(dtype=dtype)

    if torch.compiler.is_compiling():
        return build()
    key = (height, width, resize, pool, str(device), dtype)
    mat = _MATRICES.get(key)
    if mat is None:
        # a matrix first built under inference_mode would be an inference tensor, which autograd
        # then refuses to save for any later training step
        with torch.inference_mode(False):
            mat = _MATRICES[key] = build()
        while len(_MATRICES) > MATRIX_CACHE_SIZE:
            _MATRICES.popitem(last=False)
    else:
        _MATRICES.move_to_end(key)
    return mat


def _check(maps: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
           biases: Optional[Sequence[Optional[torch.Tensor]]], resize: int, pool: int) -> int:
    """Validate the arguments; return the projection width D."""
    if len(maps) == 0:
        raise ValueError("aggregate: expected at least one feature map, got an empty sequence")
    if len(weights) != len(maps):
        raise ValueError(f"aggregate: got {len(maps)} maps but {len(weights)} projection weights")
    if biases is not None and len(biases) != len(maps):
        raise ValueError(f"aggregate: got {len(maps)} maps but {len(biases)} projection biases")
    if resize < 1 or pool < 1 or pool > resize:
        raise ValueError(f"aggregate: need 1 <= pool <= resize, got resize={resize}, pool={pool}")
    width = weights[0].shape[0]
    for i, (y, w) in enumerate(zip(maps, weights)):
        if y.dim() != 4:
            raise ValueError(f"aggregate: map {i} must be 4-D (N, C, H, W), got shape {tuple(y.shape)}")
        if min(y.shape) < 1:
            raise ValueError(f"aggregate: every dimension of map {i} must be >= 1, got shape {tuple(y.shape)}")
        if y.shape[0] != maps[0].shape[0]:
            raise ValueError(
                f"aggregate: map {i} has batch {y.shape[0]} but map 0 has {maps[0].shape[0]}"
            )
        if w.dim() not in (2, 4) or w.shape[0] != width or w.shape[1] != y.shape[1] or w[0, 0].numel() != 1:
            raise ValueError(
                f"aggregate: projection {i} must have shape ({width}, {y.shape[1]}, 1, 1) for a map with "
                f"{y.shape[1]} channels, got {tuple(w.shape)}"
            )
        if biases is not None and biases[i] is not None and tuple(biases[i].shape) != (width,):
            raise ValueError(f"aggregate: bias {i} must have shape ({width},), got {tuple(biases[i].shape)}")
    return width


def aggregate_exact(maps: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                    resize: int = 64, pool: int = 4) -> torch.Tensor:
    """Pool-first aggregation, equal to :func:`aggregate_official` up to rounding. (N, D*pool^2)."""
    width = _check(maps, weights, biases, resize, pool)
    n = maps[0].shape[0]
    pooled = []
    for y in maps:
        _, c, h, w = y.shape
        k = pooling_matrix(h, w, resize, pool, device=y.device, dtype=y.dtype)
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            pooled.append(k @ y.permute(0, 2, 3, 1).reshape(n, h * w, c))  # (N, Q*Q, C)
        else:
            pooled.append((y.reshape(n, c, h * w) @ k.t()).transpose(1, 2))  # (N, Q*Q, C)
    w_cat = torch.cat([w.reshape(width, -1) for w in weights], dim=1)  # (D, sum C)
    out = torch.cat(pooled, dim=2) @ w_cat.t()  # (N, Q*Q, D)
    if biases is not None:
        present = [b for b in biases if b is not None]
        if present:
            out = out + torch.stack(present).sum(0)
    return out.transpose(1, 2).reshape(n, width * pool * pool)


def aggregate_official(maps: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                       biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       resize: int = 64, pool: int = 4) -> torch.Tensor:
    """The official form: resize every map to resize x resize, project, sum, pool, flatten."""
    width = _check(maps, weights, biases, resize, pool)
    u = None
    for i, (y, w) in enumerate(zip(maps, weights)):
        b = None if biases is None else biases[i]
        r = F.interpolate(y, size=resize, mode="bilinear", align_corners=False)
        p = F.conv2d(r, w.reshape(width, -1, 1, 1), b)
        u = p if u is None else u + p
    return torch.flatten(F.adaptive_avg_pool2d(u, pool), 1)


AGGREGATIONS = {"exact": aggregate_exact, "official": aggregate_official}


def aggregate(maps, weights, biases=None, resize: int = 64, pool: int = 4, mode: str = "exact"):
    """Dispatch to :func:`aggregate_exact` (mode='exact') or :func:`aggregate_official`."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {tuple(AGGREGATIONS)}")
    return AGGREGATIONS[mode](maps, weights, biases, resize, pool)
