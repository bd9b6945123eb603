"""`python -m lit_sahs <command>`: one parser per subcommand; every LitSahsError becomes one
`error: ...` line on stderr and exit status 2."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import Callable, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_text

DEFAULT_HARMFUL = "advbench,harmbench,donotanswer,past_tense"
DEFAULT_BENIGN = "truthfulqa,nq_open,mmlu,commonsenseqa,openbookqa,healthsearchqa,medicationqa,sharegpt"
DEFAULT_ATTACKS = "plain,pyrit,dan,inthewild"


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in str(text).split(",") if n.strip())


def _add_trainer_args(p: ArgumentParser) -> None:
    """The Trainer options extraction needs; DDP across devices/nodes is Lightning's."""
    p.add_argument("--trainer.accelerator", default="auto", help="cpu, gpu, auto")
    p.add_argument("--trainer.devices", default="auto", help="number of devices or 'auto'")
    p.add_argument("--trainer.num_nodes", type=int, default=1)
    p.add_argument("--trainer.strategy", default="auto", help="e.g. ddp for several devices")


def extract_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lit_sahs extract",
                       description="Capture every head's output at the first-token position into a store.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--target", default="smollm2-135m-instruct", help="target name, .gguf path, HF dir or hub id")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--harmful", default=DEFAULT_HARMFUL, help="comma-separated harmful sources or file:path.jsonl")
    p.add_argument("--benign", default=DEFAULT_BENIGN, help="comma-separated benign sources or file:path.jsonl")
    p.add_argument("--data", default=None, help="a user JSONL/CSV (text,label,...) used instead of --harmful/--benign")
    p.add_argument("--attacks", default=DEFAULT_ATTACKS, help="comma-separated attack names")
    p.add_argument("--limit", type=Optional[int], default=400, help="total samples after attacks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_rows", type=int, default=256, help="rows per committed store block")
    p.add_argument("--num_workers", type=Optional[int], default=None,
                   help="DataLoader processes that tokenise and preprocess images beside the forward "
                        "(default: 4 on a GPU, 0 on the CPU, where they would compete with it)")
    p.add_argument("--store", default=None, help="store directory (default stores/<target>)")
    _add_trainer_args(p)
    return p


def cmd_extract(argv: list[str]) -> int:
    from lit_sahs.data.protocol import build_dataset
    from lit_sahs.data.attacks import apply_attacks
    from lit_sahs.data.sources import load_user_file
    from lit_sahs.extract import run_extraction

    args = extract_parser().parse_args(argv)
    if args.data:
        samples = apply_attacks(load_user_file(args.data), _names(args.attacks), seed=args.seed)
        if args.limit is not None:
            samples = samples[: args.limit]
    else:
        samples = build_dataset(harmful=_names(args.harmful), benign=_names(args.benign),
                                attacks=_names(args.attacks), limit=args.limit, seed=args.seed)
    store = args.store or os.path.join("stores", os.path.basename(str(args.target)).removesuffix(".gguf"))
    trainer = {k: v for k, v in vars(args.trainer).items()}
    if str(trainer["devices"]).isdigit():
        trainer["devices"] = int(trainer["devices"])
    result = run_extraction(args.target, samples, store, batch_size=args.batch_size, block_rows=args.block_rows,
                            dtype=args.dtype, trainer_kwargs=trainer, num_workers=args.num_workers)
    print(json.dumps({"store": store, **result}))
    return 0


def locate_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lit_sahs locate",
                       description="Rank every (layer, head) by held-out AUROC of its own probe.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--store", required=True, help="activation store directory")
    p.add_argument("--out", default=None, help="output directory (default: the store directory)")
    p.add_argument("--held_out_families", default="", help="comma-separated families kept out (test only)")
    p.add_argument("--held_out_sources", default="", help="comma-separated sources kept out (test only)")
    p.add_argument("--val_fraction", type=float, default=0.2)
    p.add_argument("--test_fraction", type=float, default=0.2)
    p.add_argument("--l2", type=float, default=1e-2)
    p.add_argument("--top_k", type=int, default=8, help="heads marked on the heatmap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tracking_uri", default=None, help="MLflow tracking URI (default sqlite in mlruns/)")
    p.add_argument("--experiment", default="locate")
    return p


def cmd_locate(argv: list[str]) -> int:
    from lit_sahs.locate import locate, save_ranking_outputs
    from lit_sahs.pipeline import names
    from lit_sahs.tracking import start_run

    a = locate_parser().parse_args(argv)
    ranking = locate(a.store, held_out_families=names(a.held_out_families), held_out_sources=names(a.held_out_sources),
                     val_fraction=a.val_fraction, test_fraction=a.test_fraction, seed=a.seed, l2=a.l2,
                     device=a.device)
    json_path, png_path = save_ranking_outputs(ranking, a.out or a.store, top_k=a.top_k)
    import mlflow

    with start_run(a.experiment, a.tracking_uri, run_name="locate"):
        mlflow.log_params({"store": a.store, "held_out_families": a.held_out_families, "l2": a.l2, "seed": a.seed})
        for i, s in enumerate(ranking.scores[: a.top_k]):
            mlflow.log_metric("top_auroc", s["auroc"], step=i)
        mlflow.log_artifact(str(json_path))
        mlflow.log_artifact(str(png_path))
    top = ", ".join(f"{s['layer']}.{s['head']} ({s['auroc']:.3f})" for s in ranking.scores[: a.top_k])
    print(f"top {a.top_k} heads by val AUROC: {top}")
    print(json.dumps({"ranking": str(json_path), "heatmap": str(png_path)}))
    return 0


def evaluate_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m lit_sahs evaluate",
                       description="Zero-shot report: train on attack families, test on held-out ones; "
                                   "or score a user file with a trained detector.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--detector", default=None, help="detector artifact dir, .ckpt or models:/ URI (with --data)")
    p.add_argument("--data", default=None, help="user JSONL/CSV to score with --detector")
    p.add_argument("--json", default=None, help="write the --data report here")
    p.add_argument("--target", default=None, help="override the target named in the detector")
    p.add_argument("--store", default=None, help="activation store for the zero-shot matrix")
    p.add_argument("--ranking", default=None, help="head ranking JSON (default <store>/ranking.json)")
    p.add_argument("--heads", default=None, help="explicit HeadSet instead of a ranking, e.g. '3.1,5.0'")
    p.add_argument("--top_k", type=int, default=8)
    p.add_argument("--detector_family", default="logistic", help="logistic, mlp or sparse")
    p.add_argument("--families", default="", help="restrict the matrix to these families")
    p.add_argument("--min_rows", type=int, default=20)
    p.add_argument("--relocate", type=bool, default=True,
                   help="rank heads again inside each fit on its training families only (no test leakage)")
    p.add_argument("--max_epochs", type=int, default=30)
    p.add_argument("--out", default=None, help="output directory for the matrix (default <store>/zero_shot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking_uri", default=None)
    p.add_argument("--experiment", default="evaluate")
    return p


def cmd_evaluate(argv: list[str]) -> int:
    import mlflow

    from lit_sahs import evaluate as ev
    from lit_sahs.pipeline import names
    from lit_sahs.tracking import start_run

    a = evaluate_parser().parse_args(argv)
    if a.detector or a.data:
        if not (a.detector and a.data):
            raise LitSahsError("scoring a file needs both --detector and --data")
        report = ev.score_file(a.detector, a.data, target=a.target, tracking_uri=a.tracking_uri)
        text = json.dumps(report, indent=1)
        if a.json:
            atomic_write_text(a.json, text + "\n")
        with start_run(a.experiment, a.tracking_uri, run_name="score-file"):
            mlflow.log_params({"detector": a.detector, "data": a.data})
            for group, m in [("overall", report["overall"])] + list(report["per_attack"].items()):
                for k, v in m.items():
                    if v is not None:
                        mlflow.log_metric(f"{group}/{k}".replace(" ", "_"), float(v))
            if a.json:
                mlflow.log_artifact(a.json)
        print(text)
        return 0
    if not a.store:
        raise LitSahsError("give --store (zero-shot matrix) or --detector with --data (score a file)")
    import os

    ranking = a.ranking or (None if a.heads else os.path.join(a.store, "ranking.json"))
    result = ev.zero_shot(a.store, ranking=ranking, heads=a.heads, top_k=a.top_k, detector=a.detector_family,
                          families=names(a.families), min_rows=a.min_rows, max_epochs=a.max_epochs, seed=a.seed,
                          relocate=a.relocate)
    out = a.out or os.path.join(a.store, "zero_shot")
    from lit_sahs.plots import family_matrix

    paths = []
    for method in result["matrix"]:
        paths.append(atomic_write_text(os.path.join(out, f"matrix_{method}.csv"), ev.matrix_csv(result, method)))
    paths.append(family_matrix(result["matrix"]["heads"], result["rows"], result["families"],
                               os.path.join(out, "matrix_heads.png"),
                               title=f"zero-shot AUROC, {a.detector_family} on top-{a.top_k} heads"))
    with start_run(a.experiment, a.tracking_uri, run_name="zero-shot"):
        mlflow.log_params({"store": a.store, "ranking": ranking, "top_k": a.top_k, "detector": a.detector_family,
                           "relocate": a.relocate})
        for method, v in result["mean_held_out_auroc"].items():
            mlflow.log_metric(f"mean_held_out_auroc/{method}", v)
        for p in paths:
            mlflow.log_artifact(str(p))
    print(ev.matrix_csv(result, "heads"))
    print("mean held-out-family AUROC (leave one family out): " +
          ", ".join(f"{m} {v:.3f}" for m, v in result["mean_held_out_auroc"].items()))
    if result["skipped"]:
        print(f"skipped families: {result['skipped']}")
    print(json.dumps({"out": out}))
    return 0


# name -> a function taking argv and returning the exit status, or "module:function" for commands
# that live beside their stage (imported only when used, so `--help` stays fast)
COMMANDS: dict[str, Callable[[list[str]], int] | str] = {
    "extract": cmd_extract,
    "locate": cmd_locate,
    "evaluate": cmd_evaluate,
    "tune": "lit_sahs.tune:main",
    "register": "lit_sahs.registry:main",
    "guard": "lit_sahs.guard:main",
    "screen": "lit_sahs.screen:main",
    "ablate": "lit_sahs.ablate:main",
}


def _command(name: str) -> Callable[[list[str]], int]:
    fn = COMMANDS[name]
    if isinstance(fn, str):
        import importlib

        module, attr = fn.split(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise LitSahsError(f"command {name!r} is not available in this version of lit_sahs") from None
    return fn
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lit_sahs.lightning_cli import run_lightning_cli

        try:
            run_lightning_cli(argv)
        except LitSahsError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}: use one of {names}", file=sys.stderr)
            sys.exit(2)
        print(f"usage: python -m lit_sahs {{{names}}} [--help] ...")
        sys.exit(0)
    try:
        sys.exit(_command(argv[0])(argv[1:]))
    except LitSahsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
