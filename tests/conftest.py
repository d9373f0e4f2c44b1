"""Test set-up shared by every test module.

* Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
  before the kernels are defined, so it is set here, before any test imports mlvicx_fast.
  On a GPU machine (benchmarks/gpu_check.sh) it is left unset and the kernels are compiled.
* Every test gets fresh random inputs: the global torch/numpy/random seeds are drawn anew for
  each test and printed, so a failure can be replayed with MLVICX_TEST_SEED=<seed>.
"""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # the tests compare with float32/float64 references: cuDNN's TF32 convolutions (on by default)
    # move a network's output by ~1e-3 and flip ReLU signs between two otherwise equal runs
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed(request):
    env = os.environ.get("MLVICX_TEST_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    print(f"[seed] {request.node.nodeid}: MLVICX_TEST_SEED={seed}")
    return seed


def pytest_report_header(config):
    mode = "compiled on CUDA" if torch.cuda.is_available() else "TRITON_INTERPRET=1 (CPU interpreter)"
    return f"mlvicx_fast tests: torch {torch.__version__}; Triton kernels {mode}"
