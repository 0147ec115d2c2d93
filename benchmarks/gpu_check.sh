#!/usr/bin/env bash
# The GPU checks (step cost, loop vs bare step) as ONE device run (~8 min on an H200; each part has its own time limit).
# Writes into ${OUT:-benchmarks/results}: the card, the step cost (eager + compiled, fused SGD, both
# workloads, bare-torch SAM, peak memory), then the loop against its step (eager, SAM and Focal-SAM).
#
# On a GPU machine without network: put the wheels of open_clip_torch, ftfy and wcwidth in .whl/ and
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit; bash benchmarks/gpu_check.sh
set -o pipefail
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
timeout 330 python benchmarks/step_cost.py --device cuda --preset vit-b16 --compile --rounds 8 2>&1 \
  | tee "$out/step_cost_gpu.md"
timeout 240 python benchmarks/loop_overhead.py --device cuda --preset vit-b16 --optimizers sam,focal_sam 2>&1 \
  | tee "$out/loop_overhead_gpu.txt"
