"""Helpers for torch.distributed: the official VICReg all-gather with gradients."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradients of all ranks and keeps this rank's slice.

    As ``FullGatherLayer`` in the official VICReg code: every rank computes the loss of the global
    batch, so the summed gradient is world_size * dL/d(local slice), which DistributedDataParallel's
    averaging turns back into the gradient of the single-process loss.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


_checked_shapes = set()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank (equal shapes required); identity without a process group.

    The shapes of all ranks are compared the first time a shape is seen (a host-side exchange);
    later calls with that shape launch only the all-gather, so a CUDA graph can capture them."""
    if not is_distributed():
        return x
    if tuple(x.shape) not in _checked_shapes:
        shapes = [None] * dist.get_world_size()
        dist.all_gather_object(shapes, tuple(x.shape))
        if len(set(shapes)) != 1:
            raise ValueError(f"gather_with_grad: every rank must hold the same local batch shape, got {shapes}")
        _checked_shapes.add(tuple(x.shape))
    return _GatherWithGrad.apply(x)
