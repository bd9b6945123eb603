"""How far the prompt text alone goes on unseen sources: the text baselines of `evaluate --protocol sources`
(TF-IDF and the sentence encoder, ``baselines.text_embedding_scores``) on the source folds of a store,
without the store's activations.

The text baselines read only the rows (text, label, source, attack family). So the rows can come from
the draw `extract` makes for the same options (``SampleSpec``, same sampling seed) instead of from an
extracted store, and the folds and splits are the ones `evaluate --protocol sources` makes on a store
extracted from that draw (``folds.source_holdouts``, ``protocol.split_rows`` with the same split seed and
fractions): the TF-IDF row of an earlier `evaluate` run on that store is reproduced to the last digit where
the rows are the same, which is the check that the folds are. `--store` reads the rows from a store instead.
Each baseline is trained on a fold's training rows, its threshold calibrated on the fold's validation benign
rows (5% FPR, as the detectors'), and scored on the held-out sources' rows.

    python experiments/text_baselines_sources.py --limit 480 --max_chars 1200 \\
        --out experiments/results/text-baselines-guard480
"""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.commands import script_main

GUARD_HARMFUL = "advbench,harmbench,donotanswer,past_tense,rho_refusal"
GUARD_BENIGN = ("truthfulqa,nq_open,healthsearchqa,medicationqa,sharegpt_creative,sharegpt_instructions,sharegpt,"
                "rho_refusal_benign,rho_overrefusal,innocent_alarming")


def fold_scores(rows: list, hold, names: list, split_seed: int, target_fpr: float) -> dict:
    """{baseline: report dict} for one held-out pair, trained on the fold's training rows."""
    import numpy as np
    import torch

    from lit_sahs.baselines import text_baseline_scores
    from lit_sahs.data.protocol import split_rows
    from lit_sahs.detectors.metrics import calibrate_threshold, compute_report

    split = split_rows(rows, held_out_sources=hold.sources, seed=split_seed)
    text = lambda part: [rows[i]["text"] for i in split[part]]
    label = lambda part: np.array([int(rows[i]["label"]) for i in split[part]])
    both = text_baseline_scores(text("train"), label("train"), text("val") + text("test"), names, split_seed)
    n_val, y_val, y_test = len(split["val"]), label("val"), label("test")
    out = {}
    for name, scores in both.items():
        threshold = calibrate_threshold(torch.as_tensor(scores[:n_val][y_val == 0]), target_fpr)
        out[name] = compute_report(scores[n_val:], y_test, threshold=threshold)["overall"]
    return out


def run(out: str, store: Optional[str] = None, harmful: str = GUARD_HARMFUL, benign: str = GUARD_BENIGN,
        attacks: str = "plain,pyrit,dan,inthewild", limit: int = 480, max_chars: Optional[int] = 1200,
        seed: int = 0, spread_attacks: bool = False, benign_ratio: float = 1.0,
        baselines: str = "tfidf,text_embedding", split_seed: int = 0, min_rows: int = 20,
        target_fpr: float = 0.05) -> int:
    """Score the text baselines on every source fold and write sources_text.{json,md,png} under `out`.

    Args:
        out: output directory
        store: read the rows from this activation store instead of drawing them
        harmful: harmful sources of the draw (extract --harmful)
        benign: benign sources of the draw (extract --benign)
        attacks: attacks of the draw (extract --attacks)
        limit: rows of the draw (extract --limit)
        max_chars: template length cap of the draw (extract --max_chars)
        seed: sampling seed of the draw (extract --seed)
        spread_attacks: one attack per base prompt (extract --spread_attacks)
        benign_ratio: benign base prompts per harmful one (extract --benign_ratio)
        baselines: comma-separated text baselines: tfidf, text_embedding
        split_seed: the folds' split seed (evaluate --seed)
        min_rows: smallest held-out fold (evaluate --min_rows)
        target_fpr: the validation FPR each baseline's threshold is calibrated to
    """
    import numpy as np
    from tqdm.auto import tqdm

    from lit_sahs.baselines import TEXT
    from lit_sahs.errors import LitSahsError
    from lit_sahs.folds import source_holdouts
    from lit_sahs.io import atomic_write_text
    from lit_sahs.plots import fold_bars

    names = [n.strip() for n in baselines.split(",") if n.strip()]
    unknown = [n for n in names if n not in TEXT]
    if unknown or not names:
        raise LitSahsError(f"unknown text baselines {unknown}: use {', '.join(TEXT)}")
    if store:
        from lit_sahs.data.store import ActivationStore

        rows = ActivationStore.open(store).index()
        origin = f"the rows of store `{store}`"
    else:
        from lit_sahs.data.protocol import SampleSpec

        spec = SampleSpec(harmful=harmful, benign=benign, attacks=attacks, limit=limit, max_chars=max_chars, seed=seed,
                          spread_attacks=spread_attacks, benign_ratio=benign_ratio)
        rows = [s.index_row() for s in spec.build()]
        origin = (f"the draw `extract --limit {limit} --max_chars {max_chars} --attacks {attacks} --seed {seed}"
                  f"{' --spread_attacks true' if spread_attacks else ''}` of the guard sources" if harmful == GUARD_HARMFUL
                  and benign == GUARD_BENIGN else f"the draw of harmful {harmful}, benign {benign}, attacks {attacks}, "
                  f"limit {limit}")
    holdouts, skipped = source_holdouts(rows, "round_robin", min_rows)
    folds = [{"held_out": list(h.sources), **fold_scores(rows, h, names, split_seed, target_fpr)}
             for h in tqdm(holdouts, desc="source folds")]
    present = [n for n in names if all(n in f for f in folds)]
    metrics = ("auroc", "tpr_at_1fpr", "fpr")
    mean = {n: {m: float(np.mean([f[n][m] for f in folds])) for m in metrics} for n in present}
    cell = lambda d: f"{d['auroc']:.3f} / {d['tpr_at_1fpr']:.3f} / {d['fpr']:.3f}"
    lines = [f"# Text baselines on the source folds ({len(rows)} rows)", "",
             f"Rows: {origin}; folds: `evaluate --protocol sources` (round robin, split seed {split_seed}). "
             f"Held-out AUROC / TPR@1%FPR / held-out benign FPR at the threshold calibrated to {target_fpr:.0%} on the "
             "validation benign rows. Written by `experiments/text_baselines_sources.py`.", "",
             "| held out | " + " | ".join(present) + " |", "|---|" + "---:|" * len(present)]
    lines += [f"| {' + '.join(f['held_out'])} | " + " | ".join(cell(f[n]) for n in present) + " |" for f in folds]
    lines.append("| **mean** | " + " | ".join(f"**{cell(mean[n])}**" for n in present) + " |")
    if skipped:
        lines += ["", f"Skipped folds: {skipped}"]
    result = {"rows": len(rows), "origin": origin, "split_seed": split_seed, "mean": mean, "folds": folds,
              "skipped": skipped}
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, "sources_text.json"), json.dumps(result, indent=1))
    atomic_write_text(os.path.join(out, "sources_text.md"), "\n".join(lines) + "\n")
    fold_bars({n: [f[n]["auroc"] for f in folds] for n in present}, [" + ".join(f["held_out"]) for f in folds],
              os.path.join(out, "sources_text.png"), title="held-out AUROC of the text baselines")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
