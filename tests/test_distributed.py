"""gather_distributed=True on two CPU processes (gloo) equals one process on the whole batch;
elastic_store_and_restarts over a store that holds the keys of earlier attempts."""
import json
import os
import secrets
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mlvicx_fast import MLVICXLoss, VICRegLoss
from mlvicx_fast.distributed import elastic_store_and_restarts

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


# --------------------------------------------------------------------------------------------
# elastic_store_and_restarts: one fresh store namespace per torchrun attempt, from a store that
# holds the keys of earlier attempts (torchrun's agent store is reused across restarts)
# --------------------------------------------------------------------------------------------
_CURRENT = "mlvicx/current"


def _store_server():
    """A TCPStore server in the test process, as torchrun's agent hosts one for the workers."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))


def _client(port):
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _gloo_sum(store, rank, world):
    """init_process_group on the store, an all_reduce of rank + 1, destroy; the sum."""
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=20))
    try:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        return t.item()
    finally:
        dist.destroy_process_group()


def _attempt_worker(rank, port, world, restarts, out_dir):
    """One worker of an attempt: the handshake, a mark through the prefix, a gloo all_reduce."""
    client = _client(port)
    prefix, most = elastic_store_and_restarts(client, rank, world, restarts[rank], timeout=20, poll=0.05)
    prefix.set(f"seen/{rank}", "1")
    total = _gloo_sum(prefix, rank, world)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps({"most": most, "sum": total}))


def _dead_attempt_worker(rank, port, world):
    """Earlier attempts, left behind in the store: plain process-group keys (as a first attempt
    that called init_process_group(backend) writes them), then handshake keys (rank 1 counting a
    restart) and process-group keys under that handshake's prefix; then the processes exit, their
    addresses dead."""
    client = _client(port)
    assert _gloo_sum(client, rank, world) == world * (world + 1) / 2
    prefix, _ = elastic_store_and_restarts(client, rank, world, int(rank == 1), timeout=20, poll=0.05)
    assert _gloo_sum(prefix, rank, world) == world * (world + 1) / 2


def _check_attempt(server, out_dir, world, most, stale_nonces=()):
    """Every rank left with the same prefix (the live mlvicx/current, none of the stale ones) and the
    same largest count, and the gloo sum was right."""
    nonce = _text(server.get(_CURRENT))
    assert nonce not in stale_nonces
    assert server.check([f"mlvicx/{nonce}/run/seen/{r}" for r in range(world)])
    for r in range(world):
        got = json.loads((Path(out_dir) / f"{r}.json").read_text())
        assert got == {"most": most, "sum": world * (world + 1) / 2}, (r, got)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_elastic_store_first_attempt(tmp_path):
    """A clean first attempt on 3 processes: one prefix, the largest count (0), a working gloo group."""
    server = _store_server()
    world = 3
    mp.spawn(_attempt_worker, args=(server.port, world, [0, 0, 0], str(tmp_path)), nprocs=world, join=True)
    _check_attempt(server, tmp_path, world, most=0)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_elastic_store_restart_over_stale_keys(tmp_path):
    """A restart whose ranks' TORCHELASTIC_RESTART_COUNT differ (the agent whose worker failed counts
    1, a healthy agent restarting on a membership change stays at 0), in a store holding a dead
    attempt's handshake and process-group keys (plain and under its prefix) and an attempt that died
    in the middle of the handshake (its rank 0 answered its rank 1 with a count of 3, and both died).
    Every rank agrees on 1 and the gloo group works. The per-rank count would split the ranks; the
    stale plain or prefixed keys hand them the dead processes' addresses (gloo: connection refused)."""
    server = _store_server()
    world = 2
    mp.spawn(_dead_attempt_worker, args=(server.port, world), nprocs=world, join=True)
    dead = _text(server.get(_CURRENT))
    mid = secrets.token_hex(16)  # the attempt that died in the handshake
    server.set(_CURRENT, mid)
    server.set(f"mlvicx/{mid}/hello/1", "0badc0de 3")
    server.set(f"mlvicx/{mid}/ack/1", "0badc0de 3")

    mp.spawn(_attempt_worker, args=(server.port, world, [0, 1], str(tmp_path)), nprocs=world, join=True)
    _check_attempt(server, tmp_path, world, most=1, stale_nonces=(dead, mid))


def _run_threads(targets):
    """Run the callables in threads; their results (or the exception each raised), in order."""
    results = [None] * len(targets)

    def run(i):
        try:
            results[i] = targets[i]()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.parametrize("stale_ack", [False, True], ids=["no-stale-answer", "stale-answer"])
def test_elastic_store_rank_reads_stale_current_first(stale_ack):
    """Rank 1 reads a dead attempt's mlvicx/current (and says hello under it) before this attempt's
    rank 0 writes its own: it still joins, with rank 0's nonce. With stale_ack, the dead rank 0 had
    answered a rank 1 of its own attempt (a token that is not this rank 1's, a count of 7): that
    answer is ignored. The ranks run as threads with a store client each."""
    server = _store_server()
    old = secrets.token_hex(16)
    server.set(_CURRENT, old)
    server.set(f"mlvicx/{old}/hello/1", "0123abcd 7")
    if stale_ack:
        server.set(f"mlvicx/{old}/ack/1", "0123abcd 7")

    def rank0():
        client = _client(server.port)
        deadline = time.monotonic() + 20
        while _text(client.get(f"mlvicx/{old}/hello/1")) == "0123abcd 7":  # until rank 1 said hello under it
            assert time.monotonic() < deadline, "rank 1 never read the stale mlvicx/current"
            time.sleep(0.01)
        time.sleep(0.2)  # rank 1 now waits on the stale nonce
        prefix, most = elastic_store_and_restarts(client, 0, 2, 0, timeout=10, poll=0.05)
        prefix.set("probe", "rank 0")
        return most, _text(client.get(_CURRENT))

    def rank1():
        client = _client(server.port)
        prefix, most = elastic_store_and_restarts(client, 1, 2, 1, timeout=10, poll=0.05)
        return most, _text(prefix.get("probe"))  # set by rank 0 through its prefix: the same one

    t0 = time.monotonic()
    r0, r1 = _run_threads([rank0, rank1])
    assert not isinstance(r0, BaseException), r0
    assert not isinstance(r1, BaseException), r1
    assert r0[0] == r1[0] == 1
    assert r0[1] != old and r1[1] == "rank 0"
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("earlier", [False, True], ids=["first-attempt", "after-an-attempt"])
def test_elastic_store_counts_a_restart_no_agent_counted(earlier):
    """Every agent's count 0: a first attempt is 0, but after an earlier attempt in the same store
    (a node whose agent was started anew counts from 0, and the healthy agents restart theirs for
    it without counting) the attempt is a restart: 1."""
    server = _store_server()
    if earlier:
        server.set(_CURRENT, secrets.token_hex(16))

    def rank(r):
        return lambda: elastic_store_and_restarts(_client(server.port), r, 2, 0, timeout=10, poll=0.05)[1]

    got = _run_threads([rank(0), rank(1)])
    assert got == [int(earlier)] * 2, got


@pytest.mark.parametrize("stale", [False, True], ids=["empty-store", "dead-rank-0-keys"])
def test_elastic_store_rank_without_rank_0_times_out(stale):
    """Rank 1 with no rank 0 raises a clear RuntimeError at the timeout, also when the store holds a
    dead rank 0's nonce and an answer to a rank 1 of its attempt."""
    server = _store_server()
    if stale:
        old = secrets.token_hex(16)
        server.set(_CURRENT, old)
        server.set(f"mlvicx/{old}/ack/1", "0123abcd 1")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 of 2 waited 1 s for rank 0"):
        elastic_store_and_restarts(_client(server.port), 1, 2, 0, timeout=1.0, poll=0.05)
    assert 1.0 <= time.monotonic() - t0 < 3


def test_elastic_store_rank_0_without_the_others_times_out():
    server = _store_server()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0 waited 1 s for ranks \[1, 2\] of 3"):
        elastic_store_and_restarts(_client(server.port), 0, 3, 0, timeout=1.0, poll=0.05)
    assert 1.0 <= time.monotonic() - t0 < 3


def test_elastic_store_single_process():
    """world_size 1: no handshake (nothing written), its own count, a fresh prefix each call."""
    store = dist.HashStore()
    a, most = elastic_store_and_restarts(store, 0, 1, 2, timeout=0.1)
    b, _ = elastic_store_and_restarts(store, 0, 1, 2, timeout=0.1)
    assert most == 2 and store.num_keys() == 0
    a.set("k", "a")
    assert not b.check(["k"])
