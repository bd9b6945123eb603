"""Held-out folds: the one fold code behind `evaluate`'s reports and `tune`'s objective.

A fold (`Holdout`) keeps attack families and/or prompt sources out: its test split is exactly their
rows, and they are never seen in training, head ranking or threshold calibration. With
`ranking="per_fold"` heads are ranked again inside each fold by `locate` on the fold's training rows
only. Every fit goes through the Engine, validating (and calibrating the threshold on the training
sources' validation rows) once, after the last epoch.

Two protocols: *families* (leave one attack family out: templates never seen) and *sources*
(leave one harmful and one benign collection out: prompts unlike any seen, `source_holdouts`).
The zero-shot family matrix is here too; the source-level report is in `lit_sahs.protocols`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from lit_sahs.baselines import BASELINES, baseline_scores
from lit_sahs.data.holdout import Holdout
from lit_sahs.data.protocol import names
from lit_sahs.errors import LitSahsError
from lit_sahs.evaluate import detector_scores
from lit_sahs.detectors.metrics import AUROC

PER_FOLD = "per_fold"
MIN_PER_CLASS = 5  # fewer rows of a class than this make an AUROC cell noise: it is left empty


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


PAIRINGS = ("round_robin", "all_pairs")
OBJECTIVES = ("sources", "families", "both")


def source_holdouts(rows: Sequence[dict], pairing: str = "round_robin", min_rows: int = 20,
                    sources: Sequence[str] = ()) -> tuple[list[Holdout], dict[str, str]]:
    """Source-level folds: each holds out one harmful and one benign source (a source whose rows carry
    both labels, e.g. a user file, is a fold on its own). `round_robin` holds every source out once
    (fold i pairs harmful source i mod H with benign source i mod B); `all_pairs` every H x B pair.
    A fold whose test rows have one class or fewer than `min_rows` rows is skipped, with the reason;
    training must keep another source of each class, so each side needs two sources."""
    if pairing not in PAIRINGS:
        raise LitSahsError(f"unknown pairing {pairing!r}: use {' or '.join(PAIRINGS)}")
    labels_of: dict[str, set[int]] = {}
    count: dict[str, int] = {}
    for r in rows:
        src = str(r.get("source", ""))
        labels_of.setdefault(src, set()).add(int(r["label"]))
        count[src] = count.get(src, 0) + 1
    wanted = names(sources)
    unknown = [s for s in wanted if s not in labels_of]
    if unknown:
        raise LitSahsError(f"sources {unknown} have no rows in this store; present: {sorted(labels_of)}")
    pool = [s for s in sorted(labels_of) if not wanted or s in wanted]
    harmful = [s for s in pool if labels_of[s] == {1}]
    benign = [s for s in pool if labels_of[s] == {0}]
    mixed = [s for s in pool if labels_of[s] == {0, 1}]
    if (harmful or benign) and (len(set(harmful) | set(mixed)) < 2 or len(set(benign) | set(mixed)) < 2):
        raise LitSahsError(f"the source protocol needs at least two harmful and two benign sources (one held out, "
                           f"one to train on); this store has harmful {harmful}, benign {benign}, mixed {mixed}: "
                           "extract with more sources")
    if not harmful and len(mixed) < 2:
        raise LitSahsError(f"the source protocol needs two sources; this store has {sorted(labels_of)}")
    if pairing == "all_pairs":
        pairs = [(h, b) for h in harmful for b in benign]
    else:
        n = max(len(harmful), len(benign)) if harmful and benign else 0
        pairs = [(harmful[i % len(harmful)], benign[i % len(benign)]) for i in range(n)]
    candidates = [Holdout(sources=p) for p in pairs] + [Holdout(sources=(m,)) for m in mixed]
    keep, skipped = [], {}
    for hold in candidates:
        n_rows = sum(count[s] for s in hold.sources)
        if len({y for s in hold.sources for y in labels_of[s]}) < 2:
            skipped[hold.name] = "single class"
        elif n_rows < min_rows:
            skipped[hold.name] = f"only {n_rows} rows"
        else:
            keep.append(hold)
    if not keep:
        raise LitSahsError(f"no source fold has both classes and >= {min_rows} rows (skipped: {skipped})")
    return keep, skipped


class Folds:
    """An activation store seen by attack family: the families, heads, splits and DataModule of each fold.

    ranking: "per_fold" (locate inside each fold), or a HeadRanking JSON used for every fold;
    explicit `heads` ('3.1,5.0') are used for every fold instead of any ranking.
    """

    def __init__(self, store: str, ranking: Optional[str] = PER_FOLD, heads: Optional[str] = None, seed: int = 0,
                 val_fraction: float = 0.2, test_fraction: float = 0.2):
        from lit_sahs.data.store import ActivationStore

        self.store_path, self.ranking, self.heads = str(store), ranking, heads
        self.seed, self.val_fraction, self.test_fraction = seed, val_fraction, test_fraction
        self.store = ActivationStore.open(self.store_path)
        self.index = self.store.index()
        if not self.index:
            raise LitSahsError(f"activation store {self.store_path} holds no rows: "
                               "run `python -m lit_sahs extract` first")
        self.labels = np.array([int(r["label"]) for r in self.index])
        self.family_of = np.array([r.get("attack_family", "plain") for r in self.index])
        self.geometry = self.store.geometry
        self.fingerprint = self.store.fingerprint
        self._rankings: dict = {}

    @property
    def per_fold(self) -> bool:
        return self.heads is None and self.ranking == PER_FOLD

    def choose_families(self, wanted: Sequence[str], min_rows: int,
                        purpose: str = "leave-one-family-out") -> tuple[list[str], dict[str, str]]:
        """The families to hold out, and the skipped ones with the reason: `wanted` (each needs both
        classes), or every family with both classes and >= min_rows rows."""
        fams, skipped = eligible_families(self.index, min_rows=1 if wanted else min_rows)
        if wanted:
            bad = {f: skipped.get(f, "no rows") for f in wanted if f not in fams}
            if bad:
                raise LitSahsError(f"families {bad} cannot be held out (a fold needs both classes); usable: {fams}")
            fams = list(dict.fromkeys(wanted))
        if len(fams) < 2:
            raise LitSahsError(f"{purpose} needs two attack families with both classes and >= {min_rows} rows; "
                               f"{self.store_path} has {fams} (skipped: {skipped}): extract with more attacks "
                               "or list families explicitly")
        return fams, skipped

    def ranking_for(self, held_out: Holdout | Sequence[str] | str = (), train_families: Sequence[str] = ()):
        """The HeadRanking of the fold holding out `held_out` (a Holdout, or attack family names; () :
        nothing held out, e.g. a refit)."""
        from lit_sahs.locate import locate
        from lit_sahs.ranking import HeadRanking

        hold = Holdout.of(held_out)
        key = (hold, names(train_families)) if self.per_fold else None
        if key not in self._rankings:
            if self.per_fold:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = locate(self.store, held_out_families=list(hold.families), held_out_sources=list(hold.sources),
                               train_families=list(key[1]), val_fraction=self.val_fraction,
                               test_fraction=self.test_fraction, seed=self.seed)
            else:
                r = HeadRanking.load(self.ranking)
                r.fingerprint.check(self.fingerprint, f"head ranking {self.ranking}")
            self._rankings[key] = r
        return self._rankings[key]

    def heads_for(self, k: int, held_out: Holdout | Sequence[str] | str = (), train_families: Sequence[str] = (),
                  within=None):
        """The HeadSet of a fold: the top k of its ranking (of the heads `within`, when given), or the
        explicit heads."""
        if self.per_fold:
            return self.ranking_for(held_out, train_families).top_k(k, within)
        if within is not None and self.heads is None:
            return self.ranking_for().top_k(k, within)
        from lit_sahs.data.datamodules import resolve_heads

        return resolve_heads(self.fingerprint, self.heads, self.ranking, k)

    def max_heads(self) -> int:
        if self.per_fold:
            return self.geometry.num_layers * self.geometry.num_heads
        return len(self.ranking_for().scores)

    def split(self, held_out: Holdout | Sequence[str] | str = (),
              train_families: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Row positions of train / val / test, as the fold's DataModule splits them."""
        from lit_sahs.data.protocol import split_rows

        hold = Holdout.of(held_out)
        return split_rows(self.index, held_out_families=hold.families, held_out_sources=hold.sources,
                          train_families=names(train_families), val_fraction=self.val_fraction,
                          test_fraction=self.test_fraction, seed=self.seed)

    def datamodule(self, heads, held_out: Holdout | Sequence[str] | str = (), train_families: Sequence[str] = (),
                   batch_size: int = 256, features: Optional[str] = None):
        from lit_sahs.data.datamodules import CachedActivationDataModule

        hold = Holdout.of(held_out)
        return CachedActivationDataModule(self.store_path, heads=heads, features=features, held_out=hold,
                                          train_families=list(names(train_families)), val_fraction=self.val_fraction,
                                          test_fraction=self.test_fraction, batch_size=batch_size, seed=self.seed)

    def holdouts(self, objective: str = "sources", families: Sequence[str] = (), min_rows: int = 20,
                 pairing: str = "round_robin", sources: Sequence[str] = ()) -> list[Holdout]:
        """The folds of a protocol: `families` (each attack family held out once), `sources` (one
        harmful and one benign source held out at a time) or `both`."""
        if objective not in OBJECTIVES:
            raise LitSahsError(f"unknown objective {objective!r}: use {', '.join(OBJECTIVES)}")
        out: list[Holdout] = []
        if objective in ("families", "both"):
            fams, _ = self.choose_families(list(families), min_rows)
            out += [Holdout(families=(f,)) for f in fams]
        if objective in ("sources", "both"):
            out += self.source_holdouts(pairing, min_rows, sources)[0]
        return out

    def source_holdouts(self, pairing: str = "round_robin", min_rows: int = 20,
                        sources: Sequence[str] = ()) -> tuple[list[Holdout], dict[str, str]]:
        """Folds that each hold out one harmful and one benign source (see `source_holdouts`)."""
        return source_holdouts(self.index, pairing, min_rows, sources)


def build_detector(family: str, hparams: Optional[dict] = None, target_fpr: Optional[float] = None):
    """A detector of `family` with `hparams` (and `target_fpr` unless hparams set it)."""
    import inspect

    from lit_sahs.families import family_class

    cls = family_class(family)
    args = dict(hparams or {})
    if target_fpr is not None and "target_fpr" in inspect.signature(cls.__init__).parameters:
        args.setdefault("target_fpr", target_fpr)
    return cls(**args)


@dataclass
class FoldFit:
    detector: object
    datamodule: object
    val_metrics: dict = field(default_factory=dict)

    def rows(self, split: str = "test") -> np.ndarray:
        return self.datamodule.splits[split]

    def scores(self, split: str = "test") -> np.ndarray:
        from lit_sahs.data.extra_features import read_inputs

        det, dm = self.detector, self.datamodule
        return detector_scores(det, read_inputs(dm.store, det.head_set, det.feature_spec, det.geometry.head_dim,
                                                rows=self.rows(split)))


def fit_fold(folds: Folds, family: str, hparams: Optional[dict], k: int, held_out: Holdout | Sequence[str] | str = (),
             train_families: Sequence[str] = (), max_epochs: Optional[int] = None, batch_size: int = 256,
             target_fpr: Optional[float] = None, features: Optional[str] = None, all_heads: bool = False,
             within=None) -> FoldFit:
    """Fit a `family` detector on the fold's top-k heads (every head with `all_heads`, e.g. for the
    sparse selector), plus extra `features` ('resid,refusal', see lit_sahs.data.extra_features), and
    training families (max_epochs None: the family's own default); the held-out rows stay unseen.
    `within`: choose the top-k (at most all) among these heads only; features with ``tokens`` default it
    to the heads the store recorded at every token."""
    from lit_sahs.engine import Engine, require_one_process
    from lit_sahs.heads import HeadSet

    require_one_process("the held-out folds (evaluate, tune)")  # folds run one after another in one process
    if within is None and features:  # per-token features: the heads the store recorded at every token
        from lit_sahs.data.extra_features import TOKEN_HEADS_EXTRA, parse_names, store_token_heads

        if "tokens" in parse_names(features) and TOKEN_HEADS_EXTRA in folds.store.extra_names():
            within = store_token_heads(folds.store)
    if within is not None:
        k = min(k, len(within))  # a search over k may ask for more than were recorded
    heads = HeadSet.all(folds.geometry) if all_heads else folds.heads_for(k, held_out, train_families, within)
    dm = folds.datamodule(heads, held_out, train_families, batch_size, features)
    result = Engine(validate_once=True, max_epochs=max_epochs).fit(build_detector(family, hparams, target_fpr), dm)
    return FoldFit(result.detector, dm, result.val_metrics)


# ---------------------------------------------------------------- the zero-shot family matrix

def _auroc(scores: np.ndarray, y: np.ndarray) -> float:
    from lit_sahs.detectors import compute_report

    if min(int((y == 1).sum()), int((y == 0).sum())) < MIN_PER_CLASS:
        return float("nan")
    return float(compute_report(scores, y)["overall"][AUROC])


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

    folds = Folds(store, ranking=PER_FOLD if relocate else ranking, heads=heads, seed=seed)
    fams, skipped = folds.choose_families(list(families), min_rows, purpose="the zero-shot matrix")
    n = len(fams)
    methods = ["heads"] + list(baselines)
    matrix = {m: np.full((n + 1, n), np.nan) for m in methods}

    def fit(held_out, train):
        return fit_fold(folds, detector, detector_args, top_k, held_out, train, max_epochs=max_epochs)

    bar = tqdm(total=2 * n, desc="zero-shot fits", disable=not progress)
    for i, train_fam in enumerate(fams):  # one family -> every other family
        _fill_row(matrix, i, fams, fit([f for f in fams if f != train_fam], [train_fam]), folds, baselines, train_fam)
        bar.update()
    for j, test_fam in enumerate(fams):  # every other family -> this one
        f = fit([test_fam], [x for x in fams if x != test_fam])
        rows, dm = f.rows("test"), f.datamodule
        matrix["heads"][n, j] = _auroc(f.scores("test"), folds.labels[rows])
        for name, scores in baseline_scores(dm.store, dm.splits["train"], rows, baselines, seed).items():
            matrix[name][n, j] = _auroc(scores, folds.labels[rows])
        bar.update()
    bar.close()
    loo = {m: float(np.nanmean(matrix[m][n])) for m in methods if not np.isnan(matrix[m][n]).all()}
    return {"families": fams, "rows": fams + ["all others"], "skipped": skipped, "matrix": matrix,
            "mean_held_out_auroc": loo, "top_k": top_k, "relocate": folds.per_fold,
            "head_set": None if folds.per_fold else folds.heads_for(top_k).to_list()}


def _fill_row(matrix: dict, i: int, fams: list[str], fit: FoldFit, folds: Folds, baselines: Sequence[str],
              train_fam: str) -> None:
    """Row i of the matrix: family i's own validation rows on the diagonal, each other family's test rows."""
    dm = fit.datamodule
    val, test = fit.rows("val"), fit.rows("test")
    s_val, s_test = fit.scores("val"), fit.scores("test")
    # each baseline trained once on the fold's train rows, scoring val and test together
    both = baseline_scores(dm.store, dm.splits["train"], np.concatenate([val, test]), baselines, dm.seed)
    base_val = {name: sc[:len(val)] for name, sc in both.items()}
    base_test = {name: sc[len(val):] for name, sc in both.items()}
    for j, fam in enumerate(fams):
        if fam == train_fam:
            rows, s, base = val, s_val, base_val
            mask = np.ones(len(val), dtype=bool)
        else:
            rows, s, base = test, s_test, base_test
            mask = folds.family_of[test] == fam
        matrix["heads"][i, j] = _auroc(s[mask], folds.labels[rows][mask])
        for name, scores in base.items():
            matrix[name][i, j] = _auroc(scores[mask], folds.labels[rows][mask])


def matrix_csv(result: dict, method: str) -> str:
    fams = result["families"]
    lines = ["train\\test," + ",".join(fams)]
    for name, row in zip(result["rows"], result["matrix"][method]):
        lines.append(name + "," + ",".join("" if np.isnan(v) else f"{v:.4f}" for v in row))
    return "\n".join(lines) + "\n"
