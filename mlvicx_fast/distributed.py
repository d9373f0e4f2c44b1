"""Helpers for torch.distributed: the official VICReg all-gather with gradients.

``gather_with_grad(z1, z2)`` concatenates each tensor over the ranks along dim 0, in rank order.
The ranks first exchange their shapes (one small all-gather and a host read, every eager call),
so every rank takes the same decision: local batch sizes may differ (the tensors are padded to the
largest for the all-gather and cut back after it), and any other difference in shape raises the
same error on every rank instead of leaving some ranks waiting in a mismatched collective.

While a CUDA graph is being captured, or torch.compile traces the call, no host read is allowed;
the sizes of the last eager exchange for the same local shapes are used (GraphedStep's warm-up
steps make that exchange, and a captured graph replays on its captured shapes only).

``elastic_store_and_restarts(store, rank, world_size, restarts_here)`` gives the ranks of one
torchrun attempt a store namespace of their own and the largest restart count among them.
Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the workers' env:// store is a client of
one TCPStore server that outlives the workers: the agent's store with the static rendezvous, and
with the c10d rendezvous ``_shared_tcp_store_server``, made once by the first
``DynamicRendezvousHandler.next_rendezvous`` (torch/distributed/elastic/rendezvous/
dynamic_rendezvous.py) and handed out again on every later round; the comment in
torch/distributed/rendezvous.py ``_create_c10d_store`` that a new store is made for every retry
no longer holds. So the keys init_process_group wrote in an attempt that failed are still there
when the workers are started again, and a restarted gloo group may read the address of a dead
process. A prefix per attempt avoids that only if every rank of the attempt picks the same one,
and ``TORCHELASTIC_RESTART_COUNT`` is not the same everywhere: ``SimpleElasticAgent._invoke_run``
(torch/distributed/elastic/agent/server/api.py) counts a restart only on the agent whose workers
failed; a healthy agent restarts its workers when it sees ``num_nodes_waiting() > 0`` and leaves
its count as it was. A short handshake through the store (see the function) agrees on a fresh
random prefix and on the largest count instead.
"""
from __future__ import annotations

import os
import secrets
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_MAX_DIMS = 8
# local shapes of one call -> per tensor, the batch size of every rank (from the last exchange)
_sizes_seen: Dict[Tuple[Tuple[int, ...], ...], List[List[int]]] = {}


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the gradients of all ranks and keeps this rank's slice.

    As ``FullGatherLayer`` in the official VICReg code: every rank computes the loss of the global
    batch, so the summed gradient is world_size * dL/d(local slice), which DistributedDataParallel's
    averaging turns back into the gradient of the single-process loss. ``sizes`` holds each rank's
    batch size; unequal sizes are padded to the largest for the collective.
    """

    @staticmethod
    def forward(ctx, x, sizes):
        rank, top = dist.get_rank(), max(sizes)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        x = x.contiguous()
        if x.shape[0] < top:
            x = torch.cat([x, x.new_zeros((top - x.shape[0],) + x.shape[1:])])
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)  # p[:n] is p when no rank was padded

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.start:ctx.stop], None


def _host_read_allowed(x: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _exchange_sizes(xs: Tuple[torch.Tensor, ...]) -> List[List[int]]:
    """Per tensor, the batch size of every rank; the same ValueError on every rank if the shapes
    beyond dim 0 (or the number of dimensions) differ between ranks."""
    key = tuple(tuple(x.shape) for x in xs)
    if not _host_read_allowed(xs[0]):
        if key not in _sizes_seen:
            raise RuntimeError(f"gather_with_grad: local shapes {list(key)} were never gathered outside a CUDA-graph "
                               "capture or torch.compile trace; run one eager step with them first")
        return _sizes_seen[key]
    for shape in key:
        if not 1 <= len(shape) <= _MAX_DIMS:
            raise ValueError(f"gather_with_grad: expected tensors of 1 to {_MAX_DIMS} dimensions, got shape {shape}")
    mine = torch.full((len(xs), _MAX_DIMS + 1), -1, dtype=torch.int64)
    for i, shape in enumerate(key):
        mine[i, 0] = len(shape)
        mine[i, 1:1 + len(shape)] = torch.tensor(shape)
    mine = mine.to(xs[0].device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).cpu()  # (world, tensors, 1 + dims)
    shapes = [[tuple(row[1:1 + row[0]].tolist()) for row in per_rank] for per_rank in table]
    for i in range(len(xs)):
        if len({s[i][1:] for s in shapes}) != 1 or len({len(s[i]) for s in shapes}) != 1:
            raise ValueError("gather_with_grad: the ranks' tensors must agree in every dimension but the first "
                             f"(the batch); got {[s[i] for s in shapes]} for tensor {i}")
    sizes = [[s[i][0] for s in shapes] for i in range(len(xs))]
    _sizes_seen[key] = sizes
    return sizes


def gather_with_grad(*xs: torch.Tensor):
    """Each x concatenated over all ranks along dim 0, in rank order (a tuple when several are
    given); the identity without a process group. Gradients flow back to each rank's slice,
    summed over ranks."""
    if not xs:
        raise TypeError("gather_with_grad: expected at least one tensor")
    if is_distributed():
        sizes = _exchange_sizes(xs)
        xs = tuple(_GatherWithGrad.apply(x, n) for x, n in zip(xs, sizes))
    return xs[0] if len(xs) == 1 else xs


# --------------------------------------------------------------------------------------------
# One fresh store namespace per torchrun attempt
# --------------------------------------------------------------------------------------------
_CURRENT_KEY = "mlvicx/current"  # the nonce of the newest attempt's rank 0


def _hello_key(nonce: str, rank: int) -> str:
    return f"mlvicx/{nonce}/hello/{rank}"


def _ack_key(nonce: str, rank: int) -> str:
    return f"mlvicx/{nonce}/ack/{rank}"


def _attempt_prefix(nonce: str) -> str:
    """The namespace handed to the caller (apart from the handshake's own keys)."""
    return f"mlvicx/{nonce}/run"


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _read(store, key: str) -> Optional[str]:
    """The key's value, or None when it is not set; never blocks on a missing key (a plain get
    would wait for the store's own timeout, which may be half an hour)."""
    return _text(store.get(key)) if store.check([key]) else None


def elastic_store_and_restarts(store, rank: int, world_size: int, restarts_here: Optional[int] = None,
                               timeout: float = 600.0, poll: float = 0.25) -> Tuple[dist.PrefixStore, int]:
    """(A store fresh for this attempt and the same on every rank of it, the largest
    ``TORCHELASTIC_RESTART_COUNT`` of the attempt's ranks, at least 1 when the store holds an
    earlier attempt's handshake).

    store: the raw store every rank shares (``next(dist.rendezvous("env://"))[0]`` or any c10d
    Store), which may hold any keys of earlier attempts. restarts_here: this rank's restart count,
    by default ``TORCHELASTIC_RESTART_COUNT`` (0 when unset). The returned count is > 0 when any
    agent counts this attempt as a restart. The returned PrefixStore is the one to give
    init_process_group: nothing of an earlier attempt is in its namespace. timeout (seconds): how
    long rank 0 waits for all ranks, and another rank for rank 0; then a RuntimeError. poll: the
    longest pause between two looks at the store.

    The handshake: rank 0 draws a random nonce N and sets ``mlvicx/current`` = N. Every other rank
    draws a random token t, reads ``mlvicx/current``, sets ``mlvicx/N/hello/<rank>`` = "t count"
    and looks for ``mlvicx/N/ack/<rank>`` starting with t; rank 0 waits for every hello under N,
    takes the largest count (its own included) and answers each rank with "t largest". A rank
    reads ``mlvicx/current`` again at every look, and says hello again under a new value, until
    its own token comes back, so a nonce of an earlier attempt (left by a rank 0 that died, maybe
    in the middle of this same handshake, or read before this attempt's rank 0 wrote its own) is
    left behind as soon as the new one is there. Why it is right: N is new, so only processes that
    read it after this rank 0 wrote it can write under it, and those are this attempt's (the
    agents stop every worker of an attempt before they start the next); an answer of an earlier
    attempt never carries the token a rank drew just now; and every rank of this attempt reads N
    sooner or later, as nothing but this rank 0 writes ``mlvicx/current`` while it runs. So every
    rank leaves with this rank 0's N and with the largest count of exactly this attempt's ranks.
    Only check, get of a key that is set, and set are used: no call waits on the store's timeout,
    and the store's timeout is left as it is. world_size 1 makes no handshake.
    """
    if restarts_here is None:
        restarts_here = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    restarts_here = int(restarts_here)
    if not 0 <= rank < world_size:
        raise ValueError(f"elastic_store_and_restarts: rank {rank} is not in [0, {world_size})")
    if world_size == 1:
        return dist.PrefixStore(_attempt_prefix(secrets.token_hex(16)), store), restarts_here
    deadline = time.monotonic() + timeout
    pause = 0.005

    def sleep():
        nonlocal pause
        time.sleep(max(0.0, min(pause, poll, deadline - time.monotonic())))
        pause = min(2 * pause, poll)

    if rank == 0:
        # an earlier attempt's handshake in the store: this attempt is a restart even when no agent
        # counted one (a node whose agent was started again counts from 0, and the healthy agents
        # restart theirs for it without counting); the store lives as long as the job's rendezvous
        earlier = store.check([_CURRENT_KEY])
        nonce = secrets.token_hex(16)
        store.set(_CURRENT_KEY, nonce)
        keys = [_hello_key(nonce, r) for r in range(1, world_size)]
        while not store.check(keys):  # one look at all of them
            if time.monotonic() >= deadline:
                missing = [r for r, key in enumerate(keys, 1) if not store.check([key])]
                raise RuntimeError(
                    f"elastic_store_and_restarts: rank 0 waited {timeout:g} s for ranks {missing} of "
                    f"{world_size} to join this attempt's store handshake (nonce {nonce}); are all "
                    "processes started, with the same store and WORLD_SIZE?")
            sleep()
        hellos: Dict[int, Tuple[str, int]] = {}
        for r, key in enumerate(keys, 1):
            value = _text(store.get(key))
            token, _, count = value.partition(" ")
            try:
                hellos[r] = (token, int(count))
            except ValueError:
                raise RuntimeError(f"elastic_store_and_restarts: {key} = {value!r} is not a hello of this "
                                   "function") from None
        most = max([restarts_here, int(earlier)] + [count for _, count in hellos.values()])
        for r, (token, _) in hellos.items():
            store.set(_ack_key(nonce, r), f"{token} {most}")
        return dist.PrefixStore(_attempt_prefix(nonce), store), most

    token = secrets.token_hex(16)
    nonce = None  # the nonce this rank said hello under
    while True:
        current = _read(store, _CURRENT_KEY)
        if current is not None and current != nonce:
            nonce = current
            store.set(_hello_key(nonce, rank), f"{token} {restarts_here}")
            pause = 0.005
        if nonce is not None:
            answer = _read(store, _ack_key(nonce, rank))
            if answer is not None:
                mine, _, most = answer.partition(" ")
                if mine == token:  # else the answer to a rank of an earlier attempt
                    return dist.PrefixStore(_attempt_prefix(nonce), store), int(most)
        if time.monotonic() >= deadline:
            seen = "no rank 0 has set it" if nonce is None else f"its last value {nonce} brought no answer"
            raise RuntimeError(
                f"elastic_store_and_restarts: rank {rank} of {world_size} waited {timeout:g} s for rank 0 of "
                f"this attempt in the store handshake ({_CURRENT_KEY}: {seen}); is rank 0 running, with "
                "the same store?")
        sleep()
