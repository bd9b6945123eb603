#!/usr/bin/env bash
# The source-level table on the three packaged text targets, one recipe for all: extract the same
# 320 prompts (4 harmful and 4 benign sources, plain + pyrit templates, prompts <= 700 chars) from
# each target, then `evaluate --protocol sources` (every source held out once, heads re-ranked
# inside each fold, top-8 heads, logistic; TF-IDF, residual and perplexity on the same folds).
# Writes experiments/results/sources-<target>/ and prints each table. Needs the 1.5B target's
# packages (bash scripts/setup.sh --qwen15). About 50 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TARGETS=${TARGETS:-"smollm2-135m-instruct qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct"}
for t in $TARGETS; do
  store=stores/sources-$t
  /usr/bin/time -v $PY -m lit_sahs extract --target "$t" \
    --harmful advbench,harmbench,donotanswer,past_tense \
    --benign truthfulqa,mmlu,healthsearchqa,sharegpt_instructions \
    --attacks plain,pyrit --limit 320 --max_chars 700 --batch_size 8 --store "$store" \
    --trainer.accelerator cpu --trainer.devices 1 2> "experiments/results/extract-$t.time" | tail -1
  grep -E "Elapsed|Maximum resident" "experiments/results/extract-$t.time"
  $PY -m lit_sahs evaluate --store "$store" --protocol sources --top_k 8 --out "experiments/results/sources-$t" \
    2>/dev/null | grep -v '^{"out"'
done
