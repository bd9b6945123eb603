"""`python -m lit_sahs <command>`: one parser per subcommand; every LitSahsError becomes one
`error: ...` line on stderr and exit status 2."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Union

from lit_sahs.commands import run_command
from lit_sahs.data.protocol import DEFAULT_ATTACKS, DEFAULT_BENIGN, DEFAULT_HARMFUL, SampleSpec, names
from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_text

@dataclass
class TrainerSettings:
    """The Trainer options extraction takes; DDP across devices and nodes is Lightning's.

    Args:
        accelerator: cpu, gpu or auto
        devices: number of devices or 'auto'
        num_nodes: machines taking part
        strategy: e.g. ddp for several devices
    """

    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    num_nodes: int = 1
    strategy: str = "auto"


def extract(target: str = "smollm2-135m-instruct", dtype: str = "float32",
            harmful: str = ",".join(DEFAULT_HARMFUL), benign: str = ",".join(DEFAULT_BENIGN),
            data: Optional[str] = None, attacks: str = ",".join(DEFAULT_ATTACKS), limit: Optional[int] = 400,
            max_chars: Optional[int] = None, seed: int = 0, batch_size: int = 8, block_rows: int = 256,
            num_workers: Optional[int] = None, store: Optional[str] = None,
            trainer: TrainerSettings = TrainerSettings()) -> int:
    """Capture every head's output at the first-token position into a store.

    Args:
        target: target name, .gguf path, HF dir or hub id
        dtype: float32, bfloat16 or float16
        harmful: comma-separated harmful sources or file:path.jsonl
        benign: comma-separated benign sources or file:path.jsonl
        data: a user JSONL/CSV (text,label,...) used instead of --harmful/--benign
        attacks: comma-separated attack names
        limit: total samples after attacks
        max_chars: pick jailbreak templates whose attacked prompt fits in this many characters
        seed: sampling seed
        batch_size: prompts per forward
        block_rows: rows per committed store block
        num_workers: DataLoader processes that tokenise and preprocess images beside the forward
            (default: 4 on a GPU, 0 on the CPU, where they would compete with it)
        store: store directory (default stores/<target>)
        trainer: Lightning Trainer settings
    """
    from lit_sahs.extract import run_extraction

    samples = SampleSpec(harmful=harmful, benign=benign, attacks=attacks, data=data, limit=limit,
                         max_chars=max_chars, seed=seed).build()
    store = store or os.path.join("stores", os.path.basename(str(target)).removesuffix(".gguf"))
    result = run_extraction(target, samples, store, batch_size=batch_size, block_rows=block_rows, dtype=dtype,
                            trainer_kwargs=dataclasses.asdict(trainer), num_workers=num_workers)
    print(json.dumps({"store": store, **result}))
    return 0


def locate(store: str, out: Optional[str] = None, held_out_families: str = "", held_out_sources: str = "",
           val_fraction: float = 0.2, test_fraction: float = 0.2, l2: float = 1e-2, top_k: int = 8, seed: int = 0,
           device: str = "cpu", tracking_uri: Optional[str] = None, experiment: str = "locate") -> int:
    """Rank every (layer, head) by held-out AUROC of its own probe.

    Args:
        store: activation store directory
        out: output directory (default: the store directory)
        held_out_families: comma-separated families kept out (test only)
        held_out_sources: comma-separated sources kept out (test only)
        val_fraction: share of base prompts that score the probes
        test_fraction: share of base prompts never read
        l2: L2 strength of each head's probe
        top_k: heads marked on the heatmap
        seed: split seed
        device: where the probes are fitted
        tracking_uri: MLflow tracking URI (default sqlite in mlruns/)
        experiment: MLflow experiment
    """
    import mlflow

    from lit_sahs.locate import locate as run_locate, save_ranking_outputs
    from lit_sahs.tracking import start_run

    ranking = run_locate(store, held_out_families=names(held_out_families), held_out_sources=names(held_out_sources),
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, l2=l2, device=device)
    json_path, png_path = save_ranking_outputs(ranking, out or store, top_k=top_k)
    with start_run(experiment, tracking_uri, run_name="locate"):
        mlflow.log_params({"store": store, "held_out_families": held_out_families, "l2": l2, "seed": seed})
        for i, s in enumerate(ranking.scores[:top_k]):
            mlflow.log_metric("top_auroc", s["auroc"], step=i)
        mlflow.log_artifact(str(json_path))
        mlflow.log_artifact(str(png_path))
    top = ", ".join(f"{s['layer']}.{s['head']} ({s['auroc']:.3f})" for s in ranking.scores[:top_k])
    print(f"top {top_k} heads by val AUROC: {top}")
    print(json.dumps({"ranking": str(json_path), "heatmap": str(png_path)}))
    return 0


def evaluate(detector: Optional[str] = None, data: Optional[str] = None, json_out: Optional[str] = None,
             target: Optional[str] = None, store: Optional[str] = None, ranking: Optional[str] = None,
             heads: Optional[str] = None, top_k: int = 8, detector_family: str = "logistic", families: str = "",
             min_rows: int = 20, relocate: bool = True, max_epochs: int = 30, out: Optional[str] = None,
             seed: int = 0, tracking_uri: Optional[str] = None, experiment: str = "evaluate") -> int:
    """Zero-shot report: train on attack families, test on held-out ones; or score a user file with a
    trained detector.

    Args:
        detector: detector artifact dir, .ckpt or models:/ URI (with --data)
        data: user JSONL/CSV to score with --detector
        json_out: write the --data report here (also --json)
        target: override the target named in the detector
        store: activation store for the zero-shot matrix
        ranking: head ranking JSON (default <store>/ranking.json)
        heads: explicit HeadSet instead of a ranking, e.g. '3.1,5.0'
        top_k: heads taken from the ranking
        detector_family: logistic, mlp or sparse
        families: restrict the matrix to these families
        min_rows: smallest family used
        relocate: rank heads again inside each fit on its training families only (no test leakage)
        max_epochs: epochs per fit
        out: output directory for the matrix (default <store>/zero_shot)
        seed: split seed
        tracking_uri: MLflow tracking URI (default sqlite in mlruns/)
        experiment: MLflow experiment
    """
    import mlflow

    from lit_sahs import evaluate as ev
    from lit_sahs.tracking import start_run

    if detector or data:
        if not (detector and data):
            raise LitSahsError("scoring a file needs both --detector and --data")
        report = ev.score_file(detector, data, target=target, tracking_uri=tracking_uri)
        text = json.dumps(report, indent=1)
        if json_out:
            atomic_write_text(json_out, text + "\n")
        with start_run(experiment, tracking_uri, run_name="score-file"):
            mlflow.log_params({"detector": detector, "data": data})
            for group, m in [("overall", report["overall"])] + list(report["per_attack"].items()):
                for k, v in m.items():
                    if v is not None:
                        mlflow.log_metric(f"{group}/{k}".replace(" ", "_"), float(v))
            if json_out:
                mlflow.log_artifact(json_out)
        print(text)
        return 0
    if not store:
        raise LitSahsError("give --store (zero-shot matrix) or --detector with --data (score a file)")
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
    with start_run(experiment, tracking_uri, run_name="zero-shot"):
        mlflow.log_params({"store": store, "ranking": ranking, "top_k": top_k, "detector": detector_family,
                           "relocate": relocate})
        for method, v in result["mean_held_out_auroc"].items():
            mlflow.log_metric(f"mean_held_out_auroc/{method}", v)
        for p in paths:
            mlflow.log_artifact(str(p))
    print(matrix_csv(result, "heads"))
    print("mean held-out-family AUROC (leave one family out): " +
          ", ".join(f"{m} {v:.3f}" for m, v in result["mean_held_out_auroc"].items()))
    if result["skipped"]:
        print(f"skipped families: {result['skipped']}")
    print(json.dumps({"out": out}))
    return 0


def _evaluate_main(argv: list[str]) -> int:
    # `--json` reads better on the command line; the parameter cannot be called json
    argv = ["--json_out" if a == "--json" else a.replace("--json=", "--json_out=", 1) for a in argv]
    return run_command(evaluate, argv, "python -m lit_sahs evaluate")


# name -> a function taking argv and returning the exit status, or "module:function" for commands
# that live beside their stage (imported only when used, so `--help` stays fast)
COMMANDS: dict[str, Callable[[list[str]], int] | str] = {
    "extract": lambda argv: run_command(extract, argv, "python -m lit_sahs extract"),
    "locate": lambda argv: run_command(locate, argv, "python -m lit_sahs locate"),
    "evaluate": _evaluate_main,
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
SUMMARIES = {
    "fit": "train a detector (LightningCLI; extracts and locates first when the config says so)",
    "validate": "validate a detector checkpoint (LightningCLI)",
    "test": "test a detector checkpoint (LightningCLI)",
    "predict": "score with a detector checkpoint (LightningCLI)",
    "extract": "capture every head at the first-token position into an activation store",
    "locate": "rank every head by its own probe's held-out AUROC",
    "evaluate": "zero-shot matrix over attack families, or score a labelled file with a detector",
    "tune": "Optuna study over detector family, head count and regularisation",
    "register": "put a detector in the MLflow model registry",
    "guard": "guarded generation: score at prefill, refuse or decode",
    "screen": "score prompts without generating (runs only the layers the detector reads)",
    "ablate": "attack success and utility with heads switched off",
}


def usage() -> str:
    lines = ["usage: python -m lit_sahs <command> [--help] [--config FILE] ...", "", "commands:"]
    lines += [f"  {name:<10} {SUMMARIES.get(name, '')}" for name in list(LIGHTNING_COMMANDS) + list(COMMANDS)]
    return "\n".join(lines)


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
        if argv and argv[0] not in ("-h", "--help"):
            listed = ", ".join(list(LIGHTNING_COMMANDS) + list(COMMANDS))
            print(f"error: unknown command {argv[0]!r}: use one of {listed}", file=sys.stderr)
            sys.exit(2)
        print(usage())
        sys.exit(0)
    try:
        sys.exit(_command(argv[0])(argv[1:]))
    except LitSahsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
