"""pytest-benchmark micro-benchmarks of the CPU path (torch Gram backend vs the official formula).

They time forward + backward and then check the value they timed, so they can fail. Run with
`python -m pytest tests/test_bench_loss.py --benchmark-enable` for proper numbers; in the
regular suite they run a few rounds only (pyproject's addopts).
"""
import pytest
import torch

from mlvicx_fast.ops.vicreg import vicreg_loss, vicreg_loss_reference


@pytest.mark.parametrize("shape", [(64, 2048), (256, 1024), (1024, 128)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("provider", ["official", "ours"])
def test_loss_fwd_bwd_cpu(benchmark, shape, provider):
    z1 = torch.randn(*shape, requires_grad=True)
    z2 = torch.randn(*shape, requires_grad=True)
    fn = vicreg_loss_reference if provider == "official" else (lambda a, b: vicreg_loss(a, b, backend="torch"))

    def step():
        z1.grad = z2.grad = None
        loss = fn(z1, z2)
        loss.backward()
        return loss.detach()

    benchmark.group = f"vicreg {shape[0]}x{shape[1]} fp32 cpu"
    loss = benchmark(step)
    ref = vicreg_loss_reference(z1.detach().double(), z2.detach().double())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
