"""`python -m lit_sahs evaluate`: held-out reports on a store (attack families or sources), or a
labelled user file scored with a trained detector."""
from __future__ import annotations

import json
import os
from typing import Optional

from lit_sahs.choices import Pairing, Protocol, Truncate
from lit_sahs.commands import run_command
from lit_sahs.data.protocol import names
from lit_sahs.devices import Device
from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_text


def evaluate(detector: Optional[str] = None, data: Optional[str] = None, json_out: Optional[str] = None,
             target: Optional[str] = None, store: Optional[str] = None, ranking: Optional[str] = None,
             heads: Optional[str] = None, top_k: int = 8, detector_family: str = "logistic", families: str = "",
             min_rows: int = 20, relocate: bool = True, max_epochs: Optional[int] = 30, out: Optional[str] = None,
             seed: int = 0, tracking_uri: Optional[str] = None, experiment: str = "evaluate",
             protocol: Protocol = "families", pairing: Pairing = "round_robin", sources: str = "",
             scores: Optional[str] = None, batch_size: int = 8, device: Device = "auto",
             truncate: Truncate = None, crossfit: bool = False, target_fpr: float = 0.05,
             extra_rows: bool = True, detector_args: Optional[dict] = None, features: Optional[str] = None,
             judge_band: Optional[str] = None, answer_tpr: Optional[float] = None) -> int:
    """Held-out reports on a store — attack families (zero-shot matrix) or prompt sources never seen —
    or score a user file with a trained detector.

    Args:
        detector: detector artifact dir, .ckpt or models:/ URI (with --data)
        data: user JSONL/CSV to score with --detector
        json_out: write the --data report here (also --json)
        target: override the target named in the detector
        store: activation store for the zero-shot matrix
        ranking: head ranking JSON (default <store>/ranking.json)
        heads: explicit HeadSet instead of a ranking, e.g. '3.1,5.0'
        top_k: heads taken from the ranking
        detector_family: logistic, mlp, sparse or attnpool (with --features tokens)
        families: restrict the matrix to these families
        min_rows: smallest family used
        relocate: rank heads again inside each fit on its training families only (no test leakage)
        max_epochs: epochs per fit
        out: output directory for the matrix (default <store>/zero_shot)
        seed: split seed
        tracking_uri: MLflow tracking URI (default sqlite in mlruns/)
        experiment: MLflow experiment
        protocol: families (train on attack families, test on held-out ones) or sources (hold out one
            harmful and one benign source per fold: prompts unlike any seen in training)
        pairing: with --protocol sources: round_robin (every source held out once) or all_pairs
        sources: with --protocol sources: only these sources (default all)
        scores: with --data, write one CSV row per prompt here (id, source, attack, label, score, flagged)
        batch_size: with --data, prompts per forward
        device: with --data, where the target runs: auto (a GPU when there is one), cpu, cuda, cuda:N or mps
        truncate: with --data, a prompt longer than the target's context is refused (default), or its
            text cut to fit: left (keep the end) or right (keep the start)
        crossfit: with --protocol sources, also cross-fit the detector's threshold over each fold's
            training sources and report held-out benign FPR and harmful TPR at both thresholds
        target_fpr: with --protocol sources, the benign FPR every threshold is calibrated to
        extra_rows: with --protocol sources on a store with extra features, also fit the heads+features
            detectors and the sparse selector over everything (sparse_all: minutes per fold); the
            pooled-head rows of a store extracted with --pool, and heads_judge on one extracted with
            --judge, are fitted either way
        detector_args: with --protocol sources, the detector family's arguments, e.g.
            '{low_fpr_weight: 1.0}'
        features: with --protocol sources, what the detector reads after its heads (the `heads` row and
            --crossfit), e.g. tokens for --detector_family attnpool, or resid,refusal
        judge_band: LO,HI: with --protocol sources --crossfit true on a store extracted with --judge
            true, also fit the judge's cut for this band on each fold's cross-fitted benign rows and
            report the two-stage rule's held-out benign FPR and harmful TPR
        answer_tpr: with --protocol sources --crossfit true, also place the answer side's cut on each fold's
            cross-fitted harmful rows (as `calibrate --answer_tpr`) and report the held-out harmful prompts it
            keeps above it and the held-out benign ones below it
    """

    from lit_sahs import evaluate as ev
    from lit_sahs.tracking import start_run

    if detector or data:
        if not (detector and data):
            raise LitSahsError("scoring a file needs both --detector and --data")
        return ev.score_file_command(detector, data, json_out=json_out, target=target, tracking_uri=tracking_uri,
                                     experiment=experiment, scores=scores, batch_size=batch_size, device=device,
                                     truncate=truncate)
    if not store:
        raise LitSahsError("give --store (zero-shot matrix) or --detector with --data (score a file)")
    if protocol not in ("families", "sources"):
        raise LitSahsError(f"unknown protocol {protocol!r}: use families or sources")
    from lit_sahs.outputs import check_outputs

    from lit_sahs.checks import answer_tpr_arg, probability_band

    check_outputs(dirs={"--out": out or os.path.join(store, "zero_shot" if protocol == "families" else "sources")})
    band = probability_band(judge_band)
    if band is not None and protocol != "sources":
        raise LitSahsError("--judge_band is measured with --protocol sources --crossfit true")
    if answer_tpr is not None and (protocol != "sources" or not crossfit):
        raise LitSahsError("--answer_tpr is measured with --protocol sources --crossfit true")
    if answer_tpr is not None:
        answer_tpr_arg(answer_tpr)
    if protocol == "sources":
        return _source_report(store, ranking if not relocate else None, heads, top_k, detector_family, pairing,
                              sources, min_rows, max_epochs, seed, out, tracking_uri, experiment, crossfit,
                              target_fpr, extra_rows, detector_args, features, band, answer_tpr)
    from lit_sahs.folds import matrix_csv, zero_shot
    from lit_sahs.plots import family_matrix

    ranking = ranking or (None if heads else os.path.join(store, "ranking.json"))
    result = zero_shot(store, ranking=ranking, heads=heads, top_k=top_k, detector=detector_family,
                       families=names(families), min_rows=min_rows, max_epochs=max_epochs, seed=seed, relocate=relocate)
    out = out or os.path.join(store, "zero_shot")
    paths = [atomic_write_text(os.path.join(out, f"matrix_{method}.csv"), matrix_csv(result, method))
             for method in result["matrix"]]
    paths.append(family_matrix(result["matrix"]["heads"], result["rows"], result["families"],
                               os.path.join(out, "matrix_heads.png"),
                               title=f"zero-shot AUROC, {detector_family} on top-{top_k} heads"))
    with start_run(experiment, tracking_uri, run_name="zero-shot") as run:
        run.log_params({"store": store, "ranking": ranking, "top_k": top_k, "detector": detector_family,
                           "relocate": relocate})
        for method, v in result["mean_held_out_auroc"].items():
            run.log_metric(f"mean_held_out_auroc/{method}", v)
        for p in paths:
            run.log_artifact(str(p))
    print(matrix_csv(result, "heads"))
    print("mean held-out-family AUROC (leave one family out): " +
          ", ".join(f"{m} {v:.3f}" for m, v in result["mean_held_out_auroc"].items()))
    if result["skipped"]:
        print(f"skipped families: {result['skipped']}")
    print(json.dumps({"out": out}))
    return 0


def _source_report(store, ranking, heads, top_k, detector_family, pairing, sources, min_rows, max_epochs, seed,
                   out, tracking_uri, experiment, crossfit=False, target_fpr=0.05, extra_rows=True,
                   detector_args=None, features=None, judge_band=None, answer_tpr=None) -> int:
    """`evaluate --protocol sources`: the source-level table, written as sources.md/json and a plot."""

    from lit_sahs.folds import PER_FOLD
    from lit_sahs.generalisation import format_source_tables, source_protocol
    from lit_sahs.plots import fold_bars
    from lit_sahs.tracking import start_run

    result = source_protocol(store, top_k=top_k, detector=detector_family, pairing=pairing, sources=names(sources),
                             min_rows=min_rows, max_epochs=max_epochs, seed=seed, heads=heads,
                             ranking=ranking or PER_FOLD, crossfit=crossfit, target_fpr=target_fpr,
                             detector_args=detector_args, features=features,
                             extra_rows=extra_rows, judge_band=judge_band, answer_tpr=answer_tpr)
    out = out or os.path.join(store, "sources")
    table = format_source_tables(result)
    folds = [" + ".join(f["holdout"]) for f in result["folds"]]
    paths = [atomic_write_text(os.path.join(out, "sources.md"), table + "\n"),
             atomic_write_text(os.path.join(out, "sources.json"), json.dumps(result, indent=1) + "\n"),
             fold_bars({m: [f["methods"][m]["auroc"] for f in result["folds"]] for m in result["mean"]}, folds,
                       os.path.join(out, "sources_auroc.png"),
                       title=f"AUROC on held-out sources, {detector_family} on top-{top_k} heads")]
    if "calibration" in result:
        cal = [f["calibration"] for f in result["folds"]]
        bars = {"benign FPR, validation threshold": [c["fpr_validation"] for c in cal],
                "benign FPR, cross-fitted": [c["fpr_crossfit"] for c in cal],
                "harmful TPR, validation threshold": [c["tpr_validation"] for c in cal],
                "harmful TPR, cross-fitted": [c["tpr_crossfit"] for c in cal]}
        if answer_tpr is not None:
            bars.update({"harmful kept above the answer cut": [c["answer_kept"] for c in cal],
                         "benign answered below the answer cut": [c["answer_answered"] for c in cal]})
        if judge_band is not None:
            bars.update({"benign FPR, cross-fitted + judge band": [c["fpr_judge"] for c in cal],
                         "harmful TPR, cross-fitted + judge band": [c["tpr_judge"] for c in cal]})
        paths.append(fold_bars(bars, folds,
                               os.path.join(out, "sources_calibration.png"), ylabel="share of held-out prompts",
                               title=f"held-out sources at each threshold (target FPR {target_fpr:.0%})"))
    with start_run(experiment, tracking_uri, run_name="sources") as run:
        run.log_params({"store": store, "protocol": "sources", "pairing": pairing, "top_k": top_k,
                        "detector": detector_family, "detector_args": json.dumps(detector_args or {}),
                        "crossfit": crossfit, "target_fpr": target_fpr,
                        "judge_band": None if judge_band is None else ",".join(map(str, judge_band)),
                        "answer_tpr": answer_tpr})
        for method, cols in result["mean"].items():
            for col, v in cols.items():
                if v == v:
                    run.log_metric(f"mean/{method}/{col}", v)
        for col, v in result.get("calibration", {}).items():
            if v == v:
                run.log_metric(f"mean/calibration/{col}", v)
        for p in paths:
            run.log_artifact(str(p))
    print(table)
    print(json.dumps({"out": out}))
    return 0


def main(argv: list[str]) -> int:
    # `--json` reads better on the command line; the parameter cannot be called json
    argv = ["--json_out" if a == "--json" else a.replace("--json=", "--json_out=", 1) for a in argv]
    return run_command(evaluate, argv, "python -m lit_sahs evaluate")
