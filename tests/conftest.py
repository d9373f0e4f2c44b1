"""Test set-up shared by every test module.

* Without a GPU, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set
  before the kernels are defined, so it is set here, before any test imports mlvicx_fast.
  On a GPU machine (benchmarks/gpu_check.sh) it is left unset and the kernels are compiled.
* Every test gets fresh random inputs: the global torch/numpy/random seeds are drawn anew for
  each test and printed, so a failure can be replayed with MLVICX_TEST_SEED=<seed>.
* A test that leaves torch on another thread count than the session's fails (and the count is
  put back), so no test runs the later ones on one core.
* The interpreter runs a launch's programs one after another in grid order; a GPU runs them
  concurrently in no order. So that a kernel whose program reads what another program of the
  same launch writes fails here too, every launch runs its programs in a fresh random order
  (drawn from the test's seed). MLVICX_INTERPRET_ORDER=forward|reverse|shuffle (default shuffle).
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


INTERPRET_ORDER = os.environ.get("MLVICX_INTERPRET_ORDER", "shuffle")
if INTERPRET_ORDER not in ("forward", "reverse", "shuffle"):
    raise ValueError(f"MLVICX_INTERPRET_ORDER={INTERPRET_ORDER!r}: expected forward, reverse or shuffle")


def _permute_interpreter_programs():
    """Make Triton's interpreter visit each launch's grid in a permuted order.

    Its executor loops x, y, z over the grid and calls set_grid_idx before each program; mapping
    that index through a bijection of the grid (drawn when set_grid_dim starts a launch) permutes
    the programs without touching the loop. Programs still run one at a time, so this exposes
    order dependence between programs, not races inside one."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def set_grid_dim(self, nx, ny, nz):
        set_dim(self, nx, ny, nz)
        n = nx * ny * nz
        if INTERPRET_ORDER == "reverse":
            self._mlvicx_order = list(range(n - 1, -1, -1))
        else:
            self._mlvicx_order = random.sample(range(n), n)

    def set_grid_idx(self, x, y, z):
        nx, ny, nz = self.grid_dim
        k = self._mlvicx_order[(x * ny + y) * nz + z]
        set_idx(self, k // (ny * nz), (k // nz) % ny, k % nz)

    builder.set_grid_dim, builder.set_grid_idx = set_grid_dim, set_grid_idx


from mlvicx_fast.ops._triton import HAS_TRITON, interpreting  # noqa: E402 (after TRITON_INTERPRET is set)

if HAS_TRITON and interpreting() and INTERPRET_ORDER != "forward":
    _permute_interpreter_programs()

if HAS_TRITON and interpreting():
    import triton
    import triton.language as tl

    @triton.jit
    def _loop_over_a_loaded_bound(n_ptr, out_ptr):
        acc = 0
        for _ in range(0, tl.load(n_ptr)):
            acc += 1
        tl.store(out_ptr, acc)


def _interpreter_problem():
    """Why Triton's interpreter cannot run this package's kernels here, or None.

    Triton 3.6's interpreter turns a loaded scalar into a Python int through numpy's conversion of a
    1-element array, an error from numpy 2.4 on; every kernel with a loop over a loaded bound then
    fails (160 tests, seen 2026-12-04 with triton 3.6.0 and numpy 2.4.6 and 2.5.5; triton 3.9.0
    with numpy 2.4.6 is fine). One tiny launch tells, whatever the versions."""
    if not (HAS_TRITON and interpreting()):
        return None
    n, out = torch.tensor([3], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    try:
        _loop_over_a_loaded_bound[(1,)](n, out)
    except Exception as e:  # noqa: BLE001 - any failure is the message
        return f"{type(e).__name__}: {e}"
    return None if out.item() == 3 else f"the loop ran {out.item()} times instead of 3"


@pytest.fixture(autouse=True)
def fresh_seed(request):
    env = os.environ.get("MLVICX_TEST_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    print(f"[seed] {request.node.nodeid}: MLVICX_TEST_SEED={seed}")
    return seed


THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads_left_alone():
    """A test (or the package code it runs) that leaves torch on another thread count fails: such a
    leak put every later in-process training of the session on one core (a bare `import ffcv`,
    and the phantom writer), and made an in-process run differ in the last bits from a fresh one."""
    torch.set_num_threads(THREADS)
    yield
    left = torch.get_num_threads()
    if left != THREADS:
        torch.set_num_threads(THREADS)
        pytest.fail(f"the test left torch on {left} thread(s); the session runs on {THREADS}")


def pytest_report_header(config):
    mode = "compiled on CUDA" if torch.cuda.is_available() else "TRITON_INTERPRET=1 (CPU interpreter)"
    return f"mlvicx_fast tests: torch {torch.__version__}; Triton kernels {mode}"


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Wrap pytest's unraisable-exception hook (installed in its own pytest_configure) in the one the
    CLIs install, so numba's harmless finalizer KeyError under FFCV (see
    mlvicx_fast/data/loader.py) is not reported as a warning; every other one still is. Then stop
    with the reason if Triton's interpreter cannot run the kernels here (instead of 160 failures)."""
    from mlvicx_fast.data.loader import drop_numba_finalizer_errors

    drop_numba_finalizer_errors()
    problem = _interpreter_problem()
    if problem:
        import triton
        raise pytest.UsageError(
            f"Triton {triton.__version__}'s CPU interpreter failed a one-loop test kernel here, beside numpy "
            f"{np.__version__} ({problem}), so it cannot run this package's kernels. Triton 3.6 (torch 2.11's) "
            "fails so with numpy >= 2.4: use triton>=3.9 (scripts/setup.sh --dev installs triton==3.9.0 beside a "
            "CPU torch) or numpy<2.4, or run the tests on a GPU, where the kernels are compiled.")
