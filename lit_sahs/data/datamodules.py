"""DataModules that feed detectors: selected heads' activations, labels and attack families.

Two sources, one batch format:

* ``CachedActivationDataModule`` reads an ActivationStore made by ``extract``;
* ``LiveActivationDataModule`` runs the target on the fly (and can write what it computes
  through to a store, so a later run can use the cached module on it).

Contract (detectors rely on it)
-------------------------------
Right after ``__init__`` (cheap: manifest + index, or the loaded target): ``head_set``
(HeadSet), ``geometry``, ``fingerprint``, ``families`` (sorted attack family names present).
After ``setup("fit")``: ``normalisation`` = (mean, std), float32 tensors [k, D] fitted on the
TRAIN split only (population std, floored at ``NORM_EPS``). Batches are dicts:

* ``x``      float32 [B, k, D]  raw (un-normalised) activations, heads in HeadSet order;
* ``y``      float32 [B]        1 malicious, 0 benign;
* ``family`` long [B]           index into ``families``;
* ``row``    long [B]           position of the sample in ``split_rows(<split>)``, so
                                predictions can be joined back to their index rows whatever
                                order shuffling or workers produced.

``predict_dataloader`` is the test split. ``split_rows(name)`` gives a split's index rows.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lit_sahs.data.extra_features import FeatureSpec, read_packed
from lit_sahs.data.features import NORM_EPS, RunningMoments, resolve_heads
from lit_sahs.data.holdout import Holdout
from lit_sahs.data.protocol import DEFAULT_BENIGN, DEFAULT_HARMFUL, SPLITS, SampleSpec, names, split_rows as _split_rows
from lit_sahs.data.store import ActivationStore
from lit_sahs.data.store_splits import MemorySplit, StreamSplit
from lit_sahs.devices import resolve_device
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint

__all__ = ["NORM_EPS", "CachedActivationDataModule", "LiveActivationDataModule", "RunningMoments", "resolve_heads"]


# ---------------------------------------------------------------- shared helpers

def _check_split_name(name: str) -> str:
    if name not in SPLITS:
        raise LitSahsError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
    return name


def _identity(batch):
    return batch


# ---------------------------------------------------------------- shared DataModule plumbing

class _SplitDataModule(L.LightningDataModule):
    """What both DataModules share: index rows with their labels and attack families, the
    protocol's train / val / test split of them, and the four loaders over ``_loader``."""

    def _init_rows(self, rows: list[dict], held_out: Holdout, train_families,
                   val_fraction: float, test_fraction: float, batch_size: int, seed: int, val_sources=()) -> None:
        if batch_size < 1:
            raise LitSahsError(f"batch_size must be >= 1, got {batch_size}")
        self._rows = rows
        if not isinstance(held_out, Holdout):
            raise LitSahsError(f"held_out must be a Holdout(families=..., sources=...), got {held_out!r}")
        self.holdout = held_out  # what the test split keeps out of training: one value, to the report's label
        self.val_sources = names(val_sources)
        self.train_families = names(train_families)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.families: list[str] = sorted({r.get("attack_family", "plain") for r in rows})
        fam_idx = {f: i for i, f in enumerate(self.families)}
        self._family = np.asarray([fam_idx[r.get("attack_family", "plain")] for r in rows], dtype=np.int64)
        self._labels = np.asarray([int(r["label"]) for r in rows], dtype=np.float32)
        self._splits: Optional[dict[str, np.ndarray]] = None
        self.normalisation: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def splits(self) -> dict[str, np.ndarray]:
        """Row positions (into the index rows) of train / val / test."""
        if self._splits is None:
            self._splits = _split_rows(self._rows, self.holdout.families, self.holdout.sources,
                                       self.val_fraction, self.test_fraction, self.seed,
                                       train_families=self.train_families, val_sources=self.val_sources)
        return self._splits

    def split_rows(self, name: str) -> list[dict]:
        """Index rows of a split, in the order a batch's ``row`` refers to."""
        return [dict(self._rows[i]) for i in self.splits[_check_split_name(name)]]

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")


# ---------------------------------------------------------------- cached DataModule

class CachedActivationDataModule(_SplitDataModule):
    """Selected heads' activations from an ActivationStore, split by held-out families / sources.

    Heads: ``heads`` ('3.1,5.0') > ``ranking`` (HeadRanking JSON, its ``top_k``) > ``all_heads``.
    If the selected heads of all rows fit in ``max_memory_mb`` they are loaded into RAM (fp16);
    otherwise each split streams from disk block by block. Both modes serve the same rows and
    values; only the batch order of the shuffled train split differs.
    """

    def __init__(
        self,
        store: str,
        heads: Optional[str] = None,
        ranking: Optional[str] = None,
        top_k: int = 8,
        all_heads: bool = False,
        held_out: Holdout = Holdout(),  # attack families and/or sources kept out of training (the test split)
        train_families: list[str] = [],  # noqa: B006 - only these families in train/val (zero-shot matrix)
        val_sources: list[str] = [],  # noqa: B006 - validate on these sources only, never trained on
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 256,
        seed: int = 0,
        max_memory_mb: int = 2048,
        num_workers: int = 0,
        features: Union[str, list[str], None] = None,
    ):
        super().__init__()
        if num_workers < 0:
            raise LitSahsError(f"num_workers must be >= 0, got {num_workers}")
        self.store_path = str(store)
        self.store = ActivationStore.open(store)
        self.fingerprint: TargetFingerprint = self.store.fingerprint
        self.geometry: Geometry = self.store.geometry
        self.head_set: HeadSet = resolve_heads(self.fingerprint, heads, ranking, top_k, all_heads)
        # extra features packed after the heads (lit_sahs.data.extra_features): residual layers, refusal
        self.feature_spec: FeatureSpec = FeatureSpec.for_store(self.store, features, heads=self.head_set)
        self.ranking_path = ranking if ranking and not heads else None  # reports attach it to the run
        rows = self.store.index()
        if not rows:
            raise LitSahsError(f"activation store {store} holds no rows: run `python -m lit_sahs extract ...` first")
        self._init_rows(rows, held_out, train_families, val_fraction, test_fraction,
                        batch_size, seed, val_sources)
        self.num_workers, self.max_memory_mb = int(num_workers), max_memory_mb
        d = self.geometry.head_dim
        need = len(self._rows) * (len(self.head_set) + self.feature_spec.num_slots(d)) * d * 2  # fp16 in RAM
        self.in_memory: bool = need <= max_memory_mb * 2 ** 20
        if self.feature_spec and not self.in_memory:
            raise LitSahsError(f"extra features {list(self.feature_spec.names)} are served from memory only and "
                               f"need {need / 2 ** 20:.0f} MB: raise --data.max_memory_mb or drop --data.features")
        self._x: Optional[torch.Tensor] = None

    # ------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        splits = self.splits
        need_norm = self.normalisation is None and stage in (None, "fit")
        need_load = self.in_memory and self._x is None
        if not (need_norm or need_load):
            return
        train = np.zeros(len(self._rows), dtype=bool)
        train[splits["train"]] = True
        d = self.geometry.head_dim
        moments = RunningMoments((len(self.head_set) + self.feature_spec.num_slots(d), d))
        packed = read_packed(self.store, self.feature_spec, d) if self.feature_spec else None
        parts, offset = [], 0
        for rows, acts in self.store.iter_blocks(self.head_set):  # one block in memory at a time
            if packed is not None:
                acts = np.concatenate([acts, packed[offset:offset + len(rows)].numpy().astype(acts.dtype)], axis=1)
            if need_norm:
                moments.update(acts[train[offset:offset + len(rows)]])
            if need_load:
                parts.append(acts)
            offset += len(rows)
        if offset != len(self._rows):
            raise LitSahsError(f"activation store {self.store_path} changed while it was being read: restart the run")
        if need_norm:
            self.normalisation = moments.result()
        if need_load:
            self._x = torch.from_numpy(np.concatenate(parts))

    # ------------------------------------------------------------ loaders
    def _dataset(self, name: str, shuffle: bool):
        positions = self.splits[name]
        if self.in_memory:
            if self._x is None:
                self.setup("validate")  # loads rows only
            return MemorySplit(self._x, positions, self._labels, self._family)
        return StreamSplit(self.store, self.head_set, positions, self._labels, self._family, self.batch_size,
                           shuffle, self.seed, self.num_workers)

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        ds = self._dataset(name, shuffle)
        common = {"num_workers": self.num_workers, "persistent_workers": False,
                  "pin_memory": torch.cuda.is_available()}
        if isinstance(ds, StreamSplit):
            gen = torch.Generator().manual_seed(self.seed) if shuffle else None
            return DataLoader(ds, batch_size=None, generator=gen, **common)
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, generator=gen, collate_fn=_identity,
                          **common)


# ---------------------------------------------------------------- live DataModule

class _LiveSplit(IterableDataset):
    """One split of Samples; each batch runs the target (in the loading process, num_workers=0)."""

    def __init__(self, dm: "LiveActivationDataModule", name: str, shuffle: bool):
        self.dm, self.name, self.shuffle = dm, name, shuffle
        self.positions = dm.splits[name]
        self._epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.positions) / self.dm.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = np.arange(len(self.positions))
        if self.shuffle:
            order = np.random.default_rng([self.dm.seed, self._epoch]).permutation(len(order))
            self._epoch += 1
        try:
            for start in range(0, len(order), self.dm.batch_size):
                local = order[start:start + self.dm.batch_size]
                yield self.dm._batch(self.positions[local], local)
        finally:
            self.dm.flush()


class LiveActivationDataModule(_SplitDataModule):
    """Runs the target on labelled prompts on the fly and serves the same batches as
    CachedActivationDataModule, without a store (or writing one through, see ``write_through``).

    ``target`` is a target name / path (loaded on ``device``: cuda when available, else cpu) or an
    already loaded ``Target``. Prompts come from ``harmful``/``benign`` sources and ``attacks`` via
    build_dataset, or from a user JSONL/CSV ``data`` file (attacks applied to it, first ``limit``).
    ``features`` ('resid,refusal', ``resid`` = the layers extraction records by default) are captured
    from the same forward and served after the heads, as the cached DataModule serves stored ones.
    """

    def __init__(
        self,
        target: str = "smollm2-135m-instruct",  # or a loaded lit_sahs.targets.Target
        harmful: Union[str, list[str]] = ",".join(DEFAULT_HARMFUL),
        benign: Union[str, list[str]] = ",".join(DEFAULT_BENIGN),
        attacks: Union[str, list[str]] = "plain",
        data: Optional[str] = None,
        limit: Optional[int] = 400,
        max_chars: Optional[int] = None,
        heads: Optional[str] = None,
        ranking: Optional[str] = None,
        top_k: int = 8,
        all_heads: bool = False,
        held_out: Holdout = Holdout(),  # attack families and/or sources kept out of training (the test split)
        train_families: list[str] = [],  # noqa: B006 - only these families in train/val (zero-shot matrix)
        val_sources: list[str] = [],  # noqa: B006 - validate on these sources only, never trained on
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 8,
        write_through: Optional[str] = None,
        block_rows: int = 256,
        dtype: str = "float32",
        device: Optional[str] = None,
        seed: int = 0,
        features: Union[str, list[str], None] = None,
    ):
        super().__init__()
        from lit_sahs.targets import Target, load_target

        if isinstance(target, Target):
            self.target = target
        else:
            self.target = load_target(str(target), dtype=dtype, device=resolve_device(device))
        self.fingerprint: TargetFingerprint = self.target.fingerprint
        self.geometry: Geometry = self.target.geometry
        self.head_set: HeadSet = resolve_heads(self.fingerprint, heads, ranking, top_k, all_heads)
        # extra features after the heads, from the same forward (lit_sahs.data.extra_features)
        self.feature_spec: FeatureSpec = FeatureSpec.for_target(self.target, features, heads=self.head_set)
        if self.feature_spec and write_through:
            raise LitSahsError("--data.features with --data.write_through: the write-through store records heads "
                               "only; extract a store (`python -m lit_sahs extract`) to keep the extra features")
        self.block_rows = int(block_rows)
        if batch_size < 1:  # before running anything
            raise LitSahsError(f"batch_size must be >= 1, got {batch_size}")

        samples = SampleSpec(harmful=",".join(names(harmful)), benign=",".join(names(benign)),
                             attacks=",".join(names(attacks)), data=data, limit=limit, max_chars=max_chars,
                             seed=seed).build()
        if not samples:
            raise LitSahsError("no samples: check --data.data / sources, attacks and --data.limit")
        from lit_sahs.targets import prompting

        # every prompt must fit the target's context before the first batch runs (the one policy)
        prompting.fit_context(self.target, [s.text for s in samples], [s.image for s in samples],
                              [s.id for s in samples])
        self.samples = samples
        self._init_rows([s.index_row() for s in samples], held_out, train_families,
                        val_fraction, test_fraction, batch_size, seed, val_sources)

        self.write_through = write_through
        self.store: Optional[ActivationStore] = None
        self._written: set[str] = set()
        self._buf_rows: list[dict] = []
        self._buf_acts: list[torch.Tensor] = []
        if write_through:
            from lit_sahs.extract import prompt_format
            from lit_sahs.targets import prompting

            self.store = ActivationStore.create_or_open(write_through, self.fingerprint, prompting.POSITION_RULE,
                                                        prompt_format(self.target))
            self._written = self.store.written_ids()

    # ------------------------------------------------------------ running the target
    @torch.no_grad()
    def capture(self, positions: Sequence[int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Selected heads [B, k, D] (float32, cpu), then any extra features' slots, for the samples at
        `positions`, and all heads [B, L, H, D] when writing through (else None). Only the needed
        layers are hooked."""
        from lit_sahs.hooks import HeadCapture, capture_forward
        from lit_sahs.targets import prompting

        batch = [self.samples[int(i)] for i in positions]
        enc = prompting.encode(self.target, [s.text for s in batch], [s.image for s in batch],
                               [s.id for s in batch])
        device = self.target.device
        enc = {k: v.to(device) if torch.is_tensor(v) else v for k, v in enc.items()}
        if self.feature_spec:  # heads and features from one forward, as the guard and screen take them
            return capture_forward(self.target, enc, self.head_set, features=self.feature_spec,
                                   texts=[s.text for s in batch]).float().cpu(), None
        full = self.store is not None
        with HeadCapture(self.target.model, heads=None if full else self.head_set, geometry=self.geometry) as cap:
            self.target.model(**enc, logits_to_keep=1, use_cache=False)
        x = cap.selected(self.head_set).float().cpu()
        return x, (cap.activations().to(torch.float16).cpu() if full else None)

    def _batch(self, positions: np.ndarray, local: np.ndarray) -> dict[str, torch.Tensor]:
        x, full = self.capture(positions)
        if full is not None:
            self._write(positions, full)
        return {"x": x, "y": torch.from_numpy(self._labels[positions]),
                "family": torch.from_numpy(self._family[positions]),
                "row": torch.as_tensor(local, dtype=torch.long)}

    def _write(self, positions: np.ndarray, full: torch.Tensor) -> None:
        keep = [j for j, i in enumerate(positions) if self._rows[int(i)]["id"] not in self._written]
        for j in keep:
            self._written.add(self._rows[int(positions[j])]["id"])
        if keep:
            self._buf_rows += [self._rows[int(positions[j])] for j in keep]
            self._buf_acts.append(full[keep])
        if len(self._buf_rows) >= self.block_rows:
            self.flush()

    def flush(self) -> None:
        """Commit buffered write-through rows to the store (called at the end of every pass)."""
        if self.store is None or not self._buf_rows:
            return
        rows, acts = self._buf_rows, torch.cat(self._buf_acts)
        self._buf_rows, self._buf_acts = [], []
        self.store.write_block(rows, acts)

    # ------------------------------------------------------------ setup / loaders
    def setup(self, stage: Optional[str] = None) -> None:
        if self.normalisation is not None or stage not in (None, "fit"):
            return
        d = self.geometry.head_dim
        moments = RunningMoments((len(self.head_set) + self.feature_spec.num_slots(d), d))
        train = self.splits["train"]
        try:
            for start in range(0, len(train), self.batch_size):
                pos = train[start:start + self.batch_size]
                x, full = self.capture(pos)
                moments.update(x)
                if full is not None:
                    self._write(pos, full)
        finally:
            self.flush()
        self.normalisation = moments.result()

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        # the target runs in the loading process: workers would each need a copy of it
        return DataLoader(_LiveSplit(self, name, shuffle), batch_size=None, num_workers=0)
