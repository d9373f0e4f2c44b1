"""ContextBottleneck: the MLVICX context-bottleneck block as a module over
:func:`mlvicx_fast.ops.context_bottleneck`."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.context_bottleneck import BACKENDS, SPATIAL_KERNEL, context_bottleneck


class ContextBottleneck(nn.Module):
    """CBAM-style block without residual: ``s * (a * x)``, a channel gate then a spatial gate.

    Parameters (the official block's weights, under our names):
      ``mlp.0.weight``   (C/r, C, 1, 1)  shared MLP, first 1x1 conv, no bias
      ``mlp.2.weight``   (C, C/r, 1, 1)  shared MLP, second 1x1 conv, no bias
      ``spatial.weight`` (1, 2, 7, 7)    spatial conv, input 0 = channel mean, 1 = channel max
    C/r is ``max(1, channels // reduction)``; the official code uses r = 2. There is no bias and
    no normalisation. ``backend`` picks the fused Triton op ('triton', or 'auto' on CUDA) or the
    plain-torch official form ('torch' / 'reference').
    """

    def __init__(self, channels: int, reduction: int = 2, backend: str = "auto"):
        super().__init__()
        if channels < 1:
            raise ValueError(f"ContextBottleneck: channels must be >= 1, got {channels}")
        if reduction < 1:
            raise ValueError(f"ContextBottleneck: reduction must be >= 1, got {reduction}")
        if backend not in BACKENDS:
            raise ValueError(f"ContextBottleneck: unknown backend {backend!r}; expected one of {BACKENDS}")
        hidden = max(1, channels // reduction)
        self.channels, self.reduction, self.backend = channels, reduction, backend
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.spatial = nn.Conv2d(2, 1, SPATIAL_KERNEL, padding=SPATIAL_KERNEL // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] != self.channels:
            raise ValueError(
                f"ContextBottleneck: expected {self.channels} input channels, got x of shape {tuple(x.shape)}"
            )
        return context_bottleneck(x, self.mlp[0].weight, self.mlp[2].weight, self.spatial.weight,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}, backend={self.backend!r}"
