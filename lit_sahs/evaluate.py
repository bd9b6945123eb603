"""Honest numbers: per-family reports with baselines, the zero-shot family matrix, and scoring
any user file with a trained detector.

Everything here scores rows a detector never trained on: the test split of a DataModule (held-out
attack families / sources), or another family altogether in the zero-shot matrix.
"""
from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from lit_sahs.baselines import BASELINES, baseline_scores
from lit_sahs.detectors import SafetyDetector, compute_report
from lit_sahs.errors import LitSahsError
from lit_sahs.io import atomic_write_text

REPORT_METRICS = ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "fpr_at_95tpr", "n")


@torch.no_grad()
def detector_scores(detector: SafetyDetector, x: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Probabilities for raw activations [n, k, D] of the detector's HeadSet."""
    detector.eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
    out = [detector.predict_proba(x[i:i + batch_size].to(detector.device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.empty(0)


def split_reports(detector: SafetyDetector, dm, split: str = "test", baselines: Sequence[str] = BASELINES,
                  group_key: str = "attack_family"
                  ) -> tuple[dict[str, dict], dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """On one split of a CachedActivationDataModule: ({method: compute_report(...)}, {method: scores},
    labels, {method: threshold}) for the detector (`heads`) and each baseline, trained on the same
    train rows. Each baseline's threshold is calibrated like the detector's (its validation benign
    scores, the detector's target FPR), so the at-threshold TPR/FPR of all methods compare."""
    from lit_sahs.detectors.metrics import calibrate_threshold

    rows, val = dm.splits[split], dm.splits["val"]
    index = dm.split_rows(split)
    y = np.array([int(r["label"]) for r in index])
    y_val = np.array([int(r["label"]) for r in dm.split_rows("val")])
    groups = [str(r.get(group_key, "")) for r in index]
    scores = {"heads": detector_scores(detector, dm.store.read(detector.head_set, rows=rows))}
    thresholds = {"heads": float(detector.threshold)}
    target_fpr = float(getattr(detector.hparams, "target_fpr", 0.05))
    for name, both in baseline_scores(dm.store, dm.splits["train"], np.concatenate([val, rows]), baselines,
                                      seed=dm.seed).items():
        scores[name] = both[len(val):]
        thresholds[name] = calibrate_threshold(torch.as_tensor(both[:len(val)][y_val == 0]), target_fpr)
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


def format_table(reports: dict[str, dict], metrics: Sequence[str] = ("auroc", "tpr_at_1fpr", "tpr_at_5fpr")) -> str:
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

def score_file(detector_path: str, data: str, target: Optional[str] = None, batch_size: int = 8,
               device: str = "cpu", group_key: str = "attack", tracking_uri: Optional[str] = None) -> dict:
    """Load a detector and the target named in it, score every prompt of a user JSONL/CSV, and
    report overall and per-attack metrics."""
    from lit_sahs.capture import HeadCapture
    from lit_sahs.data.sources import load_user_file
    from lit_sahs.detectors import load_detector
    from lit_sahs.targets import load_target, prompting

    det = load_detector(detector_path, tracking_uri=tracking_uri)
    samples = load_user_file(data)
    if not samples:
        raise LitSahsError(f"{data} holds no prompts")
    tgt = load_target(target or det.fingerprint.name, device=device)
    det.check_target(tgt.fingerprint)
    probs = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        enc = prompting.encode(tgt, [s.text for s in chunk], [s.image for s in chunk], [s.id for s in chunk])
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad(), HeadCapture(tgt.model, det.head_set, tgt.geometry) as cap:
            tgt.model(**enc, logits_to_keep=1, use_cache=False)
        probs.append(detector_scores(det, cap.selected()))
    scores = np.concatenate(probs)
    labels = np.array([s.label for s in samples])
    report = compute_report(scores, labels, [getattr(s, group_key) for s in samples], float(det.threshold))
    keep = ("auroc", "auprc", "tpr_at_1fpr", "tpr_at_5fpr", "fpr_at_95tpr", "n")
    clean = {g: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items() if k in keep}
             for g, m in report.items()}
    return {"detector": str(detector_path), "target": tgt.fingerprint.name, "data": str(data), "threshold":
            float(det.threshold), "overall": clean.pop("overall"), "per_attack": clean}


from lit_sahs.folds import zero_shot, matrix_csv, eligible_families  # noqa: F401,E402
