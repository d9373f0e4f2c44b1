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
