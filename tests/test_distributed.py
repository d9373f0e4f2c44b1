"""gather_distributed=True on two CPU processes (gloo) equals one process on the whole batch."""
import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlvicx_fast import MLVICXLoss, VICRegLoss

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_loss(kind, backend):
    if kind == "vicreg":
        return VICRegLoss(gather_distributed=True, backend=backend)
    return MLVICXLoss(lambda_=0.7, gather_distributed=True, backend=backend)


def _forward(loss_fn, kind, head, x1, x2):
    z1, z2 = head(x1), head(x2)
    if kind == "vicreg":
        return loss_fn(z1, z2), (z1, z2)
    m1, m2 = torch.tanh(z1), torch.tanh(z2)  # a second "head" for the multi-level pair
    return loss_fn(z1, z2, m1, m2), (z1, z2)


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))


def _step_and_save(loss_fn, kind, head, x1, x2, path):
    """This rank's loss and backward; the parameter gradients averaged over ranks, as
    DistributedDataParallel does; loss, gradients and the embedding's gradient saved to path."""
    loss, (z1, _) = _forward(loss_fn, kind, head, x1, x2)
    z1.retain_grad()
    loss.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    for g in grads:
        dist.all_reduce(g)
        g /= WORLD
    torch.save({"loss": loss.detach(), "grads": grads, "z1_grad": z1.grad}, path)


def _check_ranks(out_dir, loss_fn, kind, head, x1, x2, sizes):
    """Every rank's saved result against one process on the concatenated rows (rank r held
    sizes[r] rows, in rank order)."""
    loss, (z1, _) = _forward(loss_fn, kind, head, x1[:sum(sizes)], x2[:sum(sizes)])
    z1.retain_grad()
    loss.backward()
    scale = max(p.grad.abs().max().item() for p in head.parameters())  # the bias gradient is ~0
    for rank in range(WORLD):
        got = torch.load(out_dir / f"{rank}.pt")
        assert torch.allclose(got["loss"], loss.detach(), rtol=1e-5), (sizes, got["loss"], loss)
        for g_dist, p in zip(got["grads"], head.parameters()):
            assert torch.allclose(g_dist, p.grad, rtol=1e-4, atol=1e-5 * scale), sizes
        # each rank's embedding gradient is world_size * dL/d(its slice), as the official gather gives
        start = sum(sizes[:rank])
        expect = WORLD * z1.grad[start:start + sizes[rank]]
        assert got["z1_grad"].shape == expect.shape
        assert torch.allclose(got["z1_grad"], expect, rtol=1e-4, atol=1e-6 * expect.abs().max().item())


def _worker(rank, port, kind, backend, state, x1, x2, out_dir):
    _init(rank, port)
    try:
        head = torch.nn.Linear(x1.shape[1], state["weight"].shape[0])
        head.load_state_dict(state)
        n = x1.shape[0] // WORLD
        sl = slice(rank * n, (rank + 1) * n)
        _step_and_save(_make_loss(kind, backend), kind, head, x1[sl], x2[sl], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["vicreg", "mlvicx"])
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("width", [24, 5], ids=["b<r", "b>r"])  # the Gram form and the r x r form
def test_gather_distributed_matches_single_process(tmp_path, kind, backend, width):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("gloo on CPU tensors; the compiled kernels need CUDA tensors")
    b, d = 12, 10
    x1, x2 = torch.randn(b, d), torch.randn(b, d)
    head = torch.nn.Linear(d, width)
    state = {k: v.clone() for k, v in head.state_dict().items()}

    mp.spawn(_worker, args=(_free_port(), kind, backend, state, x1, x2, str(tmp_path)), nprocs=WORLD, join=True)

    # no process group here: the gather is the identity
    _check_ranks(tmp_path, _make_loss(kind, backend), kind, head, x1, x2, [b // WORLD] * WORLD)


def _uneven_worker(rank, port, state, x1, x2, sizes, out_dir):
    """Two loss calls: equal local batches first, then the sizes given (which may differ)."""
    _init(rank, port)
    try:
        head = torch.nn.Linear(x1.shape[1], 24)
        head.load_state_dict(state)
        loss_fn = _make_loss("mlvicx", "torch")
        half = x1.shape[0] // WORLD
        sl = slice(rank * half, (rank + 1) * half)
        _forward(loss_fn, "mlvicx", head, x1[sl], x2[sl])[0].backward()  # this rank's shape is now known
        head.zero_grad()
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        _step_and_save(loss_fn, "mlvicx", head, x1[sl], x2[sl], os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("sizes", [[6, 4], [3, 6]], ids=["one-rank-changes", "both-change"])
def test_gather_uneven_local_batches(tmp_path, sizes):
    """Local batch sizes may differ between ranks, and may change on one rank only (which used to
    send the ranks into different collectives): the loss is still that of the concatenated batch."""
    b, d = 12, 9
    x1, x2 = torch.randn(b, d), torch.randn(b, d)
    head = torch.nn.Linear(d, 24)
    state = {k: v.clone() for k, v in head.state_dict().items()}

    mp.spawn(_uneven_worker, args=(_free_port(), state, x1, x2, sizes, str(tmp_path)), nprocs=WORLD, join=True)

    _check_ranks(tmp_path, _make_loss("mlvicx", "torch"), "mlvicx", head, x1, x2, sizes)


def _mismatch_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        z = torch.randn(4, 8 + rank)  # rank 1's embeddings are wider
        try:
            VICRegLoss(gather_distributed=True)(z, z.clone())
            message = "no error"
        except ValueError as e:
            message = str(e)
        (Path(out_dir) / f"{rank}.txt").write_text(message)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_shape_mismatch_is_an_error_on_every_rank(tmp_path):
    mp.spawn(_mismatch_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        message = (tmp_path / f"{rank}.txt").read_text()
        assert "must agree in every dimension but the first" in message, message
        assert "(4, 8)" in message and "(4, 9)" in message, message
