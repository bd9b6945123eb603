"""Honest numbers: a split's report for the detector next to the baselines trained on the same rows,
the benign false-positive rate by source, their tables, and scoring any user file with a trained
detector. (Held-out folds and the zero-shot matrix live in `lit_sahs.folds`.)

Everything here scores rows a detector never trained on: the test split of a DataModule (held-out
attack families / sources), or a user's file.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from lit_sahs.baselines import BASELINES, baseline_scores
from lit_sahs.choices import truncate_side
from lit_sahs.detectors.metrics import compute_report
from lit_sahs.errors import LitSahsError
from lit_sahs.family import ModelFamily
from lit_sahs.io import atomic_write_text
from lit_sahs.detectors.metrics import AUROC, TPR_AT_1FPR, TPR_AT_5FPR

def detector_scores(detector, x: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Probabilities for raw activations [n, k, D] of a safety-head detector's HeadSet."""
    return detector.scores(x, batch_size)


def split_reports(detector: ModelFamily, dm, split: str = "test", baselines: Sequence[str] = BASELINES,
                  group_key: str = "attack_family"
                  ) -> tuple[dict[str, dict], dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """On one split of the detector family's DataModule: ({method: compute_report(...)}, {method: scores},
    labels, {method: threshold}) for the detector (under its family's ``report_name``) and each
    baseline, trained on the same train rows. Each baseline's threshold is calibrated like the
    detector's (its validation benign scores, the detector's target FPR), so the at-threshold TPR/FPR
    of all methods compare. Baselines that read stored activations need a DataModule with a store;
    the text baselines (TF-IDF, sentence embedding) need only the rows."""
    from lit_sahs.baselines import text_baseline_scores
    from lit_sahs.detectors.metrics import calibrate_threshold

    index, val_rows, train_rows = dm.split_rows(split), dm.split_rows("val"), dm.split_rows("train")
    y = np.array([int(r["label"]) for r in index])
    y_val = np.array([int(r["label"]) for r in val_rows])
    groups = [str(r.get(group_key, "")) for r in index]
    scores = {detector.report_name: detector.split_scores(dm, split)}
    if len(scores[detector.report_name]) != len(y):
        raise LitSahsError(f"the detector scored {len(scores[detector.report_name])} rows of the {split} split, "
                           f"which has {len(y)}: its DataModule serves another split")
    thresholds = {detector.report_name: float(detector.threshold)}
    target_fpr = float(detector.hparams.get("target_fpr", 0.05))
    store = getattr(dm, "store", None)
    if store is not None:
        both_by = baseline_scores(store, dm.splits["train"], np.concatenate([dm.splits["val"], dm.splits[split]]),
                                  baselines, seed=dm.seed)
    else:  # a DataModule of prompts, not stored activations: the text baselines only
        both_by = text_baseline_scores([r["text"] for r in train_rows], np.array([r["label"] for r in train_rows]),
                                       [r["text"] for r in val_rows + index], baselines, getattr(dm, "seed", 0))
    for name, both in both_by.items():
        scores[name] = both[len(val_rows):]
        thresholds[name] = calibrate_threshold(torch.as_tensor(both[:len(val_rows)][y_val == 0]), target_fpr)
    reports = {name: compute_report(sc, y, groups, thresholds[name]) for name, sc in scores.items()}
    return reports, scores, y, thresholds


def benign_flags_by_source(scores: np.ndarray, rows: Sequence[dict], threshold: float) -> dict[str, dict]:
    """Share of each source's benign prompts flagged at `threshold`, highest first: the
    false-positive rate a deployment would see on that kind of traffic (hard negatives such as
    health questions or real chat are where a detector that learned the wrong cue shows it)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) != len(rows):
        raise LitSahsError(f"{len(scores)} scores for {len(rows)} rows: pass one score per row")
    by: dict[str, list[float]] = {}
    for sc, r in zip(scores, rows):
        if int(r["label"]) == 0:
            by.setdefault(str(r.get("source", "")), []).append(float(sc))
    out = {}
    for src, v in by.items():
        flagged = np.asarray(v) >= threshold
        out[src] = {"n": len(v), "flagged": int(flagged.sum()), "fpr": float(flagged.mean()),
                    "median_score": float(np.median(v))}
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["fpr"], kv[0])))


def format_benign_table(flags: dict[str, dict[str, dict]], thresholds: dict[str, float]) -> str:
    """`flags`: {method: benign_flags_by_source(...)}; one row per source, FPR per method."""
    methods = list(flags)
    sources = list(flags[methods[0]])
    lines = ["Benign prompts flagged at each method's calibrated threshold ("
             + ", ".join(f"{m} {thresholds[m]:.3g}" for m in methods) + "), by source:", "",
             "| source | benign n | " + " | ".join(f"{m} FPR" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for src in sources:
        cells = [f"{flags[m][src]['fpr']:.3f}" if src in flags[m] else "—" for m in methods]
        lines.append(f"| {src} | {flags[methods[0]][src]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, int):
        return str(v)
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(reports: dict[str, dict], metrics: Sequence[str] = (AUROC, TPR_AT_1FPR, TPR_AT_5FPR)) -> str:
    """Markdown table: one row per group (overall first), columns method × metric, plus n."""
    methods = list(reports)
    groups = list(reports[methods[0]])
    head = ["group", "n"] + [f"{m} {k}" for m in methods for k in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        n = reports[methods[0]][g]["n"]
        cells = [g, str(n)] + [_fmt(reports[m].get(g, {}).get(k)) for m in methods for k in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- scoring a user file

SCORE_CSV_COLUMNS = ("id", "source", "attack", "label", "score", "flagged")


def check_output_paths(paths: dict[str, Optional[str]]) -> None:
    """Refuse, before anything loads, an output file that cannot be written (``outputs.check_outputs``)."""
    from lit_sahs.outputs import check_outputs

    check_outputs(files=paths)


def score_file(detector_path: str, data: str, target: Optional[str] = None, batch_size: int = 8,
               device: str = "auto", tracking_uri: Optional[str] = None, truncate: Optional[str] = None,
               scores_out: Optional[str] = None, progress: bool = False) -> dict:
    """Load a detector and the target named in it, score every prompt of a user JSONL/CSV, and
    report, overall, per attack and per source: the counts, AUROC and the other threshold-free
    metrics, and at the detector's calibrated threshold the flagged share, TPR, FPR, accuracy and F1.
    What a group cannot define is None: a file of jailbreaks only gets its TPR (the share caught)
    and no AUROC; a file of benign prompts only gets its FPR. Prompts longer than the target's
    context are refused before the first forward, or cut with `truncate` (left / right). Memory is
    bounded by `batch_size` prompts of at most the context's length. `scores_out`: a CSV with one
    row per prompt (id, source, attack, label, score, flagged 0/1). `progress`: a tqdm bar."""
    from tqdm.auto import tqdm

    from lit_sahs.data.user_files import load_user_file
    from lit_sahs.detectors.metrics import summary_metrics
    from lit_sahs.loading import load_detector_and_target, resolve_detector
    from lit_sahs.targets import prompting

    if batch_size < 1:
        raise LitSahsError(f"batch_size must be >= 1, got {batch_size}")
    truncate_side(truncate)
    check_output_paths({"--scores": scores_out})
    det = resolve_detector(detector_path, tracking_uri=tracking_uri)  # a bad detector fails before the file is read
    samples = load_user_file(data)
    if not samples:
        raise LitSahsError(f"{data} holds no prompts")
    det, tgt = load_detector_and_target(det, target, device=device)
    ids, images = [s.id for s in samples], [s.image for s in samples]
    texts = prompting.fit_context(tgt, [s.text for s in samples], images, ids, truncate=truncate)
    order = sorted(range(len(samples)), key=lambda i: (len(texts[i]), i))  # similar lengths: less padding
    scores = np.full(len(samples), np.nan)
    with tqdm(total=len(samples), desc="scoring", unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = prompting.encode(tgt, [texts[i] for i in idx], [images[i] for i in idx], [ids[i] for i in idx])
            scores[idx] = det.score_prompts(tgt, enc, [texts[i] for i in idx])
            bar.update(len(idx))
    threshold = float(det.threshold)
    labels = np.array([s.label for s in samples])
    by = {key: compute_report(scores, labels, [getattr(s, attr) for s in samples], threshold)
          for key, attr in (("per_attack", "attack"), ("per_source", "source"))}
    report = {"detector": str(detector_path), "target": tgt.fingerprint.name, "data": str(data),
              "threshold": threshold, "overall": summary_metrics(by["per_attack"].pop("overall"))}
    for key, groups in by.items():
        groups.pop("overall", None)
        report[key] = {g: summary_metrics(m) for g, m in groups.items()}
    if scores_out:
        _write_scores(scores_out, samples, scores, threshold)
    return report


def _write_scores(path: str, samples, scores: np.ndarray, threshold: float) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SCORE_CSV_COLUMNS)
    for s, sc in zip(samples, scores.tolist()):
        w.writerow([s.id, s.source, s.attack, s.label, repr(float(sc)), int(sc >= threshold)])
    atomic_write_text(path, buf.getvalue())


def _metric_name(*parts: str) -> str:
    """An MLflow metric key from group names a user file chose (MLflow refuses most punctuation)."""
    import re

    return "/".join(re.sub(r"[^\w\-. :]", "_", str(p)) for p in parts)[:250]


def score_file_command(detector: str, data: str, json_out: Optional[str] = None, target: Optional[str] = None,
                       tracking_uri: Optional[str] = None, experiment: str = "evaluate", scores: Optional[str] = None,
                       batch_size: int = 8, device: str = "auto", truncate: Optional[str] = None) -> int:
    """`evaluate --detector … --data …`: score the file, write the JSON report (and the per-row
    scores), track it in MLflow. The output paths are checked before anything loads."""
    import json


    from lit_sahs.tracking import start_run

    check_output_paths({"--json": json_out, "--scores": scores})
    report = score_file(detector, data, target=target, batch_size=batch_size, device=device,
                        tracking_uri=tracking_uri, truncate=truncate, scores_out=scores, progress=True)
    text = json.dumps(report, indent=1)
    if json_out:
        atomic_write_text(json_out, text + "\n")
    with start_run(experiment, tracking_uri, run_name="score-file") as run:
        run.log_params({"detector": detector, "data": data, "truncate": truncate})
        groups = [(("overall",), report["overall"])] + \
                 [(("attack", g), m) for g, m in report["per_attack"].items()] + \
                 [(("source", g), m) for g, m in report["per_source"].items()]
        run.log_metrics({_metric_name(*names, k): float(v) for names, m in groups for k, v in m.items()
                            if v is not None})
        for path in (json_out, scores):
            if path:
                run.log_artifact(path)
    print(text)
    return 0
