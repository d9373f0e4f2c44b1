"""GraphedStep on a GPU: the training step replayed from one CUDA graph takes the steps the eager
step takes (benchmarks/gpu_check.sh runs this with the kernels compiled; skipped without CUDA)."""
import pytest
import torch

from mlvicx_fast import train
from mlvicx_fast.cuda_graph import GraphedStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture
def deterministic_cudnn():
    """The two runs compared must differ by rounding at most: cuDNN's own choice of algorithms
    (some sum in no fixed order) would add noise that four steps amplify."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def _parts(precision):
    cfg = train.resolve(train.Config(data="x", preset="paper", dim=64, image_size=64, batch_size=8, compile=False,
                                     cuda_graph=False, channels_last=True, precision=precision, device="cuda"))
    torch.manual_seed(0)
    parts = train.build_training(cfg, torch.device("cuda"), 1)
    # a small lr: at 0.2 the BN parameters move by O(1) a step, and rounding differences between
    # two correct runs grew past any useful tolerance within two steps
    parts.lr.fill_(1e-3)
    return parts


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_step_takes_the_eager_steps(precision, deterministic_cudnn):
    views = [(torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last),
              torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)) for _ in range(4)]
    eager, graphed = _parts(precision), _parts(precision)
    start = [p.detach().clone() for p in eager.model.parameters()]
    step = GraphedStep(graphed.step, graphed.model, graphed.opt)
    first_tol, tol = (1e-5, 1e-3) if precision == "fp32" else (1e-2, 3e-2)
    for i, (x1, x2) in enumerate(views):
        a, b = eager.step(x1, x2), step(x1, x2)
        # step 1 first: the warm-up steps before the capture are undone, so the first replay is the
        # first step (not undone, it would be the fourth: another loss)
        torch.testing.assert_close(b, a, rtol=first_tol if i == 0 else tol, atol=1e-5)
    # the updates of all parameters together (one LARS step moves a weight by ~1e-3 * lr of itself:
    # compare what moved, not the weights; a graph that did not update, or updated twice, is off by ~1)
    moved_eager = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(eager.model.parameters(), start)])
    moved_graph = torch.cat([(q.detach() - p0).flatten() for q, p0 in zip(graphed.model.parameters(), start)])
    assert moved_eager.norm() > 0
    assert (moved_graph - moved_eager).norm() <= (1e-2 if precision == "fp32" else 1e-1) * moved_eager.norm()
    with pytest.raises(ValueError, match=r"captured for views \(8, 3, 64, 64\)"):
        step(views[0][0][:4], views[0][1][:4])
