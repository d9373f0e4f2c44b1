"""Chest X-ray data: reading the four datasets, the phantom set, .beton preparation and loaders.

    python -m mlvicx_fast.data.prepare {nih,vinbig,rsna,siim,phantom} --root DIR --out DIR

From Python: `mlvicx_fast.data.prepare.prepare(...)` prepares a dataset, `ensure_phantom(...)`
the built-in phantom set, `make_loader(...)` reads either.
"""
import importlib

from .datasets import NIH_LABELS, RSNA_LABELS, SIIM_LABELS, VINBIG_LABELS
from .loader import make_loader

__all__ = ["NIH_LABELS", "VINBIG_LABELS", "RSNA_LABELS", "SIIM_LABELS", "ensure_phantom", "make_loader"]


def __getattr__(name):
    # the prepare module is imported on first use: imported here, `python -m mlvicx_fast.data.prepare`
    # would find it in sys.modules before running it as __main__ (runpy warns; two copies of it)
    if name == "ensure_phantom":
        return importlib.import_module(".prepare", __name__).ensure_phantom
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
