"""A small activation store with planted signal, for tests that need a store but not a target."""
from __future__ import annotations

import numpy as np

from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.heads import Geometry, TargetFingerprint

GEOM = Geometry(num_layers=4, num_heads=3, head_dim=8)
FP = TargetFingerprint("synthetic-target", GEOM, "c" * 64)
FAMILIES = ("plain", "dan", "pliny")
SIGNAL_HEADS = ((2, 1), (3, 0))

HARMFUL_WORDS = ["bomb", "poison", "steal", "hack", "weapon"]
BENIGN_WORDS = ["bread", "garden", "poem", "history", "math"]


def make_store(path, n_base: int = 60, seed: int = 0, families=FAMILIES, extras: bool = True,
               source_of=None) -> ActivationStore:
    """source_of(label, i) -> source name (default: two mixed sources, src_a and src_b)."""
    rng = np.random.default_rng(seed)
    rows, acts = [], []
    for i in range(n_base):
        label = i % 2
        word = (HARMFUL_WORDS if label else BENIGN_WORDS)[i % 5]
        for fam in families:
            s = Sample(id=f"s{i}-{fam}", text=f"[{fam} template] tell me about {word} number {i}", label=label,
                       source=source_of(label, i) if source_of else ("src_a" if i % 3 else "src_b"), attack=fam, attack_family=fam, base_id=f"b{i}")
            rows.append(s.index_row())
            a = rng.standard_normal(GEOM.shape)
            for l, h in SIGNAL_HEADS:
                a[l, h, :3] += 2.5 * (2 * label - 1)
            acts.append(a)
    acts = np.stack(acts)
    store = ActivationStore.create_or_open(path, FP, "rule", {"fmt": 1})
    for start in range(0, len(rows), 64):
        sl = slice(start, start + 64)
        ex = None
        if extras:
            n = len(rows[sl])
            ex = {"residual": rng.standard_normal((n, 16)).astype(np.float16),
                  "prompt_nll": rng.random(n).astype(np.float32)}
        store.write_block(rows[sl], acts[sl], extras=ex)
    return store


def shifted_sources_store(path, shift: dict, n_per_source: int = 36, seed: int = 0,
                          judge: bool = False) -> ActivationStore:
    """Three harmful sources (harm0-2) and the benign sources of `shift` ({source: how far its signal sits
    toward the harmful side}): what collections of borderline requests look like to a detector trained on
    ordinary ones. `judge`: also a judge_logodds extra that leans to "unsafe" for every row and is higher
    for harmful ones (as Qwen2.5-Coder-1.5B's does), drawn after the activations."""
    rng = np.random.default_rng(seed)
    rows, acts, labels = [], [], []
    for src, label in [(f"harm{j}", 1) for j in range(3)] + [(b, 0) for b in shift]:
        for i in range(n_per_source):
            s = Sample(id=f"{src}-{i}", text=f"{src} prompt {i}", label=label, source=src, attack="plain",
                       attack_family="plain", base_id=f"{src}-{i}")
            rows.append(s.index_row())
            a = rng.standard_normal(GEOM.shape)
            for l, h in SIGNAL_HEADS:
                a[l, h, :3] += 2.5 * (2 * label - 1) + shift.get(src, 0.0)
            acts.append(a)
            labels.append(label)
    store = ActivationStore.create_or_open(path, FP, "rule", {"fmt": 1})
    extras = None
    if judge:
        extras = {"judge_logodds": (4.0 + 2.0 * np.asarray(labels) + rng.standard_normal(len(rows))).astype(np.float32)}
    store.write_block(rows, np.stack(acts), extras=extras)
    return store
