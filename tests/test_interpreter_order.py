"""The interpreter runs each launch's programs in a permuted order (tests/conftest.py), so a kernel
whose programs depend on one another's writes fails in CI as it would race on a GPU."""
import os

import pytest
import torch

from mlvicx_fast.ops._triton import HAS_TRITON, interpreting

pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and interpreting()) or os.environ.get("MLVICX_INTERPRET_ORDER") == "forward",
    reason="only the CPU interpreter's program order is permuted",
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chain_kernel(ptr):
        # program i adds one to what program i - 1 left: [1, 2, ..., n] only in grid order
        pid = tl.program_id(0)
        prev = tl.load(ptr + pid - 1, mask=pid > 0, other=0.0)
        tl.store(ptr + pid, prev + 1.0)

    @triton.jit
    def _visit_kernel(ptr):
        # each program adds its own linear index + 1 to a slot of its own and counts its visit
        i = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        tl.store(ptr + 2 * i, tl.load(ptr + 2 * i) + 1.0)
        tl.store(ptr + 2 * i + 1, i.to(tl.float32) + 1.0)


def test_programs_run_out_of_grid_order():
    x = torch.rand(16) + 5.0  # overwritten by every program
    _chain_kernel[(16,)](x)
    assert not torch.equal(x, torch.arange(1.0, 17.0)), "the programs ran in grid order"


@pytest.mark.parametrize("grid", [(7,), (3, 5), (2, 3, 4), (1, 1, 1)])
def test_every_program_runs_once(grid):
    n = 1
    for g in grid:
        n *= g
    x = torch.zeros(2 * n)
    _visit_kernel[grid](x)
    assert torch.equal(x[0::2], torch.ones(n)), f"programs ran {x[0::2].tolist()} times, expected once each"
    assert torch.equal(x[1::2], torch.arange(1.0, n + 1)), x[1::2].tolist()
