"""Exact pool-first aggregation against the official resize-project-sum-pool form."""
import importlib

import pytest
import torch

from mlvicx_fast.nn import MultiLevelAggregation
from mlvicx_fast.ops.aggregate import aggregate_exact, aggregate_official, resize_pool_matrix

from .helpers import rel_err

TAPS_224 = [(64, 112, 112), (64, 56, 56), (128, 28, 28), (256, 14, 14), (512, 7, 7)]
ODD = [(3, 1, 1), (5, 13, 5), (7, 65, 64), (4, 3, 100), (6, 64, 64)]
SIDE1 = [(3, 1, 3), (4, 2, 1), (5, 1, 70), (2, 7, 1)]  # a side of 1 beside a longer one (a 32 x 64 input's last tap)


def make(taps, n, width, dtype=torch.float64, channels_last=False):
    maps = [torch.randn(n, c, h, w, dtype=dtype) for c, h, w in taps]
    if channels_last:
        maps = [m.contiguous(memory_format=torch.channels_last) for m in maps]
    weights = [torch.randn(width, c, 1, 1, dtype=dtype) / c**0.5 for c, _, _ in taps]
    biases = [torch.randn(width, dtype=dtype) for _ in taps]
    return maps + weights + biases


def value_and_grads(fn, tensors, grad_out, resize, pool):
    t = [x.detach().clone().requires_grad_() for x in tensors]
    k = len(t) // 3
    out = fn(t[:k], t[k:2 * k], t[2 * k:], resize=resize, pool=pool)
    out.backward(grad_out.to(out.dtype))
    return out, [x.grad for x in t]


@pytest.mark.parametrize(
    "taps,resize,pool,width",
    [(TAPS_224, 64, 4, 512), (ODD, 64, 4, 32), (ODD, 20, 3, 16), (ODD[:2], 7, 7, 8), (SIDE1, 64, 4, 16)],
    ids=["taps224", "odd", "odd-r20-q3", "odd-r7-q7", "side-1"],
)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_exact_matches_official(taps, resize, pool, width, channels_last):
    """float32 exact form within 1e-5 of the official form (evaluated in float64), forward and
    every gradient; and equal to it to rounding when both run in float64."""
    n = 2
    tensors = make(taps, n, width, torch.float64, channels_last)
    grad_out = torch.randn(n, width * pool * pool, dtype=torch.float64)
    ref, ref_grads = value_and_grads(aggregate_official, tensors, grad_out, resize, pool)
    out64, grads64 = value_and_grads(aggregate_exact, tensors, grad_out, resize, pool)
    assert rel_err(out64, ref) < 1e-12
    for g, r in zip(grads64, ref_grads):
        assert rel_err(g, r) < 1e-12
    out32, grads32 = value_and_grads(aggregate_exact, [t.float() for t in tensors], grad_out, resize, pool)
    assert out32.dtype == torch.float32 and out32.shape == (n, width * pool * pool)
    assert rel_err(out32, ref) < 1e-5
    for i, (g, r) in enumerate(zip(grads32, ref_grads)):
        assert rel_err(g, r) < 1e-5, f"gradient {i}"


def test_resize_pool_matrix_is_a_weighted_average():
    for size in (1, 7, 64, 112, 113):
        k = resize_pool_matrix(size, 64, 4, dtype=torch.float64)
        assert k.shape == (4, size)
        torch.testing.assert_close(k.sum(1), torch.ones(4, dtype=torch.float64))
        assert (k >= 0).all()


def test_module_modes_agree_and_state_dict():
    agg = MultiLevelAggregation([8, 16], width=32)
    assert sorted(agg.state_dict()) == ["proj.0.bias", "proj.0.weight", "proj.1.bias", "proj.1.weight"]
    maps = [torch.randn(3, 8, 20, 20), torch.randn(3, 16, 10, 10)]
    exact = agg(maps)
    agg.mode = "official"
    torch.testing.assert_close(exact, agg(maps), rtol=1e-5, atol=1e-5)
    assert exact.shape == (3, agg.out_features) == (3, 32 * 16)


def test_training_after_a_first_call_under_inference_mode():
    """The pooling matrices are cached per map size; one first built under inference_mode (a
    validation pass, a shape probe) must not break the training steps that come after."""
    agg = MultiLevelAggregation([8, 16], width=32)
    sizes = [(23, 17), (9, 11)]  # sizes no other test uses, so the first call builds the matrices
    maps = [torch.randn(2, c, h, w) for c, (h, w) in zip((8, 16), sizes)]
    with torch.inference_mode():
        agg(maps)
    agg([m.requires_grad_() for m in maps]).square().sum().backward()
    assert all(m.grad is not None for m in maps)


def test_matrix_cache_keeps_the_most_recently_used(monkeypatch):
    """Many input sizes must not grow the pooling-matrix cache for good: it keeps the
    MATRIX_CACHE_SIZE most recently used, and a hit renews its entry."""
    agg_op = importlib.import_module("mlvicx_fast.ops.aggregate")  # ops.aggregate is also a function

    monkeypatch.setattr(agg_op, "MATRIX_CACHE_SIZE", 3)
    monkeypatch.setattr(agg_op, "_MATRICES", type(agg_op._MATRICES)())
    first = agg_op.pooling_matrix(5, 6)
    for h in (7, 8):
        agg_op.pooling_matrix(h, 6)
    assert agg_op.pooling_matrix(5, 6) is first  # a hit, now the most recent entry
    agg_op.pooling_matrix(9, 6)  # evicts (7, 6), the least recently used
    sizes = [key[:2] for key in agg_op._MATRICES]
    assert sizes == [(8, 6), (5, 6), (9, 6)]
    assert agg_op.pooling_matrix(5, 6) is first
    rebuilt = agg_op.pooling_matrix(7, 6)
    torch.testing.assert_close(rebuilt, agg_op.pooling_matrix(7, 6))
    assert len(agg_op._MATRICES) == 3


def test_bad_inputs():
    w, b = [torch.ones(4, 3, 1, 1)], [torch.ones(4)]
    with pytest.raises(ValueError, match="at least one feature map"):
        aggregate_exact([], [], [])
    with pytest.raises(ValueError, match=r"projection 0 must have shape \(4, 5, 1, 1\) .* got \(4, 3, 1, 1\)"):
        aggregate_exact([torch.randn(2, 5, 4, 4)], w, b)
    with pytest.raises(ValueError, match=r"map 0 must be 4-D \(N, C, H, W\), got shape \(3, 4, 4\)"):
        aggregate_exact([torch.randn(3, 4, 4)], w, b)
    for shape in ((2, 3, 0, 4), (2, 3, 4, 0)):
        with pytest.raises(ValueError, match=rf"every dimension of map 0 must be >= 1, got shape \({', '.join(map(str, shape))}\)"):
            aggregate_exact([torch.randn(*shape)], w, b)
    with pytest.raises(ValueError, match="map 1 has batch 3 but map 0 has 2"):
        aggregate_exact([torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4)], w * 2, b * 2)
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        MultiLevelAggregation([3], mode="fast")
    with pytest.raises(ValueError, match=r"map 0 should have 3 channels, got shape \(2, 5, 4, 4\)"):
        MultiLevelAggregation([3], width=4)([torch.randn(2, 5, 4, 4)])


def test_compiled_aggregation_traces_once():
    """Under torch.compile the pooling matrices are built in the graph: a lookup in their cache
    made dynamo guard on it, so the entry the first trace added recompiled the network on its
    second call. Three calls, fresh inputs each time: one trace, the eager value."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    taps = [(3, 9, 7), (5, 4, 4)]
    fn = torch.compile(lambda m, w, b: aggregate_exact(m, w, b, resize=16, pool=3), backend=counter, fullgraph=True)
    for _ in range(3):
        t = make(taps, 2, 6, dtype=torch.float32)
        got = fn(t[:2], t[2:4], t[4:])
        assert rel_err(got, aggregate_official(t[:2], t[2:4], t[4:], resize=16, pool=3)) < 1e-5
    assert counter.frame_count == 1, f"{counter.frame_count} traces for one shape"
