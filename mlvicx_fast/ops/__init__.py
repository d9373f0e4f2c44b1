"""Fused ops: each file holds the math, the Triton kernels, the autograd glue and a torch reference."""
from .aggregate import aggregate, aggregate_exact, aggregate_official
from .context_bottleneck import context_bottleneck, context_bottleneck_reference
from .vicreg import vicreg_loss, vicreg_loss_reference

__all__ = ["aggregate", "aggregate_exact", "aggregate_official", "context_bottleneck", "context_bottleneck_reference", "vicreg_loss", "vicreg_loss_reference"]
