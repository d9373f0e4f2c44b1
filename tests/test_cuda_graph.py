"""GraphedStep on a GPU: the training step replayed from one CUDA graph takes the steps the eager
step takes (benchmarks/gpu_check.sh runs this with the kernels compiled; skipped without CUDA)."""
import pytest
import torch

from mlvicx_fast import train
from mlvicx_fast.cuda_graph import GraphedStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _parts(precision):
    cfg = train.resolve(train.Config(data="x", preset="paper", dim=64, image_size=64, batch_size=8, compile=False,
                                     cuda_graph=False, channels_last=True, precision=precision, device="cuda"))
    torch.manual_seed(0)
    parts = train.build_training(cfg, torch.device("cuda"), 1)
    parts.lr.fill_(0.2)
    return parts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_takes_the_eager_steps(precision):
    views = [(torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last),
              torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)) for _ in range(4)]
    eager, graphed = _parts(precision), _parts(precision)
    start = [p.detach().clone() for p in eager.model.parameters()]
    step = GraphedStep(graphed.step, graphed.model, graphed.opt)
    for x1, x2 in views:
        a, b = eager.step(x1, x2), step(x1, x2)
        # the warm-up steps before the capture are undone: the first replay is the first step
        torch.testing.assert_close(b, a, rtol=1e-4 if precision == "fp32" else 2e-2, atol=1e-5)
    # the updates (LARS moves a weight by ~1e-4 of itself a step: compare what moved, not the weights)
    tol = 1e-3 if precision == "fp32" else 5e-2
    for (name, p), q, p0 in zip(eager.model.named_parameters(), graphed.model.parameters(), start):
        moved = (p - p0).norm()
        if moved > 0:
            assert ((q - p0) - (p - p0)).norm() <= tol * moved, name
        else:
            assert torch.equal(q, p0), name
    with pytest.raises(ValueError, match=r"captured for views \(8, 3, 64, 64\)"):
        step(views[0][0][:4], views[0][1][:4])
