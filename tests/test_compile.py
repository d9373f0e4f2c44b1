"""Every Triton kernel compiles for Hopper (sm_90) without spilling registers, checked without a GPU.

The interpreter runs the kernels' arithmetic but not the compiler: code the compiler rejects, or
tiles that spill, would first show on a GPU. benchmarks/compile_check.py compiles each kernel as the
ops launch it on a GPU (a stand-in CUDA driver, compile-only launches) and reads registers and stack
from the binaries. It runs in its own process: the kernels must be defined without TRITON_INTERPRET.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _nvidia_backend_available() -> bool:
    try:
        import triton

        return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()
    except ImportError:
        return False


@pytest.mark.skipif(not _nvidia_backend_available(), reason="needs Triton with its CUDA backend (cuobjdump)")
def test_every_kernel_compiles_for_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--strict"],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 with a non-zero stack" in out.stdout, out.stdout[-3000:]
    # the check covers every kernel of the package
    for kernel in ("_narrow_stats_gram_kernel", "_narrow_grad_kernel", "_gram_kernel", "_grad_kernel",
                   "_finalize_kernel", "_spatial_stats_kernel", "_apply_kernel", "_bwd_input_kernel",
                   "_gate_bwd_kernel", "_lars_norms_kernel", "_lars_update_kernel", "_augment_kernel"):
        assert f"| {kernel} |" in out.stdout, kernel
