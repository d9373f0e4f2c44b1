#!/usr/bin/env bash
# Data part of the GPU check (issue 4), for benchmarks/gpu_check.sh: the augmentation kernel tests
# with Triton compiled (no interpreter), the loader/phantom tests on CUDA (the .npy path: the GPU
# image has no FFCV, so FFCV tests skip), then the augmentation throughput benchmark.
#
#   bash benchmarks/gpu_check_data.sh        # from the repository root; logs to $OUT if set
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
RES=${OUT:-benchmarks/out}
mkdir -p "$RES" benchmarks/out
status=0

echo "== data tests (Triton compiled on CUDA)"
tests="tests/test_augment.py"
# the loader and phantom tests need Pillow (and the prepare tests pydicom, which skip without it)
python3 -c 'import PIL' 2>/dev/null && tests="$tests tests/test_loader.py tests/test_phantom.py tests/test_data_prepare.py"
python3 -m pytest $tests -q -p no:cacheprovider --benchmark-disable --timeout 600 2>&1 \
  | tee "$RES/gpu_tests_data.log" | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== augmentation throughput (two-view samples/s; target >= 20,000 on H100/H200)"
python3 benchmarks/bench_augment.py --device cuda 2>&1 | tee "$RES/bench_augment.log" | tail -12 || status=1
cp benchmarks/out/bench_augment.* "$RES"/ 2>/dev/null
exit $status
