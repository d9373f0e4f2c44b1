#!/usr/bin/env bash
# Sets up mlvicx_fast for the Python that `python3` (or $PYTHON) names, then returns.
#
#   bash scripts/setup.sh          # the package, the data stack (Pillow, pydicom, FFCV + its Debian
#                                  # libraries) and the evaluation stack (scikit-learn, scipy, matplotlib)
#   bash scripts/setup.sh --dev    # the same, plus what the test suite and benchmarks need
#
# torch: an installed torch is kept as it is (a GPU build included): every later pip call is held
# to its version, so no dependency can swap it. With none installed, the CPU build
# `torch==2.13.0+cpu` is installed (set MLVICX_TORCH to another pip spec to choose, e.g. a CUDA
# build); the `+cpu` label means pip fails loudly instead of pulling a multi-GB CUDA build by
# accident. On a machine with an NVIDIA GPU the CPU build is installed too, with a note on how
# to put the CUDA build in its place.
set -euo pipefail

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (expected --dev or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
say() { echo "[setup] $*"; }
fail() { echo "setup.sh: $*" >&2; exit 1; }
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
pip_install() {
  "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore --no-input -q -c "$CONSTRAINTS" "$@"
}

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || fail "mlvicx_fast needs Python >= 3.10 ($PY is $("$PY" --version 2>&1))"
# Debian's own Python refuses pip installs outside a virtual environment (PEP 668)
if [ -z "${PIP_BREAK_SYSTEM_PACKAGES:-}" ] && "$PY" -c '
import os, sys, sysconfig
sys.exit(0 if sys.prefix == sys.base_prefix
         and os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
  fail "$PY is the system's Python, which pip may not install into (PEP 668). Make a virtual
environment first and run this script inside it:
  $PY -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh"
fi

# 1. torch: keep what is there, otherwise the CPU build. Installed is what pip knows of, not what
#    imports: a GPU build that fails to import is not replaced behind the user's back.
torch_version() {  # pip's record of it, or what imports (a source build may have no record)
  "$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null \
    || "$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true
}
TORCH_VERSION=$(torch_version)
if [ -n "$TORCH_VERSION" ]; then
  "$PY" -c 'import torch' 2>/dev/null \
    || fail "torch $TORCH_VERSION is installed but does not import (run: $PY -c 'import torch'); mend or
uninstall it, then run this script again. It does not replace an installed torch."
  "$PY" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 4))' \
    || fail "mlvicx_fast needs torch >= 2.4; this Python has torch $TORCH_VERSION. Upgrade it to the build you
want (CUDA or CPU), or uninstall it to get the CPU build, then run this script again."
  say "keeping the installed torch: $("$PY" -c 'import torch
kind = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else "CPU build"
print(torch.__version__, f"({kind})")')"
else
  spec=${MLVICX_TORCH:-torch==2.13.0+cpu}
  say "no torch found: installing $spec"
  # shellcheck disable=SC2086  # a spec may carry pip options (--index-url ...)
  pip_install $spec || fail "pip could not install '$spec'. The CPU build torch==2.13.0+cpu comes from
this machine kind's local wheels or from https://download.pytorch.org/whl/cpu (for your Python
version); set MLVICX_TORCH to a pip spec that works here, e.g.
  MLVICX_TORCH='torch --index-url https://download.pytorch.org/whl/cpu' bash scripts/setup.sh"
  TORCH_VERSION=$(torch_version)
  if [ -z "${MLVICX_TORCH:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "note: this machine has an NVIDIA GPU, and the torch installed is the CPU build. For the GPU,"
    say "install the CUDA build that matches your driver (pytorch.org) in its place; this script keeps it."
  fi
fi
echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"
TORCH_GPU=$("$PY" -c 'import torch; print(1 if torch.version.cuda or getattr(torch.version, "hip", None) else 0)')

# FFCV (fast .beton loading) runs only with a matching numpy/numba/llvmlite set, checked together
# on Python 3.11 (the project's ENVIRONMENT notes; opencv-python is what ffcv asks for, the
# headless build the same OpenCV without libGL). They are constraints from the first install on,
# so numpy is not installed twice. numpy 2.4 needs Python >= 3.11.
FFCV_PINS="numpy==2.4.6 numba==0.68.1 llvmlite==0.50.0 opencv-python==5.0.0.93 opencv-python-headless==5.0.0.93 pillow==13.0.0 ffcv==1.0.2"
WANT_FFCV=0
if "$PY" -c 'import ffcv' 2>/dev/null; then
  say "keeping the installed ffcv"
elif "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  WANT_FFCV=1
  printf '%s\n' $FFCV_PINS >> "$CONSTRAINTS"
else
  say "note: FFCV's pinned set needs Python >= 3.11; skipping it (prepare --format npy works without FFCV)"
fi

# 2. the package itself (editable, so the repository's benchmarks and tests use this checkout).
extras="[data,eval]"
[ "$DEV" = 1 ] && extras="[dev,data,eval]"
say "installing mlvicx_fast${extras}"
pip_install -e ".${extras}"

# 3. tests on a CPU torch run the Triton kernels in Triton's interpreter; 3.9.0 is the release
#    checked for that (3.6's interpreter fails on loops with a runtime bound). GPU builds of
#    torch bring their own Triton, which is left alone.
if [ "$DEV" = 1 ]; then
  if [ "$TORCH_GPU" = 0 ]; then
    if ! "$PY" -c 'import triton, sys; sys.exit(0 if triton.__version__ == "3.9.0" else 1)' 2>/dev/null; then
      say "installing triton==3.9.0 for the interpreter tests"
      pip_install "triton==3.9.0"
    fi
  elif ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "note: a GPU build of torch on a machine whose GPU torch cannot see: the tests then run the kernels"
    say "in the interpreter of torch's own Triton $("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo '(none)'),"
    say "and only 3.9.0's is checked for that (a CPU build of torch gets it here)"
  fi
fi

# 4. FFCV builds from source against libturbojpeg and OpenCV, so it needs three Debian packages.
#    Without it everything still works through the --format npy path.
if [ "$WANT_FFCV" = 1 ]; then
  need=""
  for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    command -v apt-get >/dev/null 2>&1 \
      || fail "FFCV needs the system packages$need (pkg-config, libturbojpeg, OpenCV 4 headers);
install them with your package manager and run this script again."
    SUDO=""
    if [ "$(id -u)" != 0 ]; then
      command -v sudo >/dev/null 2>&1 || fail "FFCV needs the Debian packages$need, and installing them takes root; run
  apt-get install -y$need
as root, then this script again."
      SUDO="sudo"
    fi
    say "installing Debian packages FFCV builds against:$need"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
  fi
  say "installing FFCV and its pinned set: $FFCV_PINS"
  pip_install $FFCV_PINS
fi

say "done: $("$PY" -c 'import mlvicx_fast, torch; print("mlvicx_fast", mlvicx_fast.__version__, "with torch", torch.__version__)')"
