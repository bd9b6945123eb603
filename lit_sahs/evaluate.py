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
from lit_sahs.detectors import SafetyDetector, compute_report, detector_class
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


# ---------------------------------------------------------------- fitting helpers

def fit_detector(detector: SafetyDetector, dm, max_epochs: int = 30, callbacks=None, logger=False,
                 enable_progress_bar: bool = False) -> SafetyDetector:
    """Fit on the DataModule's train split, validating (and calibrating the threshold) on val."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=enable_progress_bar,
                        enable_model_summary=False, callbacks=callbacks or [], num_sanity_val_steps=0)
    trainer.fit(detector, datamodule=dm)
    return detector


MIN_PER_CLASS = 5  # fewer rows of a class than this make an AUROC cell noise: it is left empty


def _auroc(scores: np.ndarray, y: np.ndarray) -> float:
    if min(int((y == 1).sum()), int((y == 0).sum())) < MIN_PER_CLASS:
        return float("nan")
    return float(compute_report(scores, y)["overall"]["auroc"])


def eligible_families(rows: Sequence[dict], min_rows: int = 20) -> tuple[list[str], dict[str, str]]:
    """Families with both classes and at least `min_rows` rows; the others with the reason."""
    by = {}
    for r in rows:
        by.setdefault(r.get("attack_family", "plain"), []).append(int(r["label"]))
    keep, skipped = [], {}
    for fam, labels in sorted(by.items()):
        if len(set(labels)) < 2:
            skipped[fam] = "single class"
        elif len(labels) < min_rows:
            skipped[fam] = f"only {len(labels)} rows"
        else:
            keep.append(fam)
    return keep, skipped


def zero_shot(store: str, ranking: Optional[str] = None, heads: Optional[str] = None, top_k: int = 8,
              detector: str = "logistic", detector_args: Optional[dict] = None, families: Sequence[str] = (),
              min_rows: int = 20, max_epochs: int = 30, baselines: Sequence[str] = BASELINES, seed: int = 0,
              progress: bool = True, relocate: bool = True) -> dict:
    """Train on one attack family, test on each other family (the matrix), plus leave-one-family-out
    (train on all the others, test on it). Returns matrices of AUROC for the detector and baselines.

    Cell [i, j]: trained on family i, AUROC on family j; the diagonal is family i's own validation
    rows (in distribution). Row `all others`: trained on every other family. With `relocate`
    (default) each fit ranks heads again on its own training families only, so head selection never
    sees a test family either; otherwise the given ranking or heads are used for every fit. Cells with
    fewer than MIN_PER_CLASS rows of either class are left empty.
    """
    from tqdm import tqdm

    from lit_sahs.data.datamodules import CachedActivationDataModule

    probe = CachedActivationDataModule(store, heads=heads, ranking=ranking, top_k=top_k, seed=seed)
    fams, skipped = eligible_families(probe.store.index(), min_rows)
    if families:
        unknown = [f for f in families if f not in fams]
        if unknown:
            raise LitSahsError(f"families {unknown} are not usable here (eligible: {fams}; skipped: {skipped})")
        fams = list(families)
    if len(fams) < 2:
        raise LitSahsError(f"the zero-shot matrix needs two attack families with both classes and >= {min_rows} "
                           f"rows; this store has {fams} (skipped: {skipped}): extract with more attacks")
    index = probe.store.index()
    labels = np.array([int(r["label"]) for r in index])
    fam_of = np.array([r.get("attack_family", "plain") for r in index])
    methods = ["heads"] + list(baselines)
    matrix = {m: np.full((len(fams) + 1, len(fams)), np.nan) for m in methods}
    cls = detector_class(detector)

    def fold_heads(train_fams, test_fams):
        if not relocate or heads is not None:
            return {"heads": heads, "ranking": ranking}
        from lit_sahs.locate import locate

        rk = locate(probe.store, held_out_families=test_fams, train_families=train_fams, seed=seed)
        return {"heads": rk.top_k(top_k), "ranking": None}

    bar = tqdm(total=2 * len(fams), desc="zero-shot fits", disable=not progress)
    for i, train_fam in enumerate(fams):  # one family -> every other family
        others = [f for f in fams if f != train_fam]
        dm = CachedActivationDataModule(store, top_k=top_k, seed=seed, train_families=[train_fam],
                                        held_out_families=others, **fold_heads([train_fam], others))
        det = fit_detector(cls(**(detector_args or {})), dm, max_epochs=max_epochs)
        _fill_row(matrix, i, fams, det, dm, labels, fam_of, baselines, train_fam)
        bar.update()
    for j, test_fam in enumerate(fams):  # every other family -> this one
        others = [f for f in fams if f != test_fam]
        dm = CachedActivationDataModule(store, top_k=top_k, seed=seed, train_families=others,
                                        held_out_families=[test_fam], **fold_heads(others, [test_fam]))
        det = fit_detector(cls(**(detector_args or {})), dm, max_epochs=max_epochs)
        rows = dm.splits["test"]
        matrix["heads"][len(fams), j] = _auroc(detector_scores(det, dm.store.read(det.head_set, rows=rows)), labels[rows])
        for name, scores in baseline_scores(dm.store, dm.splits["train"], rows, baselines, seed).items():
            matrix[name][len(fams), j] = _auroc(scores, labels[rows])
        bar.update()
    bar.close()
    loo = {m: float(np.nanmean(matrix[m][len(fams)])) for m in methods if not np.isnan(matrix[m][len(fams)]).all()}
    return {"families": fams, "rows": fams + ["all others"], "skipped": skipped, "matrix": matrix,
            "mean_held_out_auroc": loo, "top_k": top_k, "relocate": relocate and heads is None,
            "head_set": None if relocate and heads is None else probe.head_set.to_list()}


def _fill_row(matrix, i, fams, det, dm, labels, fam_of, baselines, train_fam) -> None:
    val, test = dm.splits["val"], dm.splits["test"]
    x_val = dm.store.read(det.head_set, rows=val)
    x_test = dm.store.read(det.head_set, rows=test)
    s_val, s_test = detector_scores(det, x_val), detector_scores(det, x_test)
    base_val = baseline_scores(dm.store, dm.splits["train"], val, baselines, dm.seed)
    base_test = baseline_scores(dm.store, dm.splits["train"], test, baselines, dm.seed)
    for j, fam in enumerate(fams):
        if fam == train_fam:
            rows, s, base = val, s_val, base_val
            mask = np.ones(len(val), dtype=bool)
        else:
            rows, s, base = test, s_test, base_test
            mask = fam_of[test] == fam
        matrix["heads"][i, j] = _auroc(s[mask], labels[rows][mask])
        for name, scores in base.items():
            matrix[name][i, j] = _auroc(scores[mask], labels[rows][mask])


def matrix_csv(result: dict, method: str) -> str:
    fams = result["families"]
    lines = ["train\\test," + ",".join(fams)]
    for name, row in zip(result["rows"], result["matrix"][method]):
        lines.append(name + "," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in row))
    return "\n".join(lines) + "\n"


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
