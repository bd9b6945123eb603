"""The quickstart detector on a harmful style its store does not contain: 100 `future_tense` prompts
(harmful requests as future-tense questions) against 100 TruthfulQA questions, none of them in the
quickstart store (the first 100 of each source after a seeded shuffle, store texts removed).

    python experiments/future_tense_eval.py            # writes the file, then runs:
    python -m lit_sahs evaluate --detector artifacts/quickstart/detector \
        --data stores/future_vs_truthful.jsonl --json experiments/results/future_tense_eval.json

Other sources the store never read: ``--harmful future_tense,rho_refusal --benign
sharegpt_instructions,sharegpt_creative,rho_refusal_benign,rho_overrefusal,innocent_alarming,liveqa``.
"""
from __future__ import annotations

from lit_sahs.commands import script_main


def run(store: str = "stores/quickstart-smollm2", detector: str = "artifacts/quickstart/detector",
        data: str = "stores/future_vs_truthful.jsonl", json_out: str = "experiments/results/future_tense_eval.json",
        n: int = 100, seed: int = 0, harmful: str = "future_tense", benign: str = "truthfulqa",
        scores: str = "") -> int:
    """Write the held-out JSONL, score it with `python -m lit_sahs evaluate`, print the overall figures.

    Args:
        store: the detector's training store; its prompt texts are left out
        detector: detector artifact (or models:/ URI) scored with `evaluate --data`
        data: where the JSONL of prompts is written (prompt texts stay out of the repository)
        json_out: evaluate's report
        n: prompts per source
        seed: shuffle seed of each source
        harmful: harmful sources (comma-separated)
        benign: benign sources (comma-separated)
        scores: also write evaluate's per-prompt scores CSV here
    """
    import json
    import random
    import subprocess
    import sys
    from pathlib import Path

    from lit_sahs.data.sources import load_source
    from lit_sahs.data.store import ActivationStore

    seen = {r["text"] for r in ActivationStore.open(store).index()}
    rows = []
    for source, label in [(h, 1) for h in harmful.split(",") if h] + [(b, 0) for b in benign.split(",") if b]:
        pool = [s for s in load_source(source) if s.text not in seen]
        random.Random(seed).shuffle(pool)
        rows += [{"text": s.text, "label": label, "source": source} for s in pool[:n]]
    Path(data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run([sys.executable, "-m", "lit_sahs", "evaluate", "--detector", detector, "--data", data,
                    "--json", json_out] + (["--scores", scores] if scores else []), check=True, stdout=subprocess.DEVNULL)
    o = json.loads(Path(json_out).read_text())["overall"]
    print({k: o[k] for k in ("n", "auroc", "tpr_at_1fpr", "tpr", "fpr")})
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
