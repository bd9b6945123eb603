"""`python -m lit_sahs ablate`: its options and the run; the study itself is `lit_sahs.ablate`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lit_sahs.choices import Dtype
from lit_sahs.commands import run_command
from lit_sahs.devices import Device, resolve_device
from lit_sahs.errors import LitSahsError


def ablate_command(store: Optional[str] = None, ranking: Optional[str] = None, heads: Optional[str] = None,
                   effect_ranking: Optional[str] = None, target: Optional[str] = None, ks: str = "4,8,16",
                   modes: str = "zero",
                   random_modes: Optional[str] = None, seeds: int = 3, harmful: str = "advbench",
                   benign: str = "truthfulqa,healthsearchqa", n_harmful: int = 64, n_benign: int = 32,
                   hold_out_store: bool = True, max_new_tokens: int = 48, batch_size: int = 16,
                   judge: str = "phrases", judge_chars: int = 200, seed: int = 0, dtype: Dtype = "float32",
                   device: Device = "auto", out: Optional[str] = None, json: Optional[str] = None) -> int:
    """ASR and benign utility with the top-k safety heads, random heads or no heads ablated.

    Args:
        store: activation store: its ranking, benign means and prompts to hold out
        ranking: head ranking JSON (default <store>/ranking.json)
        heads: ablate this HeadSet ('3.1,5.0') instead of ranking top-k
        effect_ranking: also the top-k and greedy set of this `locate --by effect` ranking (its prompts held out)
        target: target (default: the store's / ranking's target)
        ks: comma-separated head counts
        modes: comma-separated: zero, mean
        random_modes: modes for random heads (default: --modes)
        seeds: random head sets per k and mode
        harmful: comma-separated harmful sources (ASR)
        benign: comma-separated benign sources (utility)
        n_harmful: harmful prompts (held out from the store)
        n_benign: benign prompts (held out from the store)
        hold_out_store: skip prompts that are in the store
        max_new_tokens: greedy tokens per answer
        batch_size: prompts per generate call
        judge: 'phrases' or 'package.module:callable' (prompts, responses) -> refused
        judge_chars: the phrase judge reads this many leading characters
        seed: seed of the prompt draw
        dtype: the target's dtype: float32, bfloat16 or float16
        device: where the target runs: auto (a GPU when there is one), cpu, cuda, cuda:N or mps
        out: write the markdown table here
        json: write every configuration's numbers here
    """
    args = dict(locals())  # every option, recorded in the --json file
    from lit_sahs.ablate import AblationConfig, format_table, gather, run_study, study_configs
    from lit_sahs.data.protocol import names
    from lit_sahs.data.samples import normalise_text
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.io import atomic_write_json, atomic_write_text
    from lit_sahs.heads import HeadSet
    from lit_sahs.judge import load_judge
    from lit_sahs.ranking import HeadRanking
    from lit_sahs.targets import load_target

    if n_harmful < 1 or n_benign < 1 or max_new_tokens < 1 or batch_size < 1 or seeds < 0:
        raise LitSahsError("n_harmful, n_benign, max_new_tokens and batch_size must be >= 1, seeds >= 0")
    store_ = ActivationStore.open(store) if store else None
    rk = None
    eff = HeadRanking.load(effect_ranking) if effect_ranking and heads is None else None
    if heads is None and (ranking or store_ is not None or eff is None):
        if ranking is None and store_ is None:
            raise LitSahsError("give --store (with its ranking.json), --ranking, --effect_ranking or --heads")
        rk = HeadRanking.load(ranking or Path(store) / "ranking.json")
    fp = next((r.fingerprint for r in (rk, eff, store_) if r is not None), None)
    if target is None and fp is None:
        raise LitSahsError("--heads without --store needs --target")
    if eff is not None and eff.method != "effect":
        raise LitSahsError(f"{effect_ranking} is a {eff.method} ranking: give `locate --by effect` output")
    tgt = load_target(target or fp.name, dtype=dtype, device=resolve_device(device))
    for what, f in (("the ranking", rk), ("the store", store_), ("the effect ranking", eff)):
        f = f.fingerprint if f is not None else None
        if f is not None:
            f.check(tgt.fingerprint, what)
    mode_list = names(modes)
    if "mean" in mode_list + names(random_modes) and store_ is None:
        raise LitSahsError("mean ablation takes the benign mean from a store: give --store")
    if heads is not None:
        hs = HeadSet.parse(heads).validate(tgt.geometry)
        configs = [AblationConfig("none")] + [AblationConfig(f"heads {m}", hs, m, "heads") for m in mode_list]
    else:
        configs = study_configs(rk, [int(k) for k in names(ks)], mode_list, seeds, tgt.geometry,
                                names(random_modes) if random_modes else None, effect=eff)
    exclude = {normalise_text(r["text"]) for r in store_.index()} if (store_ is not None and hold_out_store) else set()
    exclude |= {normalise_text(t) for t in (eff.meta.get("prompts", {}).get("texts", []) if eff else [])}
    results = run_study(tgt, gather(names(harmful), n_harmful, exclude, seed),
                        gather(names(benign), n_benign, exclude, seed), configs, store=store_,
                        judge=load_judge(judge, first_chars=judge_chars), max_new_tokens=max_new_tokens,
                        batch_size=batch_size)
    table = format_table(results)
    print(table)
    if out:
        atomic_write_text(out, table + "\n")
    if json:
        atomic_write_json(json, {"args": args, "target": tgt.fingerprint.to_dict(), "results": results},
                          indent=1, default=str)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(ablate_command, sys.argv[1:] if argv is None else argv, prog="python -m lit_sahs ablate")
