"""Extraction as a Lightning predict loop: the target runs under HeadCapture in predict_step and
a prediction-writer callback commits blocks to the ActivationStore.

Scaling out is Lightning's job: `--trainer.devices 8 --trainer.num_nodes 2` runs DDP, each rank
predicts its share (Lightning's predict sampler does not pad, so no rank repeats a sample) and
writes its own blocks; the store keeps the first copy of any id, so a re-run or a race never
duplicates rows.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from lit_sahs.capture import HeadCapture, ResidualCapture
from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.engine import Engine
from lit_sahs.errors import LitSahsError
from lit_sahs.targets import Target, load_target, prompting

log = logging.getLogger(__name__)


class SampleDataset(Dataset):
    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


class EncodeBatch:
    """Collate function: a batch of Samples and their encoding by ``prompting.encode`` (the one
    code path for extraction, live DataModules and guarding). Running in the DataLoader lets
    ``num_workers`` processes tokenise and preprocess images while the target runs the previous
    batch: on a GPU the CPU-side processor otherwise stalls the forward."""

    def __init__(self, target: Target):
        self.encoder = prompting.Encoder.of(target)  # tokenizer and processor, not the weights

    def __call__(self, batch: list[Sample]) -> dict[str, Any]:
        return {"samples": batch, "enc": self.encoder([s.text for s in batch], [s.image for s in batch],
                                                      [s.id for s in batch])}


def prompt_format(target: Target) -> dict:
    """What, besides the weights, decides the activations: the chat template and padding side."""
    owner = target.processor if target.processor is not None else target.tokenizer
    template = getattr(owner, "chat_template", None) or ""
    return {"chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(), "padding": "left",
            "messages": "single user turn, no system message, generation prompt added"}


class HeadExtractor(L.LightningModule):
    """Runs the target on a batch of Samples and returns their index rows and head activations
    [batch, layers, heads, head_dim] at the first-token position."""

    # extraction runs where the hardware is, with a progress bar (the engine's base is a quiet CPU fit)
    trainer_defaults = {"accelerator": "auto", "devices": "auto", "enable_progress_bar": True}

    def __init__(self, target: str | Target = "smollm2-135m-instruct", dtype: str = "float32",
                 baselines: bool = True):
        super().__init__()
        self.baselines = baselines
        self.target = target if isinstance(target, Target) else load_target(target, dtype=dtype)
        self.target_model = self.target.model  # registered as a submodule so Lightning places it on the device

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the collate function encoded it; predict_step moves the tensors

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        samples = batch["samples"]
        enc = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch["enc"].items()}
        with HeadCapture(self.target_model, geometry=self.target.geometry) as cap, \
                ResidualCapture(self.target_model) if self.baselines else contextlib.nullcontext() as res:
            # logits_to_keep=1: only the last position's logits; the full [batch, seq, vocab] is the
            # largest tensor of a forward (Qwen's vocabulary is 152k)
            self.target_model(**enc, logits_to_keep=1, use_cache=False)
        out = {"rows": [s.index_row() for s in samples], "activations": cap.activations().to(torch.float16).cpu()}
        if self.baselines:  # what the residual-stream probe and the perplexity filter read
            nll = res.prompt_nll(enc["input_ids"], enc["attention_mask"], prompting.image_token_ids(self.target))
            out["extras"] = {"residual": res.residual.to(torch.float16).cpu(), "prompt_nll": nll.float().cpu()}
        return out


class StoreWriter(BasePredictionWriter):
    """Buffers predictions and commits them to the store in blocks of `block_rows` rows; memory is
    bounded by the block size, not the dataset size."""

    def __init__(self, store_path: str | Path, block_rows: int = 256):
        super().__init__(write_interval="batch")
        self.store_path = Path(store_path)
        self.block_rows = block_rows
        self.store: Optional[ActivationStore] = None
        self._rows: list[dict] = []
        self._acts: list[torch.Tensor] = []
        self._extras: dict[str, list[torch.Tensor]] = {}
        self.rows_written = 0

    def setup(self, trainer, pl_module, stage=None) -> None:
        target = pl_module.target
        self.store = ActivationStore.create_or_open(self.store_path, target.fingerprint,
                                                    prompting.POSITION_RULE, prompt_format(target))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self._rows.extend(prediction["rows"])
        self._acts.append(prediction["activations"])
        for k, v in prediction.get("extras", {}).items():
            self._extras.setdefault(k, []).append(v)
        if len(self._rows) >= self.block_rows:
            self.flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.flush(trainer.global_rank)

    def flush(self, rank: int = 0) -> None:
        if not self._rows:
            return
        acts = torch.cat(self._acts)
        extras = {k: torch.cat(v) for k, v in self._extras.items()}
        if self.store.write_block(self._rows, acts, rank=rank, extras=extras):
            self.rows_written += len(self._rows)
        self._rows, self._acts, self._extras = [], [], {}


def pending_samples(samples: Sequence[Sample], store_path: str | Path, target: Target) -> list[Sample]:
    """Samples not yet in the store (all of them when the store does not exist yet), each id once:
    two samples with one id are the same input (e.g. two requests that a visual attack renders
    into the same image under the same text), so the first is kept."""
    seen: set[str] = set()
    unique = []
    for s in samples:
        if s.id not in seen:
            seen.add(s.id)
            unique.append(s)
    if not (Path(store_path) / "manifest.json").exists():
        return unique
    store = ActivationStore.create_or_open(store_path, target.fingerprint, prompting.POSITION_RULE,
                                           prompt_format(target))
    done = store.written_ids()
    return [s for s in unique if s.id not in done]


def run_extraction(target: str | Target, samples: Sequence[Sample], store_path: str | Path,
                   batch_size: int = 8, block_rows: int = 256, dtype: str = "float32",
                   trainer_kwargs: Optional[dict] = None, num_workers: Optional[int] = None) -> dict:
    """Extract head activations for `samples` into the store at `store_path`, skipping samples
    already there. Returns {'written': n, 'skipped': n, 'total': rows in store}.
    `num_workers` None: 4 encoding processes when the run uses a GPU, 0 on the CPU."""
    if not samples:
        raise LitSahsError("no samples to extract: check the sources, attacks and --limit")
    if num_workers is not None and num_workers < 0:  # before loading the target
        raise LitSahsError(f"num_workers must be >= 0, got {num_workers}")
    module = HeadExtractor(target, dtype=dtype)
    if not module.target.is_vision_language:  # fail before the store is created, not mid-run
        bad = next((s for s in samples if s.image), None)
        if bad is not None:
            raise LitSahsError(f"sample {bad.id} (attack {bad.attack}) has an image but target "
                               f"{module.target.name!r} is text-only: use a vision-language target "
                               "(e.g. tiny-llava) or drop the image attacks and image rows")
    todo = pending_samples(samples, store_path, module.target)
    skipped = len(samples) - len(todo)
    if not todo:
        store = ActivationStore.open(store_path)
        return {"written": 0, "skipped": skipped, "total": len(store)}
    # similar lengths in a batch waste less compute on padding; ids, not order, identify rows
    todo.sort(key=lambda s: (len(s.text), s.id))
    writer = StoreWriter(store_path, block_rows=block_rows)
    trainer = Engine().trainer(module, callbacks=[writer], **(trainer_kwargs or {}))
    if num_workers is None:
        num_workers = 4 if trainer.strategy.root_device.type == "cuda" else 0
    loader = DataLoader(SampleDataset(todo), batch_size=batch_size, shuffle=False,
                        collate_fn=EncodeBatch(module.target), num_workers=num_workers,
                        pin_memory=torch.cuda.is_available() and num_workers > 0)
    trainer.predict(module, loader, return_predictions=False)
    store = ActivationStore.open(store_path)
    return {"written": writer.rows_written, "skipped": skipped, "total": len(store)}
