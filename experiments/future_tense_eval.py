"""The quickstart detector on a harmful style its store does not contain: 100 `future_tense` prompts
(harmful requests as future-tense questions) against 100 TruthfulQA questions, none of them in the
quickstart store (the first 100 of each source after a seeded shuffle, store texts removed).

    python experiments/future_tense_eval.py            # writes the file, then runs:
    python -m lit_sahs evaluate --detector artifacts/quickstart/detector \
        --data stores/future_vs_truthful.jsonl --json experiments/results/future_tense_eval.json
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from lit_sahs.data.sources import load_source
from lit_sahs.data.store import ActivationStore

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "stores" / "future_vs_truthful.jsonl"  # prompt texts stay out of the repo
OUT = ROOT / "experiments" / "results" / "future_tense_eval.json"


def main() -> None:
    seen = {r["text"] for r in ActivationStore.open(ROOT / "stores" / "quickstart-smollm2").index()}
    rows = []
    for source, label in (("future_tense", 1), ("truthfulqa", 0)):
        pool = [s for s in load_source(source) if s.text not in seen]
        random.Random(0).shuffle(pool)
        rows += [{"text": s.text, "label": label, "source": source} for s in pool[:100]]
    DATA.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "lit_sahs", "evaluate", "--detector", str(ROOT / "artifacts" / "quickstart"
                    / "detector"), "--data", str(DATA), "--json", str(OUT)], check=True, stdout=subprocess.DEVNULL)
    o = json.loads(OUT.read_text())["overall"]
    print({k: o[k] for k in ("n", "auroc", "tpr_at_1fpr", "tpr", "fpr")})


if __name__ == "__main__":
    main()
