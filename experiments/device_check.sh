#!/usr/bin/env bash
# The device check (issue 28 item 8): one H100, at most ~8 minutes, results in DIR (default
# experiments/results/device_check). Run from the repository root on the GPU machine:
#
#   bash experiments/device_check.sh [DIR]
#
# 1. bench_kernels.py: grouped matmul paths (scanned, ragged_dot, Mosaic-GPU) against the dense SwiGLU of equal
#    FLOPs and the float32 dense dispatch, and the attention kernels (xla, cudnn) on packed rows, bf16.
# 2. bench_train.py: bf16 matmul peak and bandwidth, dense vs branch train-step MFU at ~1B, the E = 5 MoE step at
#    k = 1, 2, E against the dense model of equal active FLOPs, decode against the bandwidth bound.
# Each part has its own time limit, so one that hangs or fails leaves the other's file. jax and the model code
# only (no data, no weights): the GPU image's jax, flax and optax suffice; PYTHONPATH puts bar_jax on the path.
set -u
DIR=${1:-experiments/results/device_check}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
timeout 180 "$PY" experiments/bench_kernels.py --dtype=bfloat16 --out="$DIR/kernels.md" || status=$?
timeout 300 "$PY" experiments/bench_train.py --devices=1 --dtype=bfloat16 --attention=cudnn \
  --sections=peak,branch,moe,decode --rounds=2 --steps=2 --big_shape=8x1024 --moe_shape=16x1024 \
  --out="$DIR/train.md" || status=$?
[ "$status" = 0 ] || echo "device_check: a part exited $status (124 = its time limit); see $DIR" >&2
exit "$status"
