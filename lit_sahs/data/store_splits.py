"""The datasets behind CachedActivationDataModule's loaders: one split of an ActivationStore's
rows, either held in RAM (``MemorySplit``) or streamed from disk block by block (``StreamSplit``).

Both serve the same rows, values and batch dicts (see ``datamodules``); streaming exists so a
store larger than memory can still train a detector. It reads whole blocks (or subsets of one)
because that touches each block's chunks once.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet


class MemorySplit(Dataset):
    """One split of activations held in RAM (fp16, exactly the stored values); batches are gathered
    in one indexing op via ``__getitems__``."""

    def __init__(self, x: torch.Tensor, positions: np.ndarray, labels: np.ndarray, family: np.ndarray):
        self.x = x  # [N_all, k, D] float16, all rows of the store
        self.positions = torch.as_tensor(positions, dtype=torch.long)
        self.labels = torch.as_tensor(labels[positions], dtype=torch.float32)
        self.family = torch.as_tensor(family[positions], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitems__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx, dtype=torch.long)
        return {"x": self.x[self.positions[i]].float(), "y": self.labels[i], "family": self.family[i], "row": i}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.__getitems__([i])
        return {k: v[0] for k, v in b.items()}


def _block_ranges(store: ActivationStore) -> list[tuple[int, int]]:
    """[start, stop) row positions of each committed block in the store's reading order. Reading whole
    blocks (or subsets of one) touches each block's chunks once."""
    blocks = getattr(store, "_blocks", None)
    if blocks is None:  # pragma: no cover - a store without block bookkeeping: fixed-size ranges
        n = len(store)
        return [(s, min(s + 4096, n)) for s in range(0, n, 4096)]
    return [(b.offset, b.offset + len(b.keep)) for b in blocks if len(b.keep)]


class StreamSplit(IterableDataset):
    """One split streamed from the store block by block: a worker (of ``num_workers``) reads every
    ``num_workers``-th block that holds rows of this split, keeps only the split's rows, shuffles them
    within its block buffer (train), and yields ready batches, so memory is one block + one batch."""

    def __init__(self, store: ActivationStore, head_set: HeadSet, positions: np.ndarray, labels: np.ndarray,
                 family: np.ndarray, batch_size: int, shuffle: bool, seed: int, num_workers: int):
        self._store: Optional[ActivationStore] = store
        self.store_path = str(store.path)
        self.expected_ids = store.ids()  # a worker re-opens the store and checks it still reads the same
        self.head_set = head_set
        self.positions = np.asarray(positions, dtype=np.int64)  # sorted, global row positions
        self.labels = torch.as_tensor(labels[self.positions], dtype=torch.float32)
        self.family = torch.as_tensor(family[self.positions], dtype=torch.long)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_workers = max(1, int(num_workers))
        self._epoch = 0
        # per block: the split-local indices (into self.positions) it holds; blocks without any skipped
        self.blocks: list[np.ndarray] = []
        for start, stop in _block_ranges(store):
            lo, hi = np.searchsorted(self.positions, [start, stop])
            if hi > lo:
                self.blocks.append(np.arange(lo, hi, dtype=np.int64))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # workers open their own handle
        return state

    def _open(self) -> ActivationStore:
        if self._store is None:
            store = ActivationStore.open(self.store_path)
            if store.ids()[: len(self.expected_ids)] != self.expected_ids:
                raise LitSahsError(f"activation store {self.store_path} changed while it was being read "
                                   "(blocks were added or removed): restart the run")
            self._store = store
        return self._store

    def _worker_blocks(self, worker: int, workers: int) -> list[np.ndarray]:
        return self.blocks[worker::workers]

    def __len__(self) -> int:
        return sum(math.ceil(sum(len(b) for b in self._worker_blocks(w, self.num_workers)) / self.batch_size)
                   for w in range(self.num_workers))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        blocks = self._worker_blocks(worker, workers)
        rng = None
        if self.shuffle:
            # in a worker, info.seed is drawn per epoch from the loader's generator; in-process we count epochs
            rng = np.random.default_rng([info.seed] if info is not None else [self.seed, self._epoch])
            self._epoch += 1
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        store = self._open()
        buf_x: list[np.ndarray] = []
        buf_i: list[np.ndarray] = []
        held = 0
        for local in blocks:
            if rng is not None:
                local = local[rng.permutation(len(local))]
            buf_x.append(store.read(self.head_set, rows=self.positions[local]))
            buf_i.append(local)
            held += len(local)
            while held >= self.batch_size:
                x, i = np.concatenate(buf_x), np.concatenate(buf_i)
                yield self._batch(x[: self.batch_size], i[: self.batch_size])
                buf_x, buf_i = [x[self.batch_size:]], [i[self.batch_size:]]
                held -= self.batch_size
        if held:
            yield self._batch(np.concatenate(buf_x), np.concatenate(buf_i))

    def _batch(self, x: np.ndarray, local: np.ndarray) -> dict[str, torch.Tensor]:
        i = torch.from_numpy(local)
        return {"x": torch.from_numpy(np.ascontiguousarray(x)).float(), "y": self.labels[i],
                "family": self.family[i], "row": i}
