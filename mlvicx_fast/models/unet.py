"""U-Net with a (pretrained) ResNet18 encoder, for SIIM-ACR pneumothorax segmentation (DESIGN.md section 6).

Encoder: any module with ``forward_taps(x)`` giving the five ResNet18 stage maps (the plain
ResNet18 or the MLVICX encoder with its context blocks), channels 64, 64, 128, 256, 512 at
H/2, H/4, H/8, H/16, H/32. Decoder (randomly initialised), from the deepest map up::

    d4 = up(t4) ++ t3 -> Block(512 + 256 -> 256)     H/16
    d3 = up(d4) ++ t2 -> Block(256 + 128 -> 128)     H/8
    d2 = up(d3) ++ t1 -> Block(128 + 64  -> 64)      H/4
    d1 = up(d2) ++ t0 -> Block(64  + 64  -> 32)      H/2
    d0 = up(d1)       -> Block(32        -> 16)      H
    logits = Conv1x1(16 -> classes)

up = bilinear resize to the skip map's size (any H, W works; sizes divisible by 32 keep every
level aligned), ++ = channel concatenation, Block = (Conv3x3, BN, ReLU) twice.
Bilinear resizing is separable: up(y) = K_h y K_w^T with the 1-D linear-interpolation matrices
K_h (H' x H) and K_w (W' x W). CUDA's bilinear backward adds with atomics (its order, and so its
last bits, vary from run to run, and torch has no deterministic version), so with deterministic
algorithms on (``--deterministic``) a CUDA model resizes by these two matrix products instead:
the same values up to rounding, and a backward that repeats exactly.
``freeze_encoder()`` is the frozen protocol: encoder parameters do not train and its BN layers
stay in eval mode (running statistics are kept), also after ``train()``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.aggregate import linear_resize_matrix
from .resnet import STAGE_CHANNELS

__all__ = ["UNet", "DecoderBlock", "resize_bilinear"]


def resize_bilinear(y: torch.Tensor, size, by_matrices=None) -> torch.Tensor:
    """F.interpolate(y, size, mode='bilinear', align_corners=False), or the same as K_h y K_w^T
    (by_matrices: None = when deterministic algorithms are on and y is on CUDA, see above)."""
    if by_matrices is None:
        by_matrices = y.is_cuda and torch.are_deterministic_algorithms_enabled()
    if not by_matrices:
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False)
    k_h = linear_resize_matrix(y.shape[-2], size[0], y.device, y.dtype)  # autocast casts both factors alike
    k_w = linear_resize_matrix(y.shape[-1], size[1], y.device, y.dtype)
    return torch.matmul(torch.matmul(k_h, y), k_w.t())


class DecoderBlock(nn.Sequential):
    def __init__(self, in_channels: int, channels: int):
        super().__init__(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """``logits = UNet(encoder)(x)``: (N, classes, H, W) mask logits for x (N, C, H, W)."""

    def __init__(self, encoder: nn.Module, classes: int = 1, encoder_channels: Sequence[int] = STAGE_CHANNELS,
                 decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)):
        super().__init__()
        if not hasattr(encoder, "forward_taps"):
            raise TypeError(f"UNet: the encoder must have forward_taps(x) giving the five stage maps; "
                            f"got {type(encoder).__name__}")
        if len(encoder_channels) != 5 or len(decoder_channels) != 5:
            raise ValueError(f"UNet: expected 5 encoder and 5 decoder widths, got {list(encoder_channels)} "
                             f"and {list(decoder_channels)}")
        self.encoder = encoder
        self.frozen = False
        skips = list(encoder_channels[:4])[::-1]  # t3, t2, t1, t0
        blocks, c = [], encoder_channels[4]
        for skip, out in zip(skips + [0], decoder_channels):
            blocks.append(DecoderBlock(c + skip, out))
            c = out
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(c, classes, 1)

    def freeze_encoder(self) -> "UNet":
        self.frozen = True
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.encoder.eval()
        return self

    def train(self, mode: bool = True) -> "UNet":
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.encoder.forward_taps(x)
        y = taps[4]
        for block, skip in zip(self.decoder[:4], (taps[3], taps[2], taps[1], taps[0])):
            y = resize_bilinear(y, skip.shape[-2:])
            y = block(torch.cat([y, skip], dim=1))
        y = resize_bilinear(y, x.shape[-2:])
        return self.head(self.decoder[4](y))
