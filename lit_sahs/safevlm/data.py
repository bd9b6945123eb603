"""SafetyDataModule: prompts from the product's sources, with what SafeVLM trains on.

Each row is a prompt (text, optional image) with its binary label, its risk level and type
(``taxonomy``), and the answer the language-model loss teaches (``answers``: a refusal for harmful
prompts, the target's own cached answer for benign ones). Splits are the product's
(``protocol.split_rows``: held-out attack families or held-out sources, else random), so SafeVLM
and the safety-head detectors are compared on the same rows. Batches are ``forward.with_slots``
batches: the target's chat template, the safety-token slots, the answer after the prompt.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lit_sahs.data.holdout import Holdout
from lit_sahs.data.protocol import DEFAULT_ATTACKS, DEFAULT_BENIGN, DEFAULT_HARMFUL, SampleSpec, names, split_rows
from lit_sahs.errors import LitSahsError
from lit_sahs.choices import DEFAULT_REFUSAL
from lit_sahs.guarding import eos_token_id
from lit_sahs.judge import PhraseJudge
from lit_sahs.safevlm.answers import AnswerCache
from lit_sahs.safevlm.forward import with_slots
from lit_sahs.safevlm.taxonomy import RISK_LEVELS, RISK_TYPES, labels_of
from lit_sahs.targets import prompting


_CLASSES = ("benign", "harmful")  # by label


def _joined(value: Union[str, list[str]]) -> str:
    return value if isinstance(value, str) else ",".join(value)


class SafetyDataModule(L.LightningDataModule):
    """Serves ``with_slots`` batches for one target. ``num_safety_tokens``: slots per row (SafeVLM
    sets it to its own count when a fit starts); ``answers``: the answer-cache file (default: one per target in
    ~/.cache/lit_sahs/answers); ``max_answer_tokens``: length of the cached benign answers;
    ``compliant_answers``: sampled tries for a benign *training* row whose own greedy answer the phrase
    judge calls a refusal (``AnswerCache.compliant``): the first passing sample becomes its target, and a row
    with none trains the safety head only (no LM loss). 0 keeps the greedy answers as they are. Validation
    rows keep theirs: their refusal mass where the answer starts does not depend on it.
    ``train_wraps``: attacks whose templates also wrap every plain *training* prompt, as extra training
    rows with the plain row's label and answer rules (a refusal for harmful rows, the target's own or a
    compliant answer for benign ones), so the LM loss sees both classes inside jailbreak templates of
    families other than the held-out ones; ``wrap_max_chars`` keeps to templates whose wrapped prompt
    fits (CPU budgets; when none fits, every template stays eligible); ``wrap_classes`` names which plain
    rows are wrapped (``benign`` alone teaches "a template is no reason to refuse" without adding wrapped
    refusal targets). Validation and test rows are unchanged, so a fit with and without wraps is scored on
    the same rows."""

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",  # or a loaded lit_sahs.targets.Target
        harmful: Union[str, list[str]] = ",".join(DEFAULT_HARMFUL),
        benign: Union[str, list[str]] = ",".join(DEFAULT_BENIGN),
        attacks: Union[str, list[str]] = ",".join(DEFAULT_ATTACKS),
        data: Optional[str] = None,
        limit: Optional[int] = 400,
        benign_ratio: float = 1.0,  # benign base prompts per harmful one: more benign rows, a narrower refusal
        max_chars: Optional[int] = None,
        held_out: Holdout = Holdout(),  # attack families and/or sources kept out of training (the test split)
        val_sources: list[str] = [],  # noqa: B006 - validate (threshold, checkpoint choice) on these sources only
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        num_safety_tokens: int = 64,
        batch_size: int = 4,
        answers: Optional[str] = None,
        max_answer_tokens: int = 32,
        compliant_answers: int = 0,
        train_wraps: Union[str, list[str]] = [],  # noqa: B006
        wrap_max_chars: Optional[int] = 2000,
        wrap_classes: Union[str, list[str]] = "harmful,benign",
        refusal: str = DEFAULT_REFUSAL,
        dtype: str = "float32",
        device: Optional[str] = None,
        seed: int = 0,
    ):
        super().__init__()
        from lit_sahs.targets import Target, load_target

        if batch_size < 1:
            raise LitSahsError(f"batch_size must be >= 1, got {batch_size}")
        if compliant_answers < 0:
            raise LitSahsError(f"compliant_answers must be >= 0, got {compliant_answers}")
        if num_safety_tokens < 1:
            raise LitSahsError(f"num_safety_tokens must be >= 1, got {num_safety_tokens}")
        self.spec = SampleSpec(harmful=_joined(harmful), benign=_joined(benign), attacks=_joined(attacks), data=data,
                               limit=limit, max_chars=max_chars, seed=seed, benign_ratio=benign_ratio)
        if not isinstance(held_out, Holdout):
            raise LitSahsError(f"held_out must be a Holdout(families=..., sources=...), got {held_out!r}")
        self.holdout = held_out
        self.val_sources = list(val_sources)
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.num_safety_tokens, self.batch_size = int(num_safety_tokens), int(batch_size)
        self.answers_path, self.max_answer_tokens, self.refusal = answers, int(max_answer_tokens), str(refusal)
        self.compliant_answers = int(compliant_answers)
        self.train_wraps, self.wrap_max_chars = list(names(train_wraps)), wrap_max_chars
        self.wrap_classes = list(names(wrap_classes))
        self._wrap_attacks = self._checked_wraps()
        if isinstance(target, Target):
            self.target = target
        else:
            from lit_sahs.devices import resolve_device

            self.target = load_target(str(target), dtype=dtype, device=resolve_device(device))
        self.fingerprint = self.target.fingerprint
        self.rows: list[dict] = []
        self.splits: dict[str, np.ndarray] = {}
        self.families: list[str] = []
        self.sources: list[str] = []

    def _checked_wraps(self) -> list:
        """The ``train_wraps`` attacks; they need the plain prompts to wrap, and must not teach the held-out families."""
        if not self.train_wraps:
            return []
        from lit_sahs.data.attacks import get_attack

        if "plain" not in names(self.spec.attacks):
            raise LitSahsError("train_wraps wraps the plain training prompts: add plain to attacks")
        if self.wrap_max_chars is not None and self.wrap_max_chars < 1:
            raise LitSahsError(f"wrap_max_chars must be >= 1, got {self.wrap_max_chars}")
        unknown = sorted(set(self.wrap_classes) - set(_CLASSES))
        if unknown or not self.wrap_classes:
            raise LitSahsError(f"wrap_classes takes harmful and/or benign, got {','.join(self.wrap_classes) or 'nothing'}")
        attacks = [get_attack(name) for name in self.train_wraps]  # one error line for an unknown name
        for attack in attacks:
            held = sorted({v.family for v in attack.variants()} & set(self.holdout.families))
            if held:
                raise LitSahsError(f"train_wraps {attack.name!r} holds templates of the held-out family {held[0]!r}: "
                                   "training on them would leak the test split")
        return attacks

    def _wrapped(self, samples: list, train: np.ndarray) -> list:
        """The plain training samples wrapped in each of ``train_wraps`` (one template per sample)."""
        wrapped = {_CLASSES.index(c) for c in self.wrap_classes}
        plain = [samples[i] for i in train if samples[i].attack == "plain" and int(samples[i].label) in wrapped]
        return [attack.apply(s, self.seed, self.wrap_max_chars) for attack in self._wrap_attacks for s in plain]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.rows:
            return
        samples = self.spec.build()
        if not samples:
            raise LitSahsError("no prompts: the sources, limit and max_chars leave nothing to train on")

        def row(s) -> dict:
            level, rtype = labels_of(s)
            return {"id": s.id, "text": s.text, "image": s.image, "label": int(s.label), "source": s.source,
                    "attack": s.attack, "attack_family": s.attack_family, "base_id": s.base_id,
                    "level": level, "type": rtype}

        rows = [row(s) for s in samples]
        splits = split_rows(rows, self.holdout.families, self.holdout.sources, self.val_fraction,
                            self.test_fraction, self.seed, val_sources=self.val_sources)
        if self.train_wraps:  # extra training rows only: validation and test stay the rows above
            extra = [row(s) for s in self._wrapped(samples, splits["train"])]
            splits = {**splits, "train": np.concatenate([splits["train"],
                                                         np.arange(len(rows), len(rows) + len(extra))])}
            rows += extra
        self.families = sorted({r["attack_family"] for r in rows})
        self.sources = sorted({r["source"] for r in rows})
        for r in rows:
            r["family"] = self.families.index(r["attack_family"])
            r["source_index"] = self.sources.index(r["source"])
        cache = AnswerCache(self.target, self.max_answer_tokens, self.answers_path)
        for split in ("val", "train"):
            benign = [rows[i] for i in splits[split] if rows[i]["label"] == 0]
            texts, images = [r["text"] for r in benign], [r["image"] for r in benign]
            if split == "train" and self.compliant_answers:
                judge = PhraseJudge()
                greedy = cache.answers(texts, images)
                got = cache.compliant(texts, judge.refused, images, tries=self.compliant_answers)
                for r, g, a in zip(benign, greedy, got):
                    r["answer"], r["answer_kind"] = a, "own" if a == g else ("sampled" if a is not None else "none")
            else:
                for r, a in zip(benign, cache.answers(texts, images)):
                    r["answer"], r["answer_kind"] = a, "own"
        for r in rows:
            if r["label"] == 1:
                r["answer"], r["answer_kind"] = self.refusal, "refusal"
            r.setdefault("answer_kind", "unused")  # benign test rows: no answer is taught
        self.rows, self.splits = rows, splits

    def split_rows(self, split: str) -> list[dict]:
        return [self.rows[i] for i in self.splits[split]]

    def balance(self) -> dict[str, dict[str, dict[str, int]]]:
        """Rows per split by label, risk level, risk type, source, attack family and answer kind
        (refusal, own, sampled, none): what the head and the LM loss are taught from, for a fit's report
        ({"train": {"level": {"high": 40, ...}, ...}})."""
        if not self.rows:
            self.setup()
        coded = {"label": _CLASSES, "level": RISK_LEVELS, "type": RISK_TYPES}  # index -> name
        out: dict[str, dict[str, dict[str, int]]] = {}
        for split in self.splits:
            rows = self.split_rows(split)
            out[split] = {key: dict(sorted(Counter(str(coded[key][r[key]]) if key in coded else str(r[key])
                                                   for r in rows).items()))
                          for key in ("label", "level", "type", "source", "attack_family", "answer_kind")}
        return out

    # ------------------------------------------------------------------ batches

    def collate(self, rows: list[dict]) -> dict:
        tgt = self.target
        texts, images, ids = [r["text"] for r in rows], [r["image"] for r in rows], [r["id"] for r in rows]
        texts = prompting.fit_context(tgt, texts, images, ids, reserve=self.num_safety_tokens + self.max_answer_tokens + 1)
        enc = prompting.encode(tgt, texts, images, ids)
        eos = eos_token_id(tgt)
        # a benign training row without a compliant answer has none: it trains the safety head only
        answers = [[] if r.get("answer_kind") == "none" else
                   tgt.tokenizer(r.get("answer") or "", add_special_tokens=False)["input_ids"][: self.max_answer_tokens] + [eos]
                   for r in rows]
        batch = with_slots(enc, self.num_safety_tokens, tgt.tokenizer.pad_token_id or eos, answers)
        batch["y"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        batch["level"] = torch.tensor([r["level"] for r in rows], dtype=torch.long)
        batch["type"] = torch.tensor([r["type"] for r in rows], dtype=torch.long)
        batch["family"] = torch.tensor([r["family"] for r in rows], dtype=torch.long)
        batch["source"] = torch.tensor([r["source_index"] for r in rows], dtype=torch.long)  # index in self.sources
        return batch

    def loader(self, split: str, shuffle: bool = False) -> DataLoader:
        """Batches of one split, in ``split_rows`` order unless shuffled."""
        if not self.rows:
            self.setup()
        return DataLoader(self.split_rows(split), batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", False)
