"""Helpers for torch.distributed: the official VICReg all-gather with gradients.

``gather_with_grad(z1, z2)`` concatenates each tensor over the ranks along dim 0, in rank order.
The ranks first exchange their shapes (one small all-gather and a host read, every eager call),
so every rank takes the same decision: local batch sizes may differ (the tensors are padded to the
largest for the all-gather and cut back after it), and any other difference in shape raises the
same error on every rank instead of leaving some ranks waiting in a mismatched collective.

While a CUDA graph is being captured, or torch.compile traces the call, no host read is allowed;
the sizes of the last eager exchange for the same local shapes are used (GraphedStep's warm-up
steps make that exchange, and a captured graph replays on its captured shapes only).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

_MAX_DIMS = 8
# local shapes of one call -> per tensor, the batch size of every rank (from the last exchange)
_sizes_seen: Dict[Tuple[Tuple[int, ...], ...], List[List[int]]] = {}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradients of all ranks and keeps this rank's slice.

    As ``FullGatherLayer`` in the official VICReg code: every rank computes the loss of the global
    batch, so the summed gradient is world_size * dL/d(local slice), which DistributedDataParallel's
    averaging turns back into the gradient of the single-process loss. ``sizes`` holds each rank's
    batch size; unequal sizes are padded to the largest for the collective.
    """

    @staticmethod
    def forward(ctx, x, sizes):
        rank, top = dist.get_rank(), max(sizes)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        x = x.contiguous()
        if x.shape[0] < top:
            x = torch.cat([x, x.new_zeros((top - x.shape[0],) + x.shape[1:])])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)  # p[:n] is p when no rank was padded

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.stop], None


def _host_read_allowed(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _exchange_sizes(xs: Tuple[torch.Tensor, ...]) -> List[List[int]]:
    """Per tensor, the batch size of every rank; the same ValueError on every rank if the shapes
    beyond dim 0 (or the number of dimensions) differ between ranks."""
    key = tuple(tuple(x.shape) for x in xs)
    if not _host_read_allowed(xs[0]):
        if key not in _sizes_seen:
            raise RuntimeError(f"gather_with_grad: local shapes {list(key)} were never gathered outside a CUDA-graph "
                               "capture or torch.compile trace; run one eager step with them first")
        return _sizes_seen[key]
    for shape in key:
        if not 1 <= len(shape) <= _MAX_DIMS:
            raise ValueError(f"gather_with_grad: expected tensors of 1 to {_MAX_DIMS} dimensions, got shape {shape}")
    mine = torch.full((len(xs), _MAX_DIMS + 1), -1, dtype=torch.int64)
    for i, shape in enumerate(key):
        mine[i, 0] = len(shape)
        mine[i, 1:1 + len(shape)] = torch.tensor(shape)
    mine = mine.to(xs[0].device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).cpu()  # (world, tensors, 1 + dims)
    shapes = [[tuple(row[1:1 + row[0]].tolist()) for row in per_rank] for per_rank in table]
    for i in range(len(xs)):
        if len({s[i][1:] for s in shapes}) != 1 or len({len(s[i]) for s in shapes}) != 1:
            raise ValueError("gather_with_grad: the ranks' tensors must agree in every dimension but the first "
                             f"(the batch); got {[s[i] for s in shapes]} for tensor {i}")
    sizes = [[s[i][0] for s in shapes] for i in range(len(xs))]
    _sizes_seen[key] = sizes
    return sizes


def gather_with_grad(*xs: torch.Tensor):
    """Each x concatenated over all ranks along dim 0, in rank order (a tuple when several are
    given); the identity without a process group. Gradients flow back to each rank's slice,
    summed over ranks."""
    if not xs:
        raise TypeError("gather_with_grad: expected at least one tensor")
    if is_distributed():
        sizes = _exchange_sizes(xs)
        xs = tuple(_GatherWithGrad.apply(x, n) for x, n in zip(xs, sizes))
    return xs[0] if len(xs) == 1 else xs
