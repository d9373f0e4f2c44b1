#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): the test suite with the Triton kernels compiled (no
# interpreter), then the benchmarks, then the speed-target table, printed last. Stages run in order
# of importance, each under its own time limit, so a slow or failing stage leaves the others'
# results; every log and result file is copied to $OUT when that is set (the device tool's folder).
#
#   MLVICX_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh   # repository root; ~9 min
#
# Needs torch with CUDA, triton, pytest, pytest-benchmark, Pillow (the GPU image has them); FFCV is
# not needed (tests that need it skip). Nothing is installed: the package is used from this checkout.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
RES=benchmarks/out/gpu_check   # every log and result; $OUT (when set) gets the archive and the table
mkdir -p "$RES" benchmarks/out
status=0

stage() {  # stage NAME SECONDS command...: run with a limit, log to $RES/NAME.log, keep going
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$RES/$name.log"
  [ $rc = 0 ] || { echo "!! $name exited with $rc"; status=1; }
  cp benchmarks/out/*.json benchmarks/out/*.md "$RES"/ 2>/dev/null
}

nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible"; exit 1; }
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

# 1. correctness with compiled kernels: the test files that launch GPU kernels (the rest is CPU-side
#    and runs in CI)
stage gpu_tests 170 python3 -m pytest tests/test_vicreg.py tests/test_loss_modules.py tests/test_context_bottleneck.py \
  tests/test_aggregate.py tests/test_models.py tests/test_augment.py -q -p no:cacheprovider --benchmark-disable \
  --maxfail=20 -rfEs
# 2. fused loss: all shapes, fp32 + bf16; the compiled official formula where its target is set
stage bench_loss 60 python3 benchmarks/bench_loss.py --device cuda --compile-shapes 64x2048
# 3. context bottleneck at the five taps, batch 64, bf16 channels_last: eager, compiled, fused
stage bench_context 130 python3 benchmarks/bench_context.py --batch 64 --dtype bf16 --layout cl
# 4. whole step at batch 64 and 256: official recipe, bare ResNet18, ours, ours fed by the augmentation
stage bench_step 100 python3 benchmarks/bench_step.py --batches 64 256
# 5. the two-view augmentation kernel
stage bench_augment 30 python3 benchmarks/bench_augment.py --device cuda
# 6. network forward + backward, one view (aggregation memory target)
stage bench_network 40 python3 benchmarks/bench_network.py --batches 64,256

echo "== targets"
python3 benchmarks/targets.py --dir benchmarks/out | tee "$RES/targets.md"
# one archive with every log and result, for transports that bring back only a few files
tar czf benchmarks/out/gpu_check.tgz -C "$RES" .
if [ -n "${OUT:-}" ]; then cp benchmarks/out/gpu_check.tgz "$RES/targets.md" "$OUT"/; fi
exit $status
