#!/usr/bin/env bash
# GPU checks for the network part (context-bottleneck op, aggregation, MLVICX network), to be
# folded into benchmarks/gpu_check.sh. Run from the repository root on a CUDA machine; Triton
# kernels are compiled (no interpreter). Writes benchmarks/out/bench_context*.{csv,json,md} and
# benchmarks/out/bench_network*.{csv,json,md}. About 5 minutes on an H100/H200 (most of it
# torch.compile of the reference block and of the network).
set -euo pipefail
unset TRITON_INTERPRET

# correctness with compiled kernels (includes the torch.compile test of the whole network)
timeout 420 python -m pytest tests/test_context_bottleneck.py tests/test_aggregate.py tests/test_models.py -q -x

# the block alone at the five tap shapes, batch 64: eager, compiled and fused; bf16 channels_last
# (the BASELINES.md target: 64x112x112 fwd+bwd within 2x of floor_ms and >= 5x faster than compiled)
timeout 300 python benchmarks/bench_context.py --batch 64 --dtype bf16 --layout cl
timeout 120 python benchmarks/bench_context.py --batch 64 --dtype fp32 --layout nchw --providers eager,fused \
    --name bench_context_fp32_nchw

# the network, one view forward + backward, batches 64 and 256, bf16 autocast, channels_last
timeout 300 python benchmarks/bench_network.py --batches 64,256
timeout 420 python benchmarks/bench_network.py --batches 64,256 --compile
