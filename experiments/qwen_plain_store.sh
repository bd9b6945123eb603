#!/usr/bin/env bash
# The plain-prompt store of Qwen2.5-Coder-0.5B-Instruct (300 prompts: AdvBench + HarmBench against
# TruthfulQA, HealthSearchQA, ShareGPT) and its probe ranking, the input of experiments/ablation_qwen.py
# and experiments/ablation_effect.py (each runs this when the store or its ranking is missing).
# Skips whatever already exists.
#
#   bash experiments/qwen_plain_store.sh [STORE]     # default stores/qwen-plain
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
store=${1:-stores/qwen-plain}
[ -f "$store/manifest.json" ] || $PY -m lit_sahs extract --target qwen2.5-coder-0.5b-instruct \
  --harmful advbench,harmbench --benign truthfulqa,healthsearchqa,sharegpt --attacks plain --limit 300 \
  --store "$store"
[ -f "$store/ranking.json" ] || $PY -m lit_sahs locate --store "$store" --top_k 16
