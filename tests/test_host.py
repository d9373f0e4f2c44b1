"""reuse_freed_memory: large CPU tensors come from the heap once it is applied, and a user's own
allocator settings win."""
import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest

def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"
                                or not _has_mallinfo2(), reason="glibc's malloc, >= 2.33 (mallinfo2)")

# mmapped blocks before and after allocating a 48 MiB tensor (mallinfo2: glibc >= 2.33), in a fresh
# process so the settings under test are the only ones
PROBE = textwrap.dedent("""
    import ctypes, sys
    import torch
    from mlvicx_fast.host import reuse_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = reuse_freed_memory() if sys.argv[1] == "1" else False
    before = libc.mallinfo2().hblks
    t = torch.rand(12 * 1024 * 1024)  # 48 MiB, above glibc's largest mmap threshold
    print(applied, libc.mallinfo2().hblks - before, float(t[0]) >= 0)
""")


def probe(apply: bool, **env):
    run_env = {k: v for k, v in os.environ.items()
               if not k.startswith("MALLOC_") and k not in ("MLVICX_MALLOC", "GLIBC_TUNABLES")}
    run_env.update(env)
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], env=run_env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_large_tensors_come_from_the_heap_once_applied():
    assert probe(False) == (False, 1)  # glibc as shipped: a fresh mmap for the tensor
    assert probe(True) == (True, 0)


@pytest.mark.parametrize("env", [{"MLVICX_MALLOC": "0"}, {"MALLOC_MMAP_THRESHOLD_": "1048576"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_opt_out_and_user_settings_are_left_alone(env):
    applied, mmapped = probe(True, **env)
    assert not applied
    assert mmapped == 1
