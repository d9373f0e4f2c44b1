#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): the test suite with the Triton kernels compiled (no
# interpreter), then the benchmarks, then the speed-target table, printed last. Stages run in order
# of importance, each under its own time limit, so a slow or failing stage leaves the others'
# results. Logs and results are archived in benchmarks/out/gpu_check.tgz (copied to $OUT when set),
# with RESULTS.md + plots/ gathered by benchmarks/run_all.py from them at the end.
# STAGES="a b" runs only the named stages; GPU_TESTS overrides the test files of gpu_tests.
#
#   MLVICX_COMMIT=<short hash> bash benchmarks/gpu_check.sh   # repository root
#
# Give the hash as text (the local `git rev-parse --short HEAD`): the device's copy of the tree has
# no git metadata, so a $(git ...) in the device command comes out empty ("commit unknown").
#
# A device session has about 15 minutes in all (machine start included) and one call may run 10, so
# the script keeps its own deadline: DEADLINE_S (default 540 s after it starts) bounds every stage's
# limit and no stage starts with under 20 s left, so the targets table and the archive always come
# back inside one 600 s call. The default order puts what the open targets need first; the stages
# skipped for time are named at the end, to be run in a second, short call, e.g.:
#   STAGES="bench_optim bench_network profile_loss" DEADLINE_S=200 bash benchmarks/gpu_check.sh
#
# Needs torch with CUDA, triton, pytest, pytest-benchmark, Pillow (the GPU image has them); FFCV is
# not needed (tests that need it skip). Nothing is installed: the package is used from this checkout.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
RES=benchmarks/out/gpu_check   # every log and result; $OUT (when set) gets the archive and the table
mkdir -p "$RES" benchmarks/out
status=0
DEADLINE_S=${DEADLINE_S:-540}
RESERVE_S=20   # kept back for the targets table, run_all.py and the archive
skipped=""

# STAGES picks stages by name (default: all); they run in the order of the stage lines below
STAGES=${STAGES:-"gpu_tests bench_loss bench_context bench_step train_eager train_graph train_heads bench_aggregate bench_augment profile_step bench_optim bench_network profile_loss bench_step_compile"}
stage() {  # stage NAME SECONDS command...: run with a limit, log to $RES/NAME.log, keep going
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((DEADLINE_S - SECONDS - RESERVE_S))
  if [ "$left" -lt 20 ]; then
    echo "== $name skipped: ${left}s left before DEADLINE_S=${DEADLINE_S}"
    skipped="$skipped $name"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s, $((SECONDS))s elapsed)"
  # SIGINT at the limit: pytest then still prints its summary of failures (SIGTERM left dots
  # only), the benchmarks have written their rows so far, train.py finishes its step and saves;
  # -k: SIGKILL if that outlasts 15 s
  timeout -s INT -k 15 "$limit" "$@" >"$RES/$name.log" 2>&1
  local rc=$?
  tail -n 12 "$RES/$name.log"
  [ $rc = 0 ] || { echo "!! $name exited with $rc"; status=1; }
  cp benchmarks/out/*.csv benchmarks/out/*.json benchmarks/out/*.md "$RES"/ 2>/dev/null
  archive
}
archive() {  # one archive with every log and result so far, for transports that bring back few files
  tar czf benchmarks/out/gpu_check.tgz -C "$RES" .
  if [ -n "${OUT:-}" ]; then cp benchmarks/out/gpu_check.tgz "$OUT"/; fi
}

nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible"; exit 1; }
if [ -z "${MLVICX_COMMIT:-}" ]; then
  MLVICX_COMMIT=$(git rev-parse --short HEAD 2>/dev/null) && export MLVICX_COMMIT \
    || echo "!! MLVICX_COMMIT is not set and there is no git here: the results will say 'commit unknown'"
fi
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

# Stages run in this order (their priority); STAGES only picks which.
# 1. correctness with compiled kernels: the test files that launch GPU kernels (the rest is CPU-side
#    and runs in CI)
GPU_TESTS=${GPU_TESTS:-"tests/test_vicreg.py tests/test_lars.py tests/test_loss_modules.py tests/test_context_bottleneck.py tests/test_aggregate.py tests/test_models.py tests/test_augment.py tests/test_cuda_graph.py"}
# most of this stage is Triton compiling kernels on the CPU: with pytest-xdist (the GPU image has it)
# six processes share the GPU and the on-disk kernel cache
XDIST=""
python3 -c 'import xdist' 2>/dev/null && XDIST="-n ${GPU_TEST_PROCS:-6}"
NOBENCH=""  # pytest-benchmark's option, only where it is installed (else pytest rejects it)
python3 -c 'import pytest_benchmark' 2>/dev/null && NOBENCH="--benchmark-disable"
PER_TEST=""  # a hung test fails alone, with its traceback, instead of taking the stage's whole limit
python3 -c 'import pytest_timeout' 2>/dev/null && PER_TEST="--timeout ${GPU_TEST_TIMEOUT:-120}"
# shellcheck disable=SC2086
stage gpu_tests 170 python3 -m pytest $GPU_TESTS $XDIST -q -p no:cacheprovider $NOBENCH $PER_TEST --maxfail=20 -rfEs
# 2. fused loss: all shapes, fp32 + bf16; the compiled official formula where its target is set
stage bench_loss 75 python3 benchmarks/bench_loss.py --device cuda --compile-shapes 64x2048
# 3. context bottleneck at the five taps, batch 64, bf16 channels_last: eager, compiled, fused; plain
#    timing and one CUDA-graph replay (GPU work alone), launches and torch ops per call
stage bench_context 150 python3 benchmarks/bench_context.py --batch 64 --dtype bf16 --layout cl
# 4. whole step at batch 64 and 256: official recipe, bare ResNet18, ours, ours fed by the augmentation
stage bench_step 100 python3 benchmarks/bench_step.py --batches 64 256
# 5. the training command on a small phantom set (npy: no FFCV here), one stage per run so each
#    gets the stage's SIGINT and deadline (a timeout nested in a stage's bash -c sits in a process
#    group of its own, which the stage's limit never reached): eager first (no GPU training run has
#    finished a step yet), then the GPU defaults (bf16, CUDA graph, no compile), then those with
#    --fp32-heads (float32 expanders; on by default only on a CPU, where bf16 expanders cost demo
#    margin). pairs/s from each run's log.csv (the steps alone: checkpoint writes are left out)
TRAIN="python3 -m mlvicx_fast.train --data /tmp/ph/nih --batch-size 64"
PHANTOM='from mlvicx_fast.data.prepare import ensure_phantom; ensure_phantom("/tmp/ph", n=768, fmt="npy")'
rm -rf /tmp/run_graph /tmp/run_eager /tmp/run_heads  # a rerun on a warm machine: train refuses a folder holding a run
# shellcheck disable=SC2086
stage train_eager 45 bash -c "python3 -c '$PHANTOM' && $TRAIN --max-steps 20 --no-cuda-graph --out /tmp/run_eager && tail -n 3 /tmp/run_eager/log.csv"
# shellcheck disable=SC2086
stage train_graph 50 bash -c "python3 -c '$PHANTOM' && $TRAIN --max-steps 40 --out /tmp/run_graph && tail -n 3 /tmp/run_graph/log.csv"
# shellcheck disable=SC2086
stage train_heads 40 bash -c "python3 -c '$PHANTOM' && $TRAIN --max-steps 40 --fp32-heads --out /tmp/run_heads && tail -n 3 /tmp/run_heads/log.csv"
# 6. the aggregation alone at batch 64, fp32 and bf16: official 64x64 form against the exact one
#    (peak memory target)
stage bench_aggregate 40 python3 benchmarks/bench_aggregate.py --batch 64
# 7. the two-view augmentation kernel
stage bench_augment 30 python3 benchmarks/bench_augment.py --device cuda
# 8. which kernels fill ours' step beyond the bare ResNet18 step (eager, profiler)
stage profile_step 60 python3 benchmarks/profile_step.py --batch 64
# 9. one LARS step over the network's parameters: foreach ops vs the fused kernels
stage bench_optim 40 python3 benchmarks/bench_optim.py
# 10. network forward + backward, one view (aggregation memory inside the network)
stage bench_network 40 python3 benchmarks/bench_network.py --batches 64 --providers reference,reference-exact,fused --rep-ms 1000
# 11. where the loss's time goes at the small shape (host and GPU)
stage profile_loss 40 python3 benchmarks/profile_loss.py --shape 64x2048
# 12. ours and bare with torch.compile inside the CUDA graph (the first step compiles: minutes)
stage bench_step_compile 240 python3 benchmarks/bench_step.py --batches 64 256 --providers bare ours --compile \
  --name bench_step_compile

echo "== targets"
python3 benchmarks/targets.py --dir benchmarks/out | tee "$RES/targets.md"
archive  # the table and every result are in $OUT before the optional gathering below
if [ -n "${OUT:-}" ]; then cp "$RES/targets.md" "$OUT"/; fi
# every result's table and plot in one page of the archive (RESULTS.md + plots/); a failure here
# (no matplotlib: tables only) never changes this script's status, and it gets what time is left
echo "== gather: $RES/RESULTS.md"
gather=$((DEADLINE_S - SECONDS - 5))
[ "$gather" -ge 5 ] || gather=5
timeout -k 2 "$gather" python3 benchmarks/run_all.py --dir "$RES" --results "$RES/RESULTS.md" --plots "$RES/plots" \
  >"$RES/run_all.log" 2>&1 \
  || echo "!! run_all.py exited with $? (see run_all.log in the archive); the results themselves are archived"
tail -n 3 "$RES/run_all.log"
archive
echo "== done in ${SECONDS}s"
if [ -n "$skipped" ]; then
  echo "!! skipped for time:$skipped  (next call: STAGES=\"${skipped# }\" bash benchmarks/gpu_check.sh)"
  status=1
fi
exit $status
