"""Assembling a dataset: load base prompts, dedupe across sources, balance the classes, apply attacks.

Balance and dedupe happen on *base* prompts, before attacks: every attack is then applied to the same
harmful and benign bases, so each attack's slice is itself balanced and a detector cannot separate the
classes by template.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

from lit_sahs.checks import at_least
from lit_sahs.data.holdout import check_names
from lit_sahs.data.attacks import apply_attacks, get_attack, spread_attacks
from lit_sahs.data.samples import BENIGN, MALICIOUS, Sample, dedupe
from lit_sahs.data.sources import load_source, source_label
from lit_sahs.data.user_files import FILE_PREFIX, load_user_file
from lit_sahs.errors import LitSahsError

if TYPE_CHECKING:
    import numpy as np

# The data every command uses unless told otherwise (the one place these lists live): four harmful
# request collections; generic questions, hard negatives (health, medication) and real chat.
DEFAULT_HARMFUL = ("advbench", "harmbench", "donotanswer", "past_tense")
DEFAULT_BENIGN = ("truthfulqa", "nq_open", "mmlu", "commonsenseqa", "openbookqa", "healthsearchqa", "medicationqa",
                  "sharegpt")
DEFAULT_ATTACKS = ("plain", "pyrit", "dan", "inthewild")


def names(value: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """Comma-separated names ("a,b"), a list of names, or None -> a tuple of non-empty names."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(n.strip() for n in items if n.strip())


@dataclass
class SampleSpec:
    """Which prompts to use: packaged sources (comma-separated names or file:path) or one user
    file (`data`, JSONL/CSV with text,label,...), the attacks applied to every base prompt (or, with
    `spread_attacks`, one of them to each base prompt in turn), how many, and `benign_ratio` benign
    base prompts per harmful one (packaged sources)."""

    harmful: str = ",".join(DEFAULT_HARMFUL)
    benign: str = ",".join(DEFAULT_BENIGN)
    attacks: str = ",".join(DEFAULT_ATTACKS)
    data: Optional[str] = None
    limit: Optional[int] = 400
    max_chars: Optional[int] = None
    seed: int = 0
    spread_attacks: bool = False
    benign_ratio: float = 1.0

    def build(self) -> list[Sample]:
        """The labelled, attacked samples (the same spec gives the same list)."""
        at_least({"limit": self.limit, "max_chars": self.max_chars}, 1)  # a negative limit would slice from the end
        if self.data:
            attack = spread_attacks if self.spread_attacks else apply_attacks
            samples = attack(load_user_file(self.data), names(self.attacks), seed=self.seed, max_chars=self.max_chars)
            return samples[: self.limit] if self.limit is not None else samples
        return build_dataset(harmful=names(self.harmful), benign=names(self.benign), attacks=names(self.attacks),
                             limit=self.limit, seed=self.seed, max_chars=self.max_chars, spread=self.spread_attacks,
                             benign_ratio=self.benign_ratio)


def even_split(sizes: Sequence[int], total: int) -> list[int]:
    """Share `total` as evenly as possible over bins of the given sizes; a bin that runs out passes
    its share on to the others (so a small source does not shrink the whole class)."""
    quotas = [0] * len(sizes)
    remaining = total
    open_bins = [i for i, n in enumerate(sizes) if n > 0]
    while remaining > 0 and open_bins:
        share, extra = divmod(remaining, len(open_bins))
        for rank, i in enumerate(open_bins):
            give = min(sizes[i] - quotas[i], share + (rank < extra))
            quotas[i] += give
            remaining -= give
        open_bins = [i for i in open_bins if quotas[i] < sizes[i]]
    return quotas


def _check_side(names: Sequence[str], expected: int, side: str) -> None:
    """A packaged source listed on the wrong side is almost certainly a typo-level mistake: say so."""
    other = "benign" if side == "harmful" else "harmful"
    for name in names:
        label = source_label(name)
        if label is not None and label != expected:
            raise LitSahsError(f"source {name!r} is {other}, but it is listed under {side}=; move it to {other}=")


def _by_source(samples: Sequence[Sample]) -> dict[str, list[Sample]]:
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.source].append(s)
    return dict(groups)


def _pick(samples: Sequence[Sample], quota: int, seed: int) -> list[Sample]:
    """A seeded, even-ish draw over the sources of one class."""
    groups = _by_source(samples)
    quotas = even_split([len(g) for g in groups.values()], quota)
    picked = []
    for (source, group), q in zip(groups.items(), quotas):
        picked += random.Random(f"{seed}|{source}|pick").sample(group, q)
    return picked


def _class_quotas(n_harmful: int, n_benign: int, n_attacks: int, limit: Optional[int], balance: bool,
                  benign_ratio: float = 1.0) -> tuple[int, int]:
    """Base prompts per class: `benign_ratio` benign per harmful one when balanced (equal by default),
    and at most limit / attacks in total."""
    if balance:
        k = min(n_harmful, int(n_benign / benign_ratio + 1e-9))
        if limit is not None:
            k = min(k, int((limit // n_attacks) / (1 + benign_ratio) + 1e-9))
        return k, int(k * benign_ratio + 1e-9)
    if limit is None:
        return n_harmful, n_benign
    h, b = even_split([n_harmful, n_benign], limit // n_attacks)
    return h, b


def build_dataset(
    harmful: Sequence[str] = DEFAULT_HARMFUL,
    benign: Sequence[str] = DEFAULT_BENIGN,
    attacks: Sequence[str] = ("plain",),
    limit: Optional[int] = None,
    seed: int = 0,
    balance: bool = True,
    max_chars: Optional[int] = None,
    spread: bool = False,
    benign_ratio: float = 1.0,
) -> list[Sample]:
    """Labelled, attacked samples ready for extraction; the same arguments give the same list, in order.

    Sources are packaged names or `file:<path>` (a user file may hold both labels). `limit` caps the
    number of output samples, split evenly over classes and attacks. `max_chars` makes the
    attacks that pick a template per sample pick one whose attacked prompt fits (for CPU budgets).
    `spread` gives each base prompt one attack in turn (``spread_attacks``) instead of every attack:
    more distinct prompts for the same number of rows. `benign_ratio`: benign base prompts per harmful
    one when balancing (traffic is mostly benign; a model trained to refuse learns a narrower boundary).
    """
    harmful, benign = _as_tuple(harmful), _as_tuple(benign)
    attacks = tuple(dict.fromkeys(_as_tuple(attacks)))
    if not harmful and not benign:
        raise LitSahsError("no sources given; name at least one harmful and one benign source, e.g. harmful=advbench benign=truthfulqa")
    if limit is not None and limit < 1:
        raise LitSahsError(f"limit must be a positive number of samples, got {limit}")
    if not benign_ratio > 0:
        raise LitSahsError(f"benign_ratio must be > 0 benign prompts per harmful one, got {benign_ratio}")
    _check_side(harmful, MALICIOUS, "harmful")
    _check_side(benign, BENIGN, "benign")
    for name in attacks:
        get_attack(name)  # fail on a typo before loading anything
    if not attacks:
        raise LitSahsError("no attacks given; use at least attacks=plain")

    listed = list(dict.fromkeys(harmful + benign))
    loaded = {name: load_source(name) for name in listed}
    pool = dedupe(s for name in listed for s in loaded[name])
    kept = {s.source for s in pool}
    for name in listed:  # ids are content-based: a subset source listed after its superset keeps nothing
        if loaded[name] and not name.startswith(FILE_PREFIX) and name not in kept:
            raise LitSahsError(f"source {name!r} adds no prompts: each of them is already in a source listed "
                               f"before it (the same text is one sample); list {name!r} first or drop one of them")
    harm = [s for s in pool if s.label == MALICIOUS]
    ben = [s for s in pool if s.label == BENIGN]
    per_base = 1 if spread else len(attacks)  # rows each base prompt becomes
    n_h, n_b = _class_quotas(len(harm), len(ben), per_base, limit, balance, benign_ratio)
    bases = _pick(harm, n_h, seed) + _pick(ben, n_b, seed)
    random.Random(f"{seed}|order").shuffle(bases)
    out = (spread_attacks if spread else apply_attacks)(bases, attacks, seed=seed, max_chars=max_chars)
    if not out:
        raise LitSahsError(_empty_reason(len(harm), len(ben), per_base, limit, balance))
    return out


def _empty_reason(n_harmful: int, n_benign: int, n_attacks: int, limit: Optional[int], balance: bool) -> str:
    if balance and (n_harmful == 0 or n_benign == 0):
        missing = "harmful" if n_harmful == 0 else "benign"
        return f"the dataset is empty: no {missing} prompts to balance against; add a {missing} source or pass balance=False"
    if limit is not None:
        return f"the dataset is empty: limit={limit} is too small for {n_attacks} attack(s) x 2 classes; use limit >= {2 * n_attacks}"
    return "the dataset is empty: the sources yielded no prompts after deduplication; check the source names"


def _as_tuple(value) -> tuple[str, ...]:
    """Accept one name or a comma-separated string too (a CLI or YAML config often passes one)."""
    return names(value)


# ---------------------------------------------------------------- splits

SPLITS = ("train", "val", "test")


def split_rows(rows: Sequence[dict], held_out_families: Sequence[str] = (), held_out_sources: Sequence[str] = (),
               val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0,
               train_families: Sequence[str] = (), val_sources: Sequence[str] = ()) -> dict[str, "np.ndarray"]:
    """Row positions for train / val / test.

    With held-out attack families or sources, test is exactly the rows of those families or sources
    (zero-shot: the detector never sees them); otherwise test is a random `test_fraction` of base
    prompts. Val is a random `val_fraction` of the remaining base prompts, or, with `val_sources`,
    exactly the remaining rows of those sources (never trained on: the threshold is calibrated and
    checkpoints chosen on collections unlike the training ones). Both random choices are
    stratified by label. Splitting by `base_id`
    keeps a base prompt and its attacked versions on one side of the train/val (and random test)
    boundary. Unknown held-out names, an empty or single-class split are errors.
    """
    import numpy as np

    held_out_families, held_out_sources = _as_tuple(held_out_families), _as_tuple(held_out_sources)
    train_families, val_sources = _as_tuple(train_families), _as_tuple(val_sources)
    both = set(val_sources) & set(held_out_sources)
    if both:
        raise LitSahsError(f"sources {sorted(both)} are both held out (test) and validation sources: pick one")
    check_names(rows, held_out_families + train_families, held_out_sources + val_sources)

    def bucket(key: str, salt: str) -> float:
        return random.Random(f"{seed}|{salt}|{key}").random()

    def pick(bases: dict[str, int], fraction: float, salt: str) -> set[str]:
        """A `fraction` of the base prompts of each class (stratified; at least one per class when
        the class has two or more, so small data still gets both classes on each side)."""
        chosen = set()
        for label in (0, 1):
            group = sorted((b for b, y in bases.items() if y == label), key=lambda b: (bucket(b, salt), b))
            k = int(round(fraction * len(group)))
            if fraction > 0 and len(group) >= 2:
                k = min(max(k, 1), len(group) - 1)
            chosen.update(group[:k])
        return chosen

    base_of = [r.get("base_id") or r["id"] for r in rows]
    base_label = {b: int(r["label"]) for b, r in zip(base_of, rows)}
    explicit = bool(held_out_families or held_out_sources)
    test_bases = set() if explicit else pick(base_label, test_fraction, "test")
    is_test = [(r.get("attack_family", "plain") in held_out_families or r.get("source") in held_out_sources)
               if explicit else base_of[i] in test_bases for i, r in enumerate(rows)]
    pool = {b: base_label[b] for i, b in enumerate(base_of) if not is_test[i]
            and not (train_families and rows[i].get("attack_family", "plain") not in train_families)}
    val_bases = set() if val_sources else pick(pool, val_fraction, "val")
    assign = []
    for i, r in enumerate(rows):
        if is_test[i]:
            assign.append("test")
        elif train_families and r.get("attack_family", "plain") not in train_families:
            assign.append("none")
        elif val_sources:
            assign.append("val" if r.get("source") in val_sources else "train")
        else:
            assign.append("val" if base_of[i] in val_bases else "train")
    assign = np.array(assign)
    out = {name: np.flatnonzero(assign == name) for name in SPLITS}
    labels = np.array([int(r["label"]) for r in rows])
    for name in SPLITS:
        present = set(labels[out[name]].tolist())
        if not present:
            raise LitSahsError(f"the {name} split is empty ({len(rows)} rows): use more data or other fractions")
        if len(present) < 2:
            raise LitSahsError(f"the {name} split has only {'malicious' if 1 in present else 'benign'} samples: "
                               "a detector needs both classes; add sources of the other class or change the split")
    return out
