"""Networks: ResNet18 (torchvision layout) and the MLVICX pretraining network."""
from .mlvicx import MLVICX, PRESETS, ContextEncoder
from .resnet import ResNet18

__all__ = ["MLVICX", "PRESETS", "ContextEncoder", "ResNet18"]
