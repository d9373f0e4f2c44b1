"""SyncBatchNormCPU without a process group is torch's BatchNorm, running statistics included."""
import pytest
import torch

from mlvicx_fast.nn.sync_bn import SyncBatchNormCPU, convert_sync_batchnorm_cpu


@pytest.mark.parametrize("momentum", [0.1, None])  # None: the cumulative average over num_batches_tracked
def test_single_process_is_torch_batchnorm(momentum):
    ref = torch.nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours = convert_sync_batchnorm_cpu(ref)
    assert isinstance(ours, SyncBatchNormCPU) and ours is not ref
    for _ in range(3):
        x = torch.randn(4, 5, 3, 2) * 3 + 1
        torch.testing.assert_close(ours(x), ref(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), msg=name)
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(2, 5, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_conversion_keeps_dtype_and_frozen_parameters():
    ref = torch.nn.BatchNorm1d(4).double()
    ref.weight.requires_grad_(False)
    ours = convert_sync_batchnorm_cpu(torch.nn.Sequential(ref))[0]
    assert ours.weight.dtype == ours.running_mean.dtype == torch.float64
    assert ours.num_batches_tracked.dtype == torch.long
    assert not ours.weight.requires_grad and ours.bias.requires_grad
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def _gloo_worker(rank, port, world, x, grad_out, state, out_dir):
    import os
    from datetime import timedelta

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        bn = SyncBatchNormCPU(x.shape[1])
        bn.load_state_dict(state)
        n = x.shape[0] // world
        xs = x[rank * n:(rank + 1) * n].clone().requires_grad_()
        y = bn(xs)
        (y * grad_out[rank * n:(rank + 1) * n]).sum().backward()
        grads = [bn.weight.grad, bn.bias.grad]
        for g in grads:
            dist.all_reduce(g)  # DDP sums (then averages) the parameter gradients; summed here
        torch.save({"y": y.detach(), "dx": xs.grad, "dw": grads[0], "db": grads[1],
                    "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "large-mean"])
def test_two_gloo_processes_normalise_by_the_global_batch(tmp_path, offset):
    """Against BatchNorm2d in float64 on the concatenated batch. A mean 3e4 times the spread made
    E[x^2] - mean^2 cancel to a negative variance (NaN output) in float32, and float32 sums alone
    put the output off by 4e-3."""
    import socket

    import torch.multiprocessing as mp

    world = 2
    x = offset + torch.randn(8, 4, 5, 3) * torch.rand(4).add(0.5).view(1, 4, 1, 1) * (0.01 if offset else 1.0)
    grad_out = torch.randn_like(x)
    ref = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_worker, args=(port, world, x, grad_out, state, str(tmp_path)), nprocs=world, join=True)

    xd = x.double().requires_grad_()
    y = ref(xd)
    (y * grad_out.double()).sum().backward()
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]).double(), y.detach(), rtol=0, atol=1e-5)
    dx = torch.cat([g["dx"] for g in got]).double()
    torch.testing.assert_close(dx, xd.grad, rtol=0, atol=1e-5 * xd.grad.abs().max().item())
    for g in got:
        torch.testing.assert_close(g["dw"].double(), ref.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g["db"].double(), ref.bias.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g["running_mean"].double(), ref.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g["running_var"].double(), ref.running_var, rtol=1e-5, atol=1e-12)


def test_global_batch_of_one_value_per_channel_is_an_error(monkeypatch):
    import mlvicx_fast.nn.sync_bn as sbn

    monkeypatch.setattr(sbn.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(sbn.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(sbn.dist, "all_reduce", lambda t: None)  # a lone process's own sums
    with pytest.raises(ValueError, match=r"more than 1 value per channel over all processes, got 1 \(local input \(1, 3\)\)"):
        SyncBatchNormCPU(3)(torch.randn(1, 3))
