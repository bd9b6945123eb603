"""The target as a second stage: on a fitted detector's held-out rows, what does the target's own verdict
(`lit_sahs.self_judge`) add in an uncertain band of detector scores?

The held-out split is the one the detector's config held out (sources and attack families, read from its
store's index, so the rows are the ones its report scored). With ``--scoring live`` `Screener` scores them with
the detector and runs the judge prefill on every row; with ``--scoring store`` (a store extracted with
``--judge true``) both come from the store, which holds the same activations. Every rule is then read from one
set of scores: the detector alone, the judge alone, the detector's own calibrated rule (``calibrate
--judge_band``: band and cut fitted on out-of-source benign rows of the training sources, which is what
`screen` and `guard` apply) and, for comparison, each of ``--bands`` with an uncalibrated cut at log-odds 0.

    python experiments/judge_band_check.py --detector artifacts/guard/detector \\
        --store stores/guard-qwen2.5-coder-1.5b --out experiments/results/judge-band-guard-qwen2.5-coder-1.5b

Writes rows.jsonl (score, judge log-odds, label per prompt), report.json, report.md and scores.png.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from lit_sahs.commands import script_main

BANDS = "0.5,0.9;0.3,0.9;0.2,0.95;0.1,0.99"


def rates(flagged: np.ndarray, labels: np.ndarray) -> dict:
    """Held-out benign FPR and harmful TPR of a decision."""
    return {"benign_fpr": float(flagged[labels == 0].mean()), "harmful_tpr": float(flagged[labels == 1].mean())}


def parse_bands(text: str) -> list[tuple[float, float]]:
    out = []
    for part in (p for p in text.split(";") if p):
        lo, hi = (float(v) for v in part.split(","))
        if not 0 <= lo <= hi <= 1:
            raise SystemExit(f"error: --bands: {part!r} is not LO,HI with 0 <= LO <= HI <= 1")
        out.append((lo, hi))
    if not out:
        raise SystemExit("error: --bands: give at least one LO,HI")
    return out


def run(detector: str = "artifacts/guard/detector", store: str = "stores/guard-qwen2.5-coder-1.5b",
        out: str = "experiments/results/judge-band", held_out_sources: str = "past_tense,sharegpt_instructions",
        held_out_families: str = "dan", bands: str = BANDS, sample: int = 0, batch_size: int = 4,
        threads: int = 0, scoring: str = "live") -> int:
    """Detector alone, judge alone and the two-stage cascade on the detector's held-out rows.

    Args:
        detector: a fitted detector artifact (its target is loaded)
        store: the store the detector was fitted on (its index holds the prompts)
        out: output directory
        held_out_sources: the sources the detector's fit held out (comma-separated)
        held_out_families: the attack families it held out
        bands: detector-score bands the judge decides, 'LO,HI;LO,HI'
        sample: judge this many held-out rows, drawn at random (seed 0) with both classes in proportion (0: all)
        batch_size: prompts per forward
        threads: torch CPU threads (0: torch's default)
        scoring: live (the target runs the detector's forward and the judge prefill) or store (both read
            from a store extracted with --judge true)
    """
    band_list = parse_bands(bands)
    if scoring not in ("live", "store"):
        raise SystemExit(f"error: --scoring must be live or store, got {scoring!r}")
    import torch

    if threads:
        torch.set_num_threads(threads)
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.detectors.metrics import compute_report
    from lit_sahs.screen import Screener
    from lit_sahs.self_judge import JudgeRule, band_decisions, stored_rule

    srcs = {s for s in held_out_sources.split(",") if s}
    fams = {f for f in held_out_families.split(",") if f}
    st = ActivationStore.open(store)
    rows = [r for r in st.index() if r["source"] in srcs or r["attack_family"] in fams]
    if sample:  # a random share of each class: the long jailbreak prompts cost seconds each on a CPU
        rng = np.random.default_rng(0)
        keep = []
        for label in (0, 1):
            idx = [i for i, r in enumerate(rows) if int(r["label"]) == label]
            keep += rng.choice(idx, size=min(len(idx), round(sample * len(idx) / len(rows))), replace=False).tolist()
        rows = [rows[i] for i in sorted(keep)]
    labels = np.array([int(r["label"]) for r in rows])
    ids = [r["id"] for r in rows]
    if len(set(labels.tolist())) < 2:
        raise SystemExit(f"error: the held-out rows of {store} ({len(rows)}) do not hold both classes")
    t = time.time()
    if scoring == "live":  # every row judged: any band can then be read from this one run
        screener = Screener(None, detector, batch_size=batch_size, judge_band=(0.0, 1.0), judge_cut=0.0)
        res = screener.score([r["text"] for r in rows], ids=ids, progress=True)
        scores, logodds, thr, det = res.scores, res.judge_logodds, res.threshold, screener.detector
    else:
        from lit_sahs.artifact import load_detector
        from lit_sahs.data.extra_features import read_inputs
        from lit_sahs.judge_cut import store_logodds

        det = load_detector(detector)
        pos = st.positions(ids)
        scores = np.asarray(det.scores(read_inputs(st, det.head_set, det.feature_spec, det.geometry.head_dim, rows=pos)),
                            dtype=np.float64)
        logodds = store_logodds(st, ids)
        thr = float(det.threshold)
    seconds = time.time() - t
    alone = scores >= thr
    rule = stored_rule(det.judge, detector)
    report = {"detector_path": detector, "store": store, "held_out": {"sources": sorted(srcs), "families": sorted(fams)},
              "n": len(rows), "n_harmful": int(labels.sum()), "threshold": thr, "seconds": seconds,
              "detector": compute_report(scores, labels, threshold=thr)["overall"],
              "judge": compute_report(logodds, labels, threshold=0.0)["overall"],
              "judge_says_unsafe": {"harmful": float((logodds[labels == 1] > 0).mean()),
                                    "benign": float((logodds[labels == 0] > 0).mean())},
              "detector_alone": rates(alone, labels), "judge_alone": rates(logodds > 0, labels), "bands": [],
              "scoring": scoring}
    # the product's own second-stage rule, fed the verdicts already computed for every row
    if rule is not None:
        flagged, inside, _ = band_decisions(scores, alone, rule, lambda rows: logodds[rows])
        report["calibrated"] = {"band": list(rule.band), "cut": rule.cut, "judged_share": float(inside.mean()),
                                "promised_fpr": det.judge.get("fpr"), "target_fpr": det.judge.get("target_fpr"),
                                **rates(flagged, labels)}
    for lo, hi in band_list:
        flagged, inside, _ = band_decisions(scores, alone, JudgeRule((lo, hi), 0.0), lambda rows: logodds[rows])
        report["bands"].append({"band": [lo, hi], "judged_share": float(inside.mean()), **rates(flagged, labels)})
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    with open(outdir / "rows.jsonl", "w") as f:
        for r, s, v in zip(rows, scores.tolist(), logodds.tolist()):
            f.write(json.dumps({"id": r["id"], "source": r["source"], "attack": r["attack"], "label": int(r["label"]),
                                "score": s, "judge_logodds": v}) + "\n")
    (outdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"Held-out rows of {store} ({report['n']}, {report['n_harmful']} harmful; sources {', '.join(sorted(srcs))}, "
             f"families {', '.join(sorted(fams))}); detector {detector}, threshold {thr:.3f}. AUROC / TPR@1%FPR: detector "
             f"{report['detector']['auroc']:.3f} / {report['detector']['tpr_at_1fpr']:.3f}, judge alone "
             f"{report['judge']['auroc']:.3f} / {report['judge']['tpr_at_1fpr']:.3f}. The judge says unsafe for "
             f"{report['judge_says_unsafe']['harmful']:.0%} of harmful and {report['judge_says_unsafe']['benign']:.0%} "
             f"of benign prompts.", "", "| decision | share judged | held-out benign FPR | held-out harmful TPR |",
             "|---|---:|---:|---:|",
             f"| detector alone | 0 | {report['detector_alone']['benign_fpr']:.3f} | {report['detector_alone']['harmful_tpr']:.3f} |",
             f"| judge alone (cut 0) | 1 | {report['judge_alone']['benign_fpr']:.3f} | "
             f"{report['judge_alone']['harmful_tpr']:.3f} |"]
    if rule is not None:
        c = report["calibrated"]
        lines.append(f"| **the detector's calibrated rule: judge inside [{c['band'][0]:g}, {c['band'][1]:g}], cut "
                     f"{c['cut']:.2f}** (promised benign FPR {c['promised_fpr']:.3f}) | {c['judged_share']:.2f} | "
                     f"{c['benign_fpr']:.3f} | {c['harmful_tpr']:.3f} |")
    lines += [f"| judge inside [{b['band'][0]}, {b['band'][1]}], uncalibrated cut 0 | {b['judged_share']:.2f} | "
              f"{b['benign_fpr']:.3f} | {b['harmful_tpr']:.3f} |" for b in report["bands"]]
    (outdir / "report.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for lab, color, name in ((0, "tab:blue", "benign"), (1, "tab:red", "harmful")):
        m = labels == lab
        ax.scatter(scores[m], logodds[m], s=12, alpha=0.6, color=color, label=name)
    ax.axvline(thr, color="k", lw=0.8, ls="--", label=f"detector threshold {thr:.2f}")
    ax.axhline(0, color="gray", lw=0.8)
    if rule is not None:
        ax.axhline(rule.cut, color="tab:green", lw=0.8, label=f"calibrated cut {rule.cut:.2f}")
        for edge in rule.band:
            ax.axvline(edge, color="tab:green", lw=0.6, ls=":")
    ax.set_xlabel("detector score")
    ax.set_ylabel("judge log-odds of 'unsafe'")
    ax.set_title("held-out rows: detector score vs the target's own verdict")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "scores.png", dpi=120)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
