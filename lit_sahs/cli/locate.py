"""`python -m lit_sahs locate`: its options and the run; the rankings themselves are
`lit_sahs.locate.locate` (probes) and `lit_sahs.effect.effect_ranking` (ablation effect)."""
from __future__ import annotations

import json
from typing import Literal, Optional

from lit_sahs.choices import Dtype
from lit_sahs.commands import run_command
from lit_sahs.data.holdout import Holdout
from lit_sahs.devices import Device, resolve_device
from lit_sahs.errors import LitSahsError


def locate_command(store: Optional[str] = None, out: Optional[str] = None, by: Literal["probe", "effect"] = "probe",
                   held_out: Holdout = Holdout(), val_fraction: float = 0.2,
                   test_fraction: float = 0.2, l2: float = 1e-2, top_k: int = 8, seed: int = 0, device: Device = "auto",
                   target: Optional[str] = None, harmful: Optional[str] = None, n_prompts: int = 32,
                   mode: Literal["zero", "mean"] = "zero", confirm_top: int = 16, greedy: int = 0,
                   greedy_candidates: int = 8, batch_size: int = 8, dtype: Dtype = "float32",
                   tracking_uri: Optional[str] = None,
                   experiment: str = "locate") -> int:
    """Rank every (layer, head): by held-out AUROC of its own probe, or by its effect on refusal.

    Args:
        store: activation store directory (probe: required; effect: its train split's harmful prompts)
        out: output directory (default: the store directory)
        by: probe (per-head probe AUROC) or effect (refusal drop when the head is ablated)
        held_out: attack families and/or sources kept out (test only), e.g. --held_out.families dan
            or --held_out.sources '[advbench, truthfulqa]'; as in a fit config's data section
        val_fraction: share of base prompts that score the probes
        test_fraction: share of base prompts never read
        l2: L2 strength of each head's probe
        top_k: heads marked on the heatmap
        seed: split seed (effect: also the prompt draw)
        device: where the probes are fitted / the target runs: auto (a GPU when there is one), cpu, cuda,
            cuda:N or mps
        target: effect: the target (default: the store's)
        harmful: effect: comma-separated harmful sources instead of the store's train split
        n_prompts: effect: harmful prompts the refusal score is averaged over
        mode: effect: ablation mode, zero or mean (mean: benign means from --store)
        confirm_top: effect: best estimated heads confirmed by real ablation
        greedy: effect: size of the greedy head set (0: none)
        greedy_candidates: effect: best estimated heads the greedy search picks from
        batch_size: effect: prompts per forward
        dtype: effect: the target's dtype
        tracking_uri: MLflow tracking URI (default sqlite in mlruns/)
        experiment: MLflow experiment
    """
    from lit_sahs.locate import locate, save_ranking_outputs
    from lit_sahs.tracking import start_run

    device = resolve_device(device)
    split = dict(held_out_families=held_out.families, held_out_sources=held_out.sources,
                 val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    default_out = store
    if store:
        from lit_sahs.data.fspath import is_url, local_path

        if is_url(store):  # a file:// store is a local directory; outputs are never written into a bucket
            default_out = None if local_path(store) is None else str(local_path(store))
            if not (out or default_out):
                raise LitSahsError(f"locate on the store URL {store} needs --out (a local output directory)")
    if out or default_out:
        from lit_sahs.outputs import check_outputs

        check_outputs(dirs={"--out": out or default_out})  # before the ranking is computed
    if by == "effect":
        from lit_sahs.effect import effect_ranking

        ranking = effect_ranking(store, target, harmful, n_prompts, mode, confirm_top, greedy, greedy_candidates,
                                 batch_size, seed, dtype, device, split)
        params = {"target": ranking.fingerprint.name, "harmful": harmful, "n_prompts": n_prompts, "mode": mode,
                  "confirm_top": confirm_top, "greedy": greedy, "greedy_candidates": greedy_candidates}
    elif by == "probe":
        if not store:
            raise LitSahsError("locate --by probe needs --store (an activation store directory)")
        ranking = locate(store, l2=l2, device=device, **split)
        params = {"held_out": held_out.label, "l2": l2}
    else:
        raise LitSahsError(f"unknown --by {by!r}: use probe (probe AUROC) or effect (refusal drop when ablated)")
    if not (out or default_out):
        raise LitSahsError("locate --by effect without --store needs --out (the output directory)")
    json_path, png_path = save_ranking_outputs(ranking, out or default_out, top_k=top_k)
    key = ranking.score_key
    with start_run(experiment, tracking_uri, run_name=f"locate-{by}") as run:
        run.log_params({"by": by, "store": store, "seed": seed, **params})
        for i, s in enumerate(ranking.scores[:top_k]):
            run.log_metric(f"top_{key}", s[key], step=i)
        run.log_metrics(ranking.meta.get("metrics", {}))
        run.log_artifact(str(json_path))
        run.log_artifact(str(png_path))
    top = ", ".join(f"{s['layer']}.{s['head']} ({s[key]:.3f})" for s in ranking.scores[:top_k])
    print(f"top {top_k} heads by {'val AUROC' if by == 'probe' else 'refusal drop'}: {top}")
    if ranking.meta.get("greedy", {}).get("heads"):
        print("greedy set: " + ", ".join(f"{l}.{h}" for l, h in ranking.meta["greedy"]["heads"]))
    print(json.dumps({"ranking": str(json_path), "heatmap": str(png_path)}))
    return 0


def main(argv: list[str]) -> int:
    return run_command(locate_command, argv, "python -m lit_sahs locate")
