"""ResNet18 with torchvision's parameter names, so its (and timm's) state_dicts load unchanged.

Layout (He et al. 2016, torchvision ``resnet18``)::

    conv1 7x7/2 (3 or 1 -> 64, no bias), bn1, relu          -> stem, 64 x H/2
    maxpool 3x3/2, layer1: 2 BasicBlocks 64                   -> 64  x H/4
    layer2: 2 BasicBlocks 128, first with stride 2            -> 128 x H/8
    layer3: 2 BasicBlocks 256, stride 2                       -> 256 x H/16
    layer4: 2 BasicBlocks 512, stride 2                       -> 512 x H/32
    avgpool 1x1 (a mean over the pixels), flatten, optional fc 512 -> num_classes

BasicBlock: conv1 3x3 (stride), bn1, relu, conv2 3x3, bn2, + identity (``downsample.0`` 1x1
conv with stride, ``downsample.1`` BN, when the shape changes), relu. Without fc the model holds
11,176,512 parameters. Initialisation as torchvision: Kaiming normal (fan_out, ReLU) for the
convolutions, BN weight 1 and bias 0.

Loading: a ``conv1.weight`` with the other channel count is converted by :func:`convert_stem`
(a 3-channel checkpoint into a 1-channel stem, or back), and ``fc.*`` entries are dropped when the
model has no fc. A ``module.`` (DataParallel, DDP) or ``_orig_mod.`` (torch.compile) prefix shared by
every key is dropped. All of this happens in ``load_state_dict`` (also when this ResNet is a
submodule), so ``strict=True`` loads a torchvision or timm checkpoint, or one saved from a wrapped
model, as it is.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

# the package's input normalisation: a grey image x in [0, 1] enters a 3-channel stem as
# (x - MEAN[c]) / STD[c] for c = 0, 1, 2 and a 1-channel stem as (x - MEAN[0]) / STD[0]
from ..ops.augment import IMAGENET_MEAN, IMAGENET_STD

STAGE_CHANNELS = (64, 64, 128, 256, 512)  # stem, layer1, layer2, layer3, layer4


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C, 1, 1) mean over the pixels: nn.AdaptiveAvgPool2d(1)'s value, written
    as a mean because AdaptiveAvgPool2d's CUDA backward has no deterministic version (torch warns
    under deterministic algorithms), while a mean's backward is a broadcast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


def strip_wrappers(state_dict, prefix: str = "", wrappers=WRAPPER_PREFIXES) -> None:
    """Rename, in place, the keys under ``prefix`` when every one of them starts with
    ``prefix + w`` for a wrapper prefix w (repeatedly: a compiled DDP model has both)."""
    while True:
        keys = [k for k in state_dict if k.startswith(prefix)]
        wrapper = next((w for w in wrappers if keys and all(k.startswith(prefix + w) for k in keys)), None)
        if wrapper is None:
            return
        # every key is taken out before any goes back: 'module.module.a' renamed while
        # 'module.a' is still there would overwrite it
        renamed = {prefix + k[len(prefix + wrapper):]: state_dict.pop(k) for k in keys}
        state_dict.update(renamed)


def convert_stem(state_dict, prefix: str, in_chans: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The state_dict with ``prefix + 'conv1.weight'`` converted to in_chans input channels, so the
    stem computes what it did on the same grey image under the normalisation above (a new dict;
    unchanged when the channels already agree or the key is absent).

    1 -> 3: the weight goes on channel 0 and zeros on 1 and 2; channel 0 carries exactly the
    1-channel input, so the output is identical.
    3 -> 1: with u = (x - mean0) / std0, channel c is (std0 / std_c) u + (mean0 - mean_c) / std_c,
    so w' = sum_c w_c std0 / std_c, and the constant part, a per-filter offset
    b = sum_{c,taps} w_c (mean0 - mean_c) / std_c, is folded into ``bn1.running_mean`` (minus b):
    identical in eval mode except on the 3-pixel border, where the zero padding differs (in train
    mode the batch statistics remove the offset anyway). Summing the channels, the usual recipe,
    is off by ~20 % at the stem with per-channel statistics."""
    key = prefix + "conv1.weight"
    w = state_dict.get(key)
    if w is None or w.dim() != 4 or (w.shape[1], in_chans) not in ((1, 3), (3, 1)):
        return state_dict
    out = dict(state_dict)
    if in_chans == 3:
        out[key] = torch.cat([w, torch.zeros_like(w), torch.zeros_like(w)], dim=1)
        return out
    wd = w.double()
    ratio = torch.tensor([std[0] / s for s in std], dtype=torch.float64).view(1, 3, 1, 1)
    shift = torch.tensor([(mean[0] - m) / s for m, s in zip(mean, std)], dtype=torch.float64).view(1, 3, 1, 1)
    out[key] = (wd * ratio).sum(dim=1, keepdim=True).to(w.dtype)
    rm_key = prefix + "bn1.running_mean"
    if rm_key in out:
        rm = out[rm_key]
        out[rm_key] = (rm.double() - (wd * shift).sum(dim=(1, 2, 3))).to(rm.dtype)
    return out


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet18 backbone; ``forward`` returns fc(features) with an fc, else (N, 512) features.

    Args:
        in_chans: 3 (RGB / grey replicated, as the official MLVICX code) or 1 (grey stem).
        num_classes: size of the fc layer, or None for no fc (the self-supervised backbone).
    """

    def __init__(self, in_chans: int = 3, num_classes: Optional[int] = None):
        super().__init__()
        if in_chans not in (1, 3):
            raise ValueError(f"ResNet18: in_chans must be 1 or 3, got {in_chans}")
        self.in_chans = in_chans
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, 1)
        self.layer2 = self._layer(64, 128, 2)
        self.layer3 = self._layer(128, 256, 2)
        self.layer4 = self._layer(256, 512, 2)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(512, num_classes) if num_classes else None
        self.num_features = 512
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _layer(in_channels: int, channels: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels))

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ResNet18: expected a 4-D image batch (N, {self.in_chans}, H, W), got {shape}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"ResNet18: expected {self.in_chans} input channels, got x of shape {tuple(x.shape)}"
            )
        if min(x.shape) < 1:
            raise ValueError(f"ResNet18: every dimension of x must be >= 1, got shape {tuple(x.shape)}")

    def stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Stage i of the five whose outputs MLVICX taps: 0 stem (before maxpool), 1 maxpool +
        layer1, 2 layer2, 3 layer3, 4 layer4."""
        if i == 0:
            return self.relu(self.bn1(self.conv1(x)))
        if i == 1:
            return self.layer1(self.maxpool(x))
        return (self.layer2, self.layer3, self.layer4)[i - 2](x)

    def forward_taps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five stage outputs (channels 64, 64, 128, 256, 512; H/2 ... H/32)."""
        self.check_input(x)
        taps = []
        for i in range(len(STAGE_CHANNELS)):
            x = self.stage(i, x)
            taps.append(x)
        return taps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 512) globally average-pooled layer4 features."""
        return torch.flatten(self.avgpool(self.forward_taps(x)[-1]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return features if self.fc is None else self.fc(features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        strip_wrappers(state_dict, prefix)
        converted = convert_stem(state_dict, prefix, self.in_chans)
        if converted is not state_dict:  # load_state_dict hands each module the one shared dict
            state_dict.update(converted)
        if self.fc is None:
            for name in ("fc.weight", "fc.bias"):
                state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

