"""Extraction as a Lightning predict loop: the target runs under HeadCapture in predict_step and
a prediction-writer callback commits blocks to the ActivationStore.

Scaling out is Lightning's job: `--trainer.devices 8 --trainer.num_nodes 2` runs DDP, each rank
predicts its share (Lightning's predict sampler does not pad, so no rank repeats a sample) and
writes its own blocks; the store keeps the first copy of any id, so a re-run or a race never
duplicates rows. A target larger than one device is placed by a device map instead
(`--device_map auto`, accelerate): one process drives all its devices.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from lit_sahs.checks import at_least
from lit_sahs.choices import truncate_side
from lit_sahs.data.extra_features import (JUDGE_EXTRA, TOKEN_HEADS_EXTRA, TOKEN_LENGTH, TOKEN_MASK_EXTRA, TOKENS_EXTRA,
                                          check_pools, check_store_judge, check_store_pooling, default_residual_layers,
                                          pool_extra)
from lit_sahs.data.samples import Sample
from lit_sahs.data.store import ActivationStore
from lit_sahs.data.writer import BlockWriter
from lit_sahs.engine import Engine
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import HeadCapture, LayerResidualCapture, ResidualCapture
from lit_sahs.prompt_hooks import PooledHeadCapture, TokenHeadCapture
from lit_sahs.outputs import check_outputs
from lit_sahs.refusal import refusal_probability, refusal_token_ids
from lit_sahs.self_judge import judge_logodds, judge_token_ids
from lit_sahs.targets import Target, load_target, prompting
from lit_sahs.targets.registry import DeviceMap

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

    def __init__(self, target: Target, user_mask: bool = False):
        self.encoder = prompting.Encoder.of(target)  # tokenizer and processor, not the weights
        self.with_user_mask = user_mask  # the prompt's own tokens, for pooled features

    def __call__(self, batch: list[Sample]) -> dict[str, Any]:
        texts = [s.text for s in batch]
        out = {"samples": batch, "enc": self.encoder(texts, [s.image for s in batch], [s.id for s in batch])}
        if self.with_user_mask:
            out["user_mask"] = self.encoder.mask_of(out["enc"])
        return out


def prompt_format(target: Target) -> dict:
    """What, besides the weights, decides the activations: the chat template and padding side."""
    owner = target.processor if target.processor is not None else target.tokenizer
    template = getattr(owner, "chat_template", None) or ""
    return {"chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(), "padding": "left",
            "messages": "single user turn, no system message, generation prompt added"}


class HeadExtractor(L.LightningModule):
    """Runs the target on a batch of Samples and returns their index rows and head activations
    [batch, layers, heads, head_dim] at the first-token position.

    The target is deliberately *not* a submodule: Lightning moves a LightningModule's parameters
    to the device when a run starts and back to the CPU when it ends (``strategy.teardown`` ->
    ``module.cpu()``), which for a 7B target cost 46% of an extraction on a GPU and left it on the
    CPU. Here ``on_predict_start`` moves the target to the run's device only if it is elsewhere,
    nothing moves it back, and a target placed by a device map (several devices, offloaded
    layers) is never moved: inputs go to its input device."""

    # extraction runs where the hardware is, with a progress bar (the engine's base is a quiet CPU fit)
    trainer_defaults = {"accelerator": "auto", "devices": "auto", "enable_progress_bar": True}

    def __init__(self, target: str | Target = "smollm2-135m-instruct", dtype: str = "float32",
                 baselines: bool = True, device_map: Optional[DeviceMap] = None,
                 offload_folder: Optional[str] = None, residual_layers: Optional[Sequence[int]] = None,
                 pool: Sequence[str] = (), token_heads: Optional[HeadSet] = None, token_length: int = TOKEN_LENGTH,
                 judge: bool = False):
        super().__init__()
        self.baselines = baselines
        self.pool = check_pools(pool)  # also record every head pooled over the prompt's tokens
        self.token_heads = HeadSet(token_heads) if token_heads else None  # ... and these heads at each token
        at_least({"token_length": token_length}, 1)
        self.token_length = int(token_length)
        self.judge = bool(judge)  # also run the judge prefill (lit_sahs.self_judge): a second forward
        self._judge_ids: Optional[tuple[list[int], list[int]]] = None
        self._residual_layers = tuple(residual_layers) if residual_layers is not None else None
        self._refusal_ids: Optional[torch.Tensor] = None
        if isinstance(target, Target):
            if device_map is not None or offload_folder is not None:
                raise LitSahsError("device_map and offload_folder apply when extraction loads the target by name: "
                                   "pass load_target(..., device_map=...) instead of a loaded target")
            self.target = target
        else:
            self.target = load_target(target, dtype=dtype, device_map=device_map, offload_folder=offload_folder)
        if self.token_heads is not None:
            self.token_heads.validate(self.target.geometry)

    def on_predict_start(self) -> None:
        # the strategy has placed this (parameter-free) module: self.device is this rank's device
        if not self.target.dispatched and self.target.device != self.device:
            self.target.model.to(self.device)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # the collate function encoded it; predict_step moves the tensors

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        samples = batch["samples"]
        model, device = self.target.model, self.target.device
        enc = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch["enc"].items()}
        pooled = PooledHeadCapture(model, batch["user_mask"], self.pool, self.target.geometry) if self.pool \
            else contextlib.nullcontext()
        tokens = TokenHeadCapture(model, self.token_heads, self.token_length, batch["user_mask"],
                                  self.target.geometry) if self.token_heads else contextlib.nullcontext()
        with HeadCapture(model, geometry=self.target.geometry) as cap, pooled, tokens, \
                ResidualCapture(model) if self.baselines else contextlib.nullcontext() as res, \
                LayerResidualCapture(model, self.residual_layers) if self.baselines else contextlib.nullcontext() as lres:
            # logits_to_keep=1: only the last position's logits; the full [batch, seq, vocab] is the
            # largest tensor of a forward (Qwen's vocabulary is 152k)
            logits = model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1]
        out = {"rows": [s.index_row() for s in samples], "activations": cap.activations().to(torch.float16).cpu()}
        if self.baselines:  # the baselines' and the extra features' inputs (lit_sahs.data.extra_features)
            nll = res.prompt_nll(enc["input_ids"], enc["attention_mask"], prompting.image_token_ids(self.target))
            layers = torch.tensor(self.residual_layers, dtype=torch.int16).expand(len(samples), -1)
            out["extras"] = {"residual": res.residual.to(torch.float16).cpu(), "prompt_nll": nll.float().cpu(),
                             "residual_layers": lres.residuals().to(torch.float16).cpu(),
                             "residual_layer_ids": layers.clone(),
                             "refusal_prob": refusal_probability(logits, self.refusal_ids).float().cpu()}
        if self.pool:
            out.setdefault("extras", {}).update({pool_extra(p): v.to(torch.float16) for p, v in pooled.pooled().items()})
        if self.token_heads:
            values, valid = tokens.tokens()
            ids = torch.tensor(self.token_heads.to_list(), dtype=torch.int16).expand(len(samples), -1, -1)
            out.setdefault("extras", {}).update({TOKENS_EXTRA: values.to(torch.float16), TOKEN_MASK_EXTRA:
                                                 valid.to(torch.uint8), TOKEN_HEADS_EXTRA: ids.clone()})
        if self.judge:  # after the capture: its own forward must not fire the capture's hooks
            if self._judge_ids is None:
                self._judge_ids = judge_token_ids(self.target.tokenizer)
            out.setdefault("extras", {})[JUDGE_EXTRA] = judge_logodds(self.target, [s.text for s in samples],
                                                                      self._judge_ids)
        return out

    @property
    def residual_layers(self) -> tuple[int, ...]:
        """Decoder layers whose first-token residual extraction records (default: 4 evenly spaced, incl. the last)."""
        if self._residual_layers is None:
            self._residual_layers = default_residual_layers(self.target.geometry.num_layers)
        return self._residual_layers

    @property
    def refusal_ids(self) -> list[int]:
        """The refusal-opening token ids (lit_sahs.refusal, the one definition), computed once."""
        if self._refusal_ids is None:
            self._refusal_ids = refusal_token_ids(self.target.tokenizer)
        return self._refusal_ids


class StoreWriter(BasePredictionWriter):
    """Buffers predictions and commits them to the store in blocks of `block_rows` rows; memory is
    bounded by the block size (times the writer's queue), not the dataset size.

    With `background` (the default) a full block is handed to a ``BlockWriter`` thread
    (``lit_sahs.data.writer``): concatenation, float16 conversion, zarr/zstd encoding, checksums and
    the atomic commit run beside the next forwards; a writer error ends the run as a LitSahsError
    in the main thread at the next batch, and what is committed is whole blocks only."""

    def __init__(self, store_path: str | Path, block_rows: int = 256, background: bool = True,
                 max_pending: int = 2):
        super().__init__(write_interval="batch")
        self.store_path = Path(store_path)
        self.block_rows = block_rows
        self.background = background
        self.max_pending = max_pending
        self.store: Optional[ActivationStore] = None
        self._writer: Optional[BlockWriter] = None
        self._rows: list[dict] = []
        self._acts: list[torch.Tensor] = []
        self._extras: dict[str, list[torch.Tensor]] = {}
        self._written = 0
        self.tag = uuid.uuid4().hex[:6]  # every block of this run, on every rank (see setup), carries it

    @property
    def rows_written(self) -> int:
        return self._written + (self._writer.rows_written if self._writer is not None else 0)

    def setup(self, trainer, pl_module, stage=None) -> None:
        self.tag = trainer.strategy.broadcast(self.tag)  # processes started by torchrun drew their own
        target = pl_module.target
        self.store = ActivationStore.create_or_open(self.store_path, target.fingerprint,
                                                    prompting.POSITION_RULE, prompt_format(target))

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.background and self._writer is None:
            self._writer = BlockWriter(self.store, max_pending=self.max_pending, tag=self.tag)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if self._writer is not None:
            self._writer.check()  # a failed block ends the run at the next batch, in this thread
        self._rows.extend(prediction["rows"])
        self._acts.append(prediction["activations"])
        for k, v in prediction.get("extras", {}).items():
            self._extras.setdefault(k, []).append(v)
        if len(self._rows) >= self.block_rows:
            self.flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.flush(trainer.global_rank)
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()  # every block committed (or the writer's error raised) before predict returns
            self._written += writer.rows_written

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abort()  # commits the whole blocks already queued, then stops; never raises over `exception`
            self._written += writer.rows_written

    def flush(self, rank: int = 0) -> None:
        if not self._rows:
            return
        rows, acts, extras = self._rows, self._acts, self._extras
        self._rows, self._acts, self._extras = [], [], {}
        if self._writer is not None:
            self._writer.submit(rows, acts, rank=rank, extras=extras)
            return
        if self.store.write_block(rows, torch.cat(acts), rank=rank, extras={k: torch.cat(v) for k, v in extras.items()},
                                  tag=self.tag):
            self._written += len(rows)


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
                   trainer_kwargs: Optional[dict] = None, num_workers: Optional[int] = None,
                   device_map: Optional[DeviceMap] = None, offload_folder: Optional[str] = None,
                   truncate: Optional[str] = None, residual_layers: Optional[Sequence[int]] = None,
                   pool: Sequence[str] = (), token_heads: Optional[HeadSet] = None,
                   token_length: int = TOKEN_LENGTH, token_heads_for=None, judge: bool = False) -> dict:
    """Extract head activations for `samples` into the store at `store_path`, skipping samples
    already there. Returns {'written': n, 'skipped': n, 'total': rows in store}.
    `num_workers` None: 4 encoding processes when the run uses a GPU, 0 on the CPU.
    `device_map` / `offload_folder`: load the target (a name) over several devices or with offloaded
    layers (see `load_target`); such a run is one process driving all of them.
    Under DDP (``trainer_kwargs={"strategy": "ddp", "devices": n}``) every rank extracts its share
    and commits its own blocks; 'written' counts the rows of all ranks.
    A prompt longer than the target's context is refused before the store is created, naming it,
    or its text is cut to fit with `truncate` left / right (``prompting.fit_context``).
    `pool` ('mean', 'max'): also record every head's output pooled over the prompt's own tokens
    (extras ``pool_mean`` / ``pool_max``, [n, layers, heads, head_dim] float16 each); a store keeps
    one choice for all its rows (a run with nothing to add reuses the store whatever it asks).
    `token_heads` (a HeadSet): also record those heads' outputs at each of the prompt's last
    `token_length` own tokens (extras ``tokens`` [n, T, k, head_dim] float16, ``token_mask`` [n, T],
    ``token_head_ids`` [n, k, 2]; what the attention-pooling family reads): k x T x head_dim x 2
    bytes per prompt, one choice per store as for `pool`; `token_heads_for`: the fingerprint of the
    ranking they came from (checked against the target).
    `judge`: also record the target's own verdict on each prompt (extra ``judge_logodds``,
    ``lit_sahs.self_judge``): a second prefill per prompt, about doubling the extraction's time; a
    store keeps one choice for all its rows too."""
    truncate_side(truncate)  # before loading the target
    at_least({"batch_size": batch_size, "block_rows": block_rows}, 1)
    check_outputs(dirs={"--store": store_path})
    if not samples:
        raise LitSahsError("no samples to extract: check the sources, attacks and --limit")
    if num_workers is not None and num_workers < 0:  # before loading the target
        raise LitSahsError(f"num_workers must be >= 0, got {num_workers}")
    pool = check_pools(pool)  # before the target loads
    module = HeadExtractor(target, dtype=dtype, device_map=device_map, offload_folder=offload_folder,
                           residual_layers=residual_layers, pool=pool, token_heads=token_heads,
                           token_length=token_length, judge=judge)
    if token_heads_for is not None:
        token_heads_for.check(module.target.fingerprint, "the --token_ranking")
    if (pool or module.token_heads) and module.target.is_vision_language:
        raise LitSahsError(f"pooled and per-token heads are recorded for text-only targets; {module.target.name} "
                           "is a vision-language target")
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
    check_store_pooling(store_path, pool, module.token_heads, module.token_length)  # only rows to add must match
    check_store_judge(store_path, judge)
    texts = prompting.fit_context(module.target, [s.text for s in todo], [s.image for s in todo],
                                  [s.id for s in todo], truncate=truncate)  # before the store is created
    todo = [s if t == s.text else s.with_(text=t) for s, t in zip(todo, texts)]
    # similar lengths in a batch waste less compute on padding; ids, not order, identify rows
    todo.sort(key=lambda s: (len(s.text), s.id))
    writer = StoreWriter(store_path, block_rows=block_rows)
    trainer = _extraction_trainer(module, writer, trainer_kwargs)
    if num_workers is None:
        num_workers = 4 if trainer.strategy.root_device.type == "cuda" else 0
    loader = DataLoader(SampleDataset(todo), batch_size=batch_size, shuffle=False,
                        collate_fn=EncodeBatch(module.target, user_mask=bool(pool) or bool(module.token_heads)), num_workers=num_workers,
                        pin_memory=torch.cuda.is_available() and num_workers > 0)
    trainer.predict(module, loader, return_predictions=False)
    trainer.strategy.barrier("extraction written")  # DDP: every rank has committed its blocks
    store = ActivationStore.open(store_path)
    # counted in the store, in the blocks tagged by this run: a rank's (or spawned process's) writer
    # sees only its own rows, and another run writing to the same store adds rows that are not ours
    return {"written": store.rows_tagged(writer.tag), "skipped": skipped, "total": len(store)}


def _extraction_trainer(module: HeadExtractor, writer: StoreWriter, trainer_kwargs: Optional[dict]) -> L.Trainer:
    """The engine's Trainer for extraction. A target placed by a device map is driven by one
    process (devices 'auto' becomes 1); DDP would run a whole copy of it per rank."""
    kw = dict(trainer_kwargs or {})
    dispatched = module.target.dispatched
    if dispatched and kw.get("devices", "auto") == "auto":
        kw["devices"] = 1
    callbacks = list(kw.pop("callbacks", None) or []) + [writer]
    trainer = Engine().trainer(module, callbacks=callbacks, **kw)
    if dispatched and trainer.world_size > 1:
        raise LitSahsError(f"target {module.target.name!r} is placed by a device map (one process drives all its "
                           f"devices), but the Trainer asks for {trainer.world_size} processes: use "
                           "--trainer.devices 1 --trainer.num_nodes 1, or drop --device_map to run DDP")
    return trainer
