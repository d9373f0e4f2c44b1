#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): the test suite with the Triton kernels compiled (no
# interpreter), then the benchmarks at full size, then the speed-target table, printed last.
# Copies logs and benchmark output to $OUT when that is set (the device tool's result folder).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Needs torch with CUDA, triton, pytest, pytest-benchmark (the GPU image has them); FFCV is not
# needed (tests that need it skip). Nothing is installed: the package is used from this checkout.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
RES=${OUT:-benchmarks/out}
mkdir -p "$RES" benchmarks/out
status=0

nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible"; exit 1; }
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

echo "== tests (Triton compiled on CUDA)"
python3 -m pytest tests -q -x -p no:cacheprovider --benchmark-disable --timeout 600 2>&1 | tee "$RES/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks"
python3 benchmarks/bench_loss.py --device cuda 2>&1 | tee "$RES/bench_loss.log" | tail -30 || status=1
cp benchmarks/out/*.json benchmarks/out/*.md "$RES"/ 2>/dev/null

echo "== targets"
python3 benchmarks/targets.py --dir benchmarks/out | tee "$RES/targets.md"
exit $status
