"""MultiLevelAggregation: the trained 1x1 projections of the MLVICX taps and their sum, pooled,
over :mod:`mlvicx_fast.ops.aggregate`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops.aggregate import AGGREGATIONS, aggregate


class MultiLevelAggregation(nn.Module):
    """``flatten(pool_QxQ(sum_p conv1x1_p(resize_RxR(y_p))))``: (N, width * pool * pool).

    ``proj.<p>`` is Conv2d(C_p, width, 1) with bias, an ordinary trained submodule (the official
    code creates these lazily after the optimizer, so they stay at their random init there).
    mode='exact' pools each map first (no R x R map, same value); 'official' runs the resize.
    """

    def __init__(self, channels: Sequence[int], width: int = 512, resize: int = 64, pool: int = 4,
                 mode: str = "exact"):
        super().__init__()
        if mode not in AGGREGATIONS:
            raise ValueError(f"MultiLevelAggregation: unknown mode {mode!r}; expected one of {tuple(AGGREGATIONS)}")
        self.channels, self.width, self.resize, self.pool, self.mode = tuple(channels), width, resize, pool, mode
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.channels)

    @property
    def out_features(self) -> int:
        return self.width * self.pool * self.pool

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.proj):
            raise ValueError(f"MultiLevelAggregation: expected {len(self.proj)} maps, got {len(maps)}")
        for i, (y, c) in enumerate(zip(maps, self.channels)):
            if y.dim() == 4 and y.shape[1] != c:
                raise ValueError(
                    f"MultiLevelAggregation: map {i} should have {c} channels, got shape {tuple(y.shape)}"
                )
        return aggregate(maps, [p.weight for p in self.proj], [p.bias for p in self.proj],
                         self.resize, self.pool, self.mode)

    def extra_repr(self) -> str:
        return f"width={self.width}, resize={self.resize}, pool={self.pool}, mode={self.mode!r}"
