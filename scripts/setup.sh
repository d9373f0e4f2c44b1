#!/usr/bin/env bash
# Sets up mlvicx_fast for the Python that `python3` (or $PYTHON) names, then returns.
#
#   bash scripts/setup.sh          # the package, the data stack (Pillow, pydicom, FFCV + its Debian
#                                  # libraries) and the evaluation stack (scikit-learn, scipy, matplotlib)
#   bash scripts/setup.sh --dev    # the same, plus what the test suite and benchmarks need
#
# torch: an installed torch is kept as it is (a GPU build included). With none installed, the CPU
# build `torch==2.13.0+cpu` is installed (set MLVICX_TORCH to another pip spec to choose); the
# `+cpu` label means pip fails loudly instead of pulling a multi-GB CUDA build by accident. On a
# machine with an NVIDIA GPU and no torch the script stops and asks you to install the CUDA build
# that matches your driver first.
set -euo pipefail

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

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
pip_install() { "$PY" -m pip install --disable-pip-version-check --root-user-action=ignore --no-input -q "$@"; }

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { echo "setup.sh: mlvicx_fast needs Python >= 3.10 ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }

# 1. torch: keep what is there, otherwise the CPU build.
if "$PY" -c 'import torch' 2>/dev/null; then
  say "keeping the installed torch: $("$PY" -c 'import torch; print(torch.__version__, "(CUDA " + torch.version.cuda + ")" if torch.version.cuda else "(CPU build)")')"
else
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && [ -z "${MLVICX_TORCH:-}" ]; then
    echo "setup.sh: this machine has an NVIDIA GPU but $PY has no torch. Install the CUDA build of" >&2
    echo "torch that matches your driver first (see pytorch.org), or set MLVICX_TORCH to a pip spec," >&2
    echo "then run this script again. It never installs a CUDA build on its own." >&2
    exit 1
  fi
  spec=${MLVICX_TORCH:-torch==2.13.0+cpu}
  say "no torch found: installing $spec"
  pip_install "$spec"
fi
TORCH_CUDA=$("$PY" -c 'import torch; print(1 if torch.version.cuda else 0)')

# 2. the package itself (editable, so the repository's benchmarks and tests use this checkout).
extras="[data,eval]"
[ "$DEV" = 1 ] && extras="[dev,data,eval]"
say "installing mlvicx_fast${extras}"
pip_install -e ".${extras}"

# 3. tests on a CPU torch run the Triton kernels in Triton's interpreter; 3.9.0 is the release
#    checked for that (3.6's interpreter fails on loops with a runtime bound). CUDA builds of
#    torch bring their own Triton, which is left alone.
if [ "$DEV" = 1 ] && [ "$TORCH_CUDA" = 0 ]; then
  if ! "$PY" -c 'import triton, sys; sys.exit(0 if triton.__version__ == "3.9.0" else 1)' 2>/dev/null; then
    say "installing triton==3.9.0 for the interpreter tests"
    pip_install "triton==3.9.0"
  fi
fi

# 4. FFCV (fast .beton loading) builds from source against libturbojpeg and OpenCV, so it needs
#    three Debian packages, and it runs only with a matching numpy/numba/llvmlite set (the pins
#    below were checked together on Python 3.11; see the project's ENVIRONMENT notes). Without it
#    everything still works through the --format npy path.
FFCV_PINS="numpy==2.4.6 numba==0.68.1 llvmlite==0.50.0 opencv-python-headless==5.0.0.93 pillow==13.0.0 ffcv==1.0.2"
if "$PY" -c 'import ffcv' 2>/dev/null; then
  say "keeping the installed ffcv"
else
  need=""
  for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    if command -v apt-get >/dev/null 2>&1; then
      SUDO=""
      [ "$(id -u)" = 0 ] || SUDO="sudo"
      say "installing Debian packages FFCV builds against:$need"
      $SUDO apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
    else
      echo "setup.sh: FFCV needs the system packages$need (pkg-config, libturbojpeg, OpenCV 4 headers);" >&2
      echo "install them with your package manager and run this script again." >&2
      exit 1
    fi
  fi
  say "installing FFCV and its pinned set: $FFCV_PINS"
  pip_install $FFCV_PINS
fi

say "done: $("$PY" -c 'import mlvicx_fast, torch; print("mlvicx_fast", mlvicx_fast.__version__, "with torch", torch.__version__)')"
