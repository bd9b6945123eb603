"""SafeVLM: the second method's LightningModule, one class with a ``stage`` argument.

* **Stage I** trains only the safety modules (both sets of safety tokens, the safety projector,
  the vision abstractor of a vision-language target, the safety head); the target is frozen.
  The vision abstractor reads each prompt's input to the target's own vision projector
  (``forward.SafetyForward``; LLaVA-NeXT's crops do not map back to prompts and are refused).
* **Stage II** starts from a stage-I artifact (``init_from``), freezes the safety modules and
  trains LoRA adapters (peft) on the language model's linear layers at or above
  ``feature_layer`` (vision tower, projectors and LM head excluded): the frozen head's features stay.

Loss: the language model's cross-entropy on the answer tokens + ``loss_weight`` x (risk-level CE
+ risk-type CE). The detector score is the head's risk probability, 1 - P(level = safe); like
every detector here, its ``threshold`` is recalibrated on the validation benign prompts each
validation epoch of a fit (``target_fpr`` of them flagged, every validation source weighing the same:
with ``val_sources`` these are sources never trained on), so the same AUROC / TPR@1%FPR / benign-FPR
tables compare SafeVLM with the safety-head detectors.

The target is *not* a submodule: checkpoints and artifacts hold only what SafeVLM adds (safety
modules and, after stage II, the LoRA tensors); ``attach(target)`` checks a target and puts them in.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lit_sahs
from lit_sahs.artifact_format import init_args
from lit_sahs.errors import LitSahsError
from lit_sahs.family import ModelFamily, register_family
from lit_sahs.heads import HeadSet, TargetFingerprint
from lit_sahs.safevlm.artifact import LORA_PREFIX, SAFETY_PREFIX, load_stage_one, rebuild
from lit_sahs.safevlm.forward import IGNORE_INDEX, SafetyForward, answer_logits, model_inputs, with_slots
from lit_sahs.safevlm.joined import load_head_detector
from lit_sahs.safevlm.lora import inject_lora, load_lora, lora_module_names, lora_parameters, target_dims
from lit_sahs.safevlm.lora_gate import adapters_off
from lit_sahs.safevlm.modules import JoinedHeads, SafetyModules
from lit_sahs.refusal import refusal_token_ids
from lit_sahs.safevlm.selection import check_gate_shares, gate_threshold, per_source_threshold
from lit_sahs.safevlm.taxonomy import RISK_LEVELS, RISK_TYPES
from lit_sahs.safevlm.validation import ValidationRows
from lit_sahs.targets import sites

log = logging.getLogger(__name__)


@register_family()
class SafeVLM(ModelFamily, L.LightningModule):
    family: ClassVar[str] = "safevlm"
    report_name: ClassVar[str] = "safevlm"
    trainer_defaults: ClassVar[dict[str, Any]] = {"max_epochs": 2, "enable_checkpointing": False}

    def __init__(self, stage: int = 1, init_from: Optional[str] = None, num_safety_tokens: int = 64,
                 feature_layer: Optional[int] = None, head_heads: int = 8, vision_queries: int = 16,
                 loss_weight: float = 10.0, lr: Optional[float] = None, weight_decay: float = 0.0,
                 lora_rank: int = 256, lora_alpha: int = 16, lora_dropout: float = 0.05,
                 target_fpr: float = 0.05, token_lr_scale: float = 0.1,
                 head_keys: Optional[Union[str, HeadSet]] = None, head_keys_init: Optional[str] = None,
                 lora_fpr: Optional[float] = None, lora_tpr: Optional[float] = None) -> None:
        """head_keys: located safety heads ('3.1,5.0') whose first-token outputs join the safety head
        (``safevlm.joined``); head_keys_init: a fitted logistic safety-head detector (artifact
        directory) they start from — its heads when head_keys is empty. lora_fpr / lora_tpr (stage II): the
        guard keeps LoRA for risks that flag this share of validation benign / harmful prompts (``selection.gate_threshold``)."""
        super().__init__()
        if isinstance(head_keys, HeadSet):
            head_keys = head_keys.spec()
        if head_keys is not None:
            head_keys = HeadSet.parse(str(head_keys)).spec() or None
        if head_keys_init and stage == 2:
            raise LitSahsError("stage 2 takes its joined heads from the stage-I artifact (init_from): "
                               "leave head_keys_init empty")
        if head_keys_init and not Path(head_keys_init).exists():
            raise LitSahsError(f"head_keys_init {head_keys_init} does not exist: point it at a logistic "
                               "safety-head detector's artifact directory")
        if stage not in (1, 2):
            raise LitSahsError(f"stage must be 1 or 2, got {stage!r}")
        if stage == 2 and not init_from:
            raise LitSahsError("stage 2 starts from a stage-I artifact: set init_from to its directory or URI")
        if init_from and not str(init_from).startswith(("models:/", "runs:/")) and not Path(init_from).exists():
            raise LitSahsError(f"init_from {init_from} does not exist: run stage I first "
                               "(python -m lit_sahs fit --config configs/safevlm_stage1.yaml)")
        if not 0.0 <= target_fpr < 1.0:
            raise LitSahsError(f"target_fpr must lie in [0, 1), got {target_fpr}")
        check_gate_shares(stage, lora_fpr, lora_tpr)
        for name, v in (("num_safety_tokens", num_safety_tokens), ("head_heads", head_heads), ("lora_rank", lora_rank)):
            if int(v) < 1:
                raise LitSahsError(f"{name} must be >= 1, got {v}")
        self.save_hyperparameters()
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))
        self.register_buffer("lora_threshold", torch.tensor(float("nan"), dtype=torch.float64))  # NaN: no gate
        self.safety: Optional[SafetyModules] = None
        self.fingerprint: Optional[TargetFingerprint] = None
        self.dims: dict[str, int] = {}
        self.levels, self.types = list(RISK_LEVELS), list(RISK_TYPES)
        self.lora: Optional[dict[str, Any]] = None        # {"rank", "alpha", "dropout", "modules"} once stage II ran
        self.lora_state: dict[str, Tensor] = {}           # LoRA tensors not yet in a target (a loaded artifact)
        self.trained_stages: list[int] = []
        self.families: list[str] = []
        self.__dict__["_target"] = None                  # never a submodule: see the module docstring
        self._test_scores: list[np.ndarray] = []

    # ------------------------------------------------------------------ what other commands ask of a detector

    @property
    def is_bound(self) -> bool:
        return self.safety is not None

    @property
    def target(self):
        return self.__dict__["_target"]

    bound_target = target  # its LoRA lives in this target's layers (ModelFamily.bound_target)

    def check_target(self, fingerprint: TargetFingerprint) -> None:
        if not self.is_bound:
            raise LitSahsError("SafeVLM is not fitted: fit it or load a saved one")
        self.fingerprint.check(fingerprint, what="these SafeVLM safety modules")

    def prepare(self, target) -> None:
        self.attach(target)

    @property
    def feature_layer(self) -> int:
        return int(self.hparams.feature_layer)

    @property
    def head_keys(self) -> Optional[HeadSet]:
        """The joined heads (None: the safety head reads only its features)."""
        spec = self.hparams.get("head_keys")
        return HeadSet.parse(spec) if spec else None

    def lora_first_layer(self) -> int:
        """LoRA goes on layers from this one: the feature layer, or past the deepest joined head, so
        stage II leaves every input of the frozen safety head as it was."""
        heads = self.head_keys
        return max(self.feature_layer, max(heads.layers) + 1) if heads is not None else self.feature_layer

    @property
    def lr(self) -> float:
        return float(self.hparams.lr) if self.hparams.lr is not None else (1e-3 if self.hparams.stage == 1 else 2e-4)

    # ------------------------------------------------------------------ building

    def build(self, fingerprint: TargetFingerprint, dims: dict[str, int]) -> None:
        """Create the safety modules for a target of these dims (no target needed: artifacts load this way)."""
        hp = self.hparams
        if hp.feature_layer is None:
            hp.feature_layer = dims["num_layers"] // 2
        if not 0 <= int(hp.feature_layer) <= dims["num_layers"]:
            raise LitSahsError(f"feature_layer {hp.feature_layer} is outside 0..{dims['num_layers']} "
                               f"(0: token embeddings, k: the output of decoder layer k-1)")
        self.safety = SafetyModules(dims["hidden"], dims["hidden"], int(hp.num_safety_tokens), int(hp.head_heads),
                                    len(self.levels), len(self.types), dims["vision_dim"], int(hp.vision_queries))
        if hp.get("head_keys") or hp.get("head_keys_init"):
            self._join(fingerprint, dims)
        self.safety.to(self.threshold.device)
        self.fingerprint, self.dims = fingerprint, dict(dims)

    def _join(self, fingerprint: TargetFingerprint, dims: dict[str, int]) -> None:
        heads, detector = self.head_keys, None
        if heads is not None:
            try:
                heads.validate(fingerprint.geometry)
            except LitSahsError as e:
                raise LitSahsError(f"head_keys {heads.spec()}: {e}") from None
        if self.hparams.get("head_keys_init"):
            detector, heads = load_head_detector(self.hparams.head_keys_init, fingerprint, heads)
            self.hparams.head_keys = heads.spec()
        joined = JoinedHeads(len(heads), fingerprint.geometry.head_dim, dims["hidden"])
        self.safety.join(joined)
        if detector is not None:
            joined.init_from(detector)

    def attach(self, target) -> "SafeVLM":
        """Use `target` (checked against the fingerprint); its layers get this SafeVLM's LoRA weights."""
        if self.target is target:
            return self
        if self.is_bound:
            self.check_target(target.fingerprint)
            if target_dims(target) != self.dims:
                raise LitSahsError(f"the target's shape {target_dims(target)} differs from the one these safety "
                                   f"modules were built for {self.dims}")
        else:
            self.build(target.fingerprint, target_dims(target))
        self.__dict__["_target"] = target
        if self.lora is not None:
            self._inject_lora(self.lora)
            if self.lora_state:
                self._load_lora(self.lora_state)
                self.lora_state = {}
        return self

    def _inject_lora(self, cfg: dict[str, Any]) -> None:
        inject_lora(self.target.model, cfg)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {} if self.target is None else lora_parameters(self.target.model)

    def _load_lora(self, state: dict[str, Tensor]) -> None:
        load_lora(self.target.model, state)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        target = getattr(dm, "target", None)
        if target is None:
            if self.target is None:
                raise LitSahsError("SafeVLM trains from a SafetyDataModule (it holds the target): pass one")
            return
        n = getattr(dm, "num_safety_tokens", None)
        if self.hparams.stage == 2 and not self.trained_stages:
            self.start_stage_two(target)
        else:
            self.attach(target)
        if n is not None:  # the batches get as many slots as the model has safety tokens (stage II: stage I's)
            dm.num_safety_tokens = int(self.hparams.num_safety_tokens)
        self.families = list(getattr(dm, "families", []) or [])
        if not self.target.dispatched:
            self.target.model.to(self.threshold.device)
        if self.hparams.stage == 1:
            self.safety.requires_grad_(True)
        else:
            self.safety.requires_grad_(False)

    def start_stage_two(self, target) -> None:
        """Stage II from the stage-I artifact `init_from`: its safety modules and tokens, LoRA into `target`."""
        first = load_stage_one(type(self), self.hparams.init_from)
        if 1 not in first.trained_stages:
            raise LitSahsError(f"{self.hparams.init_from} is not a stage-I SafeVLM artifact (stages {first.trained_stages})")
        try:
            first.check_target(target.fingerprint)
        except LitSahsError as e:
            raise LitSahsError(f"init_from {self.hparams.init_from}: {e}") from None
        if target_dims(target) != first.dims:
            raise LitSahsError(f"init_from {self.hparams.init_from} was built for target shape {first.dims}, "
                               f"this target has {target_dims(target)}")
        for key in ("num_safety_tokens", "feature_layer", "head_heads", "vision_queries", "head_keys"):
            self.hparams[key] = first.hparams[key]  # the architecture is the stage-I artifact's
        self.build(first.fingerprint, first.dims)
        self.safety.load_state_dict(first.safety.state_dict())
        self.threshold.copy_(first.threshold)
        self.trained_stages = list(first.trained_stages)
        self.__dict__["_target"] = target
        self.lora = {"rank": int(self.hparams.lora_rank), "alpha": int(self.hparams.lora_alpha),
                     "dropout": float(self.hparams.lora_dropout),
                     "modules": lora_module_names(target.model, self.lora_first_layer())}
        if not self.lora["modules"]:
            raise LitSahsError(f"no decoder layer lies past the deepest joined head ({self.hparams.head_keys}) and the "
                               "feature layer: stage II has no layer to put LoRA on; join shallower heads")
        self._inject_lora(self.lora)

    # ------------------------------------------------------------------ the forward

    def run(self, batch: dict, stop: bool = False) -> tuple[Optional[Any], Tensor, Tensor]:
        """(target output or None when stopped early, level logits, type logits) for a with_slots batch."""
        if self.target is None:
            raise LitSahsError("SafeVLM is not attached to a target: call attach(target) or fit it")
        model = self.target.model
        dev = self.target.device
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        vision = self.safety.vision is not None and "pixel_values" in batch
        with self.safety_forward(batch, vision=vision, stop=stop) as fwd:
            out = fwd.run(**model_inputs(batch), use_cache=False, **answer_logits(batch))
        if fwd.features is None or fwd.query is None:
            raise LitSahsError("the forward never reached the feature layer: the safety hooks did not fire")
        if vision and fwd.patches is None and bool((batch["input_ids"] == sites.image_token_id(model)).any()):
            raise LitSahsError("the batch has images but the target's vision projector never ran: "
                               "the safety hooks did not see them")
        level, rtype = self.classify_forward(fwd)
        return out, level, rtype

    def safety_forward(self, batch: dict, vision: bool, stop: bool = False) -> SafetyForward:
        """The hooks one forward (or generate) over a ``with_slots`` batch needs (``forward.SafetyForward``)."""
        return SafetyForward(self.target.model, self.safety.input_tokens.weight, self.feature_layer,
                             batch["slot_mask"], batch["prompt_mask"], batch["first_pos"], vision=vision, stop=stop,
                             input_ids=batch["input_ids"], heads=self.head_keys, geometry=self.fingerprint.geometry)

    def classify_forward(self, fwd: SafetyForward) -> tuple[Tensor, Tensor]:
        """(level logits, type logits) from what a finished SafetyForward recorded."""
        return self.safety.classify(fwd.query, fwd.features, fwd.padding, fwd.patches, fwd.patch_padding,
                                    heads=fwd.head_outputs)

    @staticmethod
    def risk(level_logits: Tensor) -> Tensor:
        """The detector score: 1 - P(level = safe), in float64."""
        return 1.0 - torch.softmax(level_logits.double(), dim=-1)[:, 0]

    @torch.no_grad()
    def score_encoded(self, target, enc: dict) -> np.ndarray:
        """Risk probabilities for a prompt batch encoded by ``prompting.encode``."""
        self.attach(target)
        batch = with_slots(enc, int(self.hparams.num_safety_tokens), target.tokenizer.pad_token_id or 0)
        _, level, _ = self.run(batch, stop=True)
        return self.risk(level).cpu().numpy()

    def categories(self) -> list[str]:
        """Per-category scores: the probability of each risk type (the safe type excluded)."""
        return [t for t in self.types if t != "safe"]

    def category_scores(self, target, enc: dict) -> np.ndarray:
        _, _, types = self.classify_encoded(target, enc)
        keep = [i for i, t in enumerate(self.types) if t != "safe"]
        return types[:, keep].double().numpy()

    def make_guard(self, target, refusal: Optional[str] = None, threshold: Optional[float] = None,
                   fail_closed: bool = True, judge_band=None, answer_below=None, answer_direction=None):
        from lit_sahs.safevlm.guard import SafeVLMGuard

        return SafeVLMGuard(target, self, refusal, threshold=threshold, fail_closed=fail_closed, judge_band=judge_band,
                            answer_below=answer_below, answer_direction=answer_direction)

    @torch.no_grad()
    def classify_encoded(self, target, enc: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(risk [B] float64, level probabilities [B, levels], type probabilities [B, types])."""
        self.attach(target)
        batch = with_slots(enc, int(self.hparams.num_safety_tokens), target.tokenizer.pad_token_id or 0)
        _, level, rtype = self.run(batch, stop=True)
        return self.risk(level).cpu(), torch.softmax(level.float(), -1).cpu(), torch.softmax(rtype.float(), -1).cpu()

    # ------------------------------------------------------------------ loops

    def losses(self, batch: dict, lm: bool) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
        """(classifier loss, level logits, LM loss or None without `lm`, risk) of one batch."""
        return self.loss_terms(batch, *self.run(batch, stop=not lm), lm=lm)

    def loss_terms(self, batch: dict, out: Any, level: Tensor, rtype: Tensor, lm: bool):
        """``losses`` of a forward already run (validation reads its logits for the answers' refusal too)."""
        dev, lm_loss = level.device, None
        cls = F.cross_entropy(level.float(), batch["level"].to(dev)) + F.cross_entropy(rtype.float(), batch["type"].to(dev))
        if lm:  # the logits cover the last positions only (answer_logits): align the labels with them
            labels = batch["labels"].to(out.logits.device)[:, -out.logits.shape[1]:][:, 1:]
            keep = labels != IGNORE_INDEX
            lm_loss = F.cross_entropy(out.logits[:, :-1][keep].float(), labels[keep]) if keep.any() else out.logits.sum() * 0
        return cls, level, lm_loss, self.risk(level)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.target.model.train(self.hparams.stage == 2)  # LoRA dropout in stage II; the frozen target stays in eval
        cls, _, lm_loss, _ = self.losses(batch, lm=True)
        loss = lm_loss + float(self.hparams.loss_weight) * cls
        n = batch["input_ids"].shape[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/lm_loss", lm_loss, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/cls_loss", cls, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def prepare_launch(self, trainer: L.Trainer, datamodule: Any) -> None:
        """Called in the launching process before a fit (Engine, the CLI). With several processes:
        stage II is refused, because its LoRA weights live inside the target, which is not a submodule,
        so DDP would neither average their gradients nor copy them back. Stage I is bound here first:
        spawn launchers copy rank 0's weights back only into modules this object already has."""
        if trainer.world_size <= 1:
            return
        if self.hparams.stage == 2:
            raise LitSahsError(f"SafeVLM stage II trains LoRA inside the target, which DDP does not see: run it in "
                               f"one process (trainer.devices 1), not {trainer.world_size}")
        if not self.is_bound and datamodule is not None:
            datamodule.setup("fit")
            self.attach(datamodule.target)

    def on_validation_start(self) -> None:
        """Fresh collectors for a validation run (a fit's, or ``Trainer.validate``'s)."""
        self._val = ValidationRows(self.threshold.device, refusal_token_ids(self.target.tokenizer), self.gated_validation)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.target.model.eval()
        out, level, rtype = self.run(batch)
        cls, _, lm_loss, risk = self.loss_terms(batch, out, level, rtype, lm=True)
        off = None
        if self._val.gated:  # what stage I's model answers: the rows below the gate decode with it
            with torch.no_grad(), adapters_off(self.target.model):
                off = self.run(batch)[0]
        self._val.update(batch, risk, out, off)
        n = batch["input_ids"].shape[0]
        self.log("val/lm_loss", lm_loss, on_epoch=True, batch_size=n)
        self.log("val/cls_loss", cls, on_epoch=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        """Recalibrate the threshold and the LoRA gate (during a fit) and log the selection metrics
        (``safevlm.selection``): ``val/margin`` (harmful minus benign flagged rate, benign sources
        cross-fitted) that stage I's callbacks monitor, ``val/answer_margin`` (the answers' refusal mass,
        harmful minus benign) and ``val/gated_answer_margin`` (the same as the gate ships them), stage II's."""
        rows = self._val
        if rows.scored:
            preds, target, sources = rows.scores_labels_sources()
            if not self.trainer.sanity_checking and self.trainer.state.fn == "fit" and bool((target == 0).any()):
                self.threshold.fill_(per_source_threshold(preds, target, sources, self.hparams.target_fpr))
                gate = gate_threshold(preds, target, sources, self.hparams.get("lora_fpr"), self.hparams.get("lora_tpr"))
                self.lora_threshold.fill_(float("nan") if gate is None else gate)
            self.log_dict(rows.margins(preds, target, sources, float(self.hparams.target_fpr), float(self.lora_threshold)))
        detection = rows.detection(float(self.threshold))
        if detection:
            self.log_dict(detection)
        self.log("val/threshold", float(self.threshold))

    @property
    def gated_validation(self) -> bool:
        """Stage II with a LoRA gate (a rule to calibrate it, or a calibrated one): validation also runs the
        batch adapter-off and logs ``val/gated_answer_margin``, the answers of the model the gate ships."""
        rule = self.hparams.get("lora_fpr") is not None or self.hparams.get("lora_tpr") is not None
        return self.hparams.stage == 2 and bool(self.lora_parameters()) and \
            (rule or bool(torch.isfinite(self.lora_threshold)))

    def on_fit_end(self) -> None:
        if self.hparams.stage not in self.trained_stages:
            self.trained_stages.append(int(self.hparams.stage))
        self.target.model.eval()

    def on_test_epoch_start(self) -> None:
        self._test_scores = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.target.model.eval()
        with torch.no_grad():
            _, level, _ = self.run(batch, stop=True)
        self._test_scores.append(self.risk(level).cpu().numpy())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.stage == 2:
            params = list(self.lora_parameters().values())
            if not params:
                raise LitSahsError("stage 2 has nothing to train")
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.hparams.weight_decay)
        # the input safety tokens move what every later layer computes (the head's features included):
        # they learn at token_lr_scale x lr so the head does not chase moving features
        tokens = list(self.safety.input_tokens.parameters())
        ids = {id(p) for p in tokens}
        rest = [p for p in self.safety.parameters() if id(p) not in ids]
        return torch.optim.AdamW([{"params": rest}, {"params": tokens, "lr": self.lr * self.hparams.token_lr_scale}],
                                 lr=self.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ checkpoints (ModelCheckpoint)

    LORA_CHECKPOINT_KEY: ClassVar[str] = "safevlm_lora"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The LoRA tensors live in the target, outside the state dict: a checkpoint carries them too,
        so testing and exporting the best checkpoint of stage II gets its adapter, not the last one."""
        lora = self.lora_parameters()
        if lora:
            checkpoint[self.LORA_CHECKPOINT_KEY] = {n: p.detach().cpu().clone() for n, p in lora.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.LORA_CHECKPOINT_KEY)
        if state:
            if self.target is None:
                self.lora_state = dict(state)
            else:
                self._load_lora(state)

    # ------------------------------------------------------------------ reports (the TestReport callback)

    @torch.no_grad()
    def _rescore(self, dm, split: str) -> np.ndarray:
        self.target.model.eval()
        out = [self.risk(self.run(b, stop=True)[1]).cpu().numpy() for b in dm.loader(split)]
        return np.concatenate(out) if out else np.empty(0)

    def split_scores(self, dm, split: str) -> np.ndarray:
        """Risk scores of a split, in ``dm.split_rows(split)`` order: the test loop's when they cover the
        split (one process, every batch run), else the split scored again here, whole and in order (under
        DDP each rank saw a shard; under ``fast_dev_run`` or ``limit_test_batches`` the loop saw a part)."""
        trainer = self._trainer
        one_process = trainer is None or trainer.world_size == 1
        if split == "test" and self._test_scores and one_process:
            seen = np.concatenate(self._test_scores)
            if len(seen) == len(dm.split_rows(split)):
                return seen
        return self._rescore(dm, split)

    # ------------------------------------------------------------------ what the artifact records

    def metadata(self) -> dict[str, Any]:
        if not self.is_bound:
            raise LitSahsError("SafeVLM is not fitted: nothing to save")
        return {"detector": self.family, "fingerprint": self.fingerprint.to_dict(),
                "geometry": self.fingerprint.geometry.to_dict(), "dims": dict(self.dims),
                "levels": list(self.levels), "types": list(self.types), "lora": self.lora,
                "stages": list(self.trained_stages), "families": list(self.families),
                "lit_sahs_version": lit_sahs.__version__}

    def artifact_metadata(self) -> dict[str, Any]:
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "hparams": init_args(self.hparams),
                **self.metadata()}

    @classmethod
    def from_artifact(cls, meta, tensors, source: str) -> "SafeVLM":
        return rebuild(cls, meta, tensors, source)

    def artifact_tensors(self) -> dict[str, Tensor]:
        out = {SAFETY_PREFIX + k: v for k, v in self.safety.state_dict().items()} | {"threshold": self.threshold}
        if bool(torch.isfinite(self.lora_threshold)):  # NaN: no gate, not saved
            out["lora_threshold"] = self.lora_threshold
        lora = self.lora_parameters() or self.lora_state
        out.update({LORA_PREFIX + n: v for n, v in lora.items()})
        return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}
