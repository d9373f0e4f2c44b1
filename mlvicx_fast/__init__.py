"""mlvicx_fast: MLVICX self-supervised pretraining for chest X-rays, with fused Triton kernels."""
__version__ = "0.1.0"

from .nn.context import ContextBottleneck  # noqa: E402
from .nn.loss import MLVICXLoss, VICRegLoss  # noqa: E402
from .models import MLVICX, ResNet18  # noqa: E402

__all__ = ["ContextBottleneck", "MLVICX", "MLVICXLoss", "ResNet18", "VICRegLoss", "__version__"]
