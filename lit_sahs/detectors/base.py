"""SafetyDetector: the LightningModule every detector family shares.

Life of a detector
------------------
1. ``__init__`` takes hyper-parameters only, so LightningCLI builds it from YAML.
2. ``bind(head_set, geometry, fingerprint, mean, std, families)`` ties it to a target: it
   stores the metadata, registers the train-split normalisation as buffers and calls the
   subclass's ``build(k, head_dim)`` to create parameters. ``setup`` does this from
   ``trainer.datamodule`` (whose ``setup`` runs first), so a plain ``trainer.fit(det, dm)``
   needs nothing else.
3. ``forward(x_raw [B, k, D]) -> logits [B]`` normalises raw captured activations itself, so
   at deployment it takes exactly what ``HeadCapture`` records for its HeadSet.
4. Each validation epoch during ``fit`` recalibrates the ``threshold`` buffer (a probability)
   so that ``target_fpr`` of the validation benign prompts are flagged; ``predict_step``,
   accuracy and F1 use it. ``trainer.validate``/``test`` report at the stored threshold and
   never change it.
5. Checkpoints carry the metadata under ``checkpoint["lit_sahs"]`` (plain types only, so
   ``torch.load(weights_only=True)`` reads them) and ``on_load_checkpoint`` re-binds before
   Lightning loads the state dict, so ``Cls.load_from_checkpoint(path)`` just works.

A subclass sets ``family`` (its registry name), implements ``build(k, head_dim)`` and
``logits(z)`` (z: normalised [B, k, D]), may add ``penalty()`` and ``configure_optimizers``, and is
registered with ``@register_family()``; the ``ModelFamily`` interface (artifacts, scoring prompts,
the guard, split scores) is implemented here once for all of them.
"""
from __future__ import annotations

import logging
import math
from typing import Any, ClassVar, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lit_sahs
from lit_sahs.detectors.metrics import calibrate_threshold, detection_metrics, set_threshold, ScoreCollector
from lit_sahs.data.extra_features import FeatureSpec
from lit_sahs.errors import LitSahsError
from lit_sahs.detectors.interface import HeadFamily
from lit_sahs.family import CHECKPOINT_KEY
from lit_sahs.heads import Geometry, HeadSet, TargetFingerprint
from lit_sahs.self_judge import stored_rule

log = logging.getLogger(__name__)


def check_low_fpr(weight: float, fpr: float) -> None:
    """The low-FPR objective's settings, for the families that train through ``training_loss``:
    `weight` of ``low_fpr_loss`` beside cross-entropy (0: cross-entropy alone), `fpr` the benign
    share it ranks harmful prompts above."""
    if weight < 0 or not 0.0 < fpr <= 1.0:
        raise LitSahsError(f"low_fpr_weight must be >= 0 and low_fpr in (0, 1], got {weight} and {fpr}")


def low_fpr_loss(logits: Tensor, y: Tensor, fpr: float) -> Tensor:
    """A smooth surrogate of the one-way partial AUROC below `fpr`: every harmful prompt against the
    benign prompts that score highest (the top `fpr` share, at least one), mean softplus(s_benign -
    s_harmful). Cross-entropy weighs every benign prompt alike; this term works only where a low
    threshold is decided. Zero (with a gradient) when the batch lacks a class."""
    neg, pos = logits[y == 0], logits[y == 1]
    if not len(neg) or not len(pos):
        return logits.sum() * 0.0
    top = neg.topk(max(1, math.ceil(fpr * len(neg)))).values
    return F.softplus(top[None, :] - pos[:, None]).mean()


class SafetyDetector(HeadFamily, L.LightningModule):
    family: ClassVar[str] = ""

    default_lr: ClassVar[float] = 1e-3
    # Full-batch families switch automatic_optimization off and implement fit_full_batch; this
    # names the setting that trains them on mini-batches instead (for DDP).
    mini_batch_setting: ClassVar[str] = ""

    def __init__(self, lr: float | None = None, weight_decay: float = 0.0, target_fpr: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= target_fpr < 1.0:
            raise LitSahsError(f"target_fpr must lie in [0, 1), got {target_fpr}: e.g. 0.05 for 5% of benign prompts flagged")
        if lr is not None and lr <= 0:
            raise LitSahsError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise LitSahsError(f"weight_decay must be >= 0, got {weight_decay}")
        # collects the arguments of the subclass __init__ too (Lightning walks the init frames)
        self.save_hyperparameters()
        self.register_buffer("threshold", torch.tensor(0.5, dtype=torch.float64))
        self.head_set: HeadSet | None = None
        self.geometry: Geometry | None = None
        self.fingerprint: TargetFingerprint | None = None
        self.families: list[str] = []
        self._eval_families: list[str] = []
        self.feature_spec: FeatureSpec = FeatureSpec((), ())
        self.calibration: Optional[dict] = None  # how the threshold was set if not on validation (lit_sahs.crossfit)
        self.judge: Optional[dict] = None  # the judge band's calibrated cut (lit_sahs.judge_cut)

    @property
    def num_inputs(self) -> int:
        """Rows of the input [B, k, D]: the heads, then the packed extra features' slots."""
        self._require_bound()
        return len(self.head_set) + self.feature_spec.num_slots(self.geometry.head_dim)

    # ------------------------------------------------------------------ subclass hooks

    def build(self, k: int, head_dim: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """z: normalised activations [B, k, D] -> logits [B]."""
        raise NotImplementedError

    def penalty(self) -> Tensor:
        return torch.zeros((), device=self.threshold.device)

    # ------------------------------------------------------------------ binding

    @property
    def is_bound(self) -> bool:
        return self.head_set is not None

    def bind(
        self,
        head_set: HeadSet,
        geometry: Geometry,
        fingerprint: TargetFingerprint,
        mean: Tensor,
        std: Tensor,
        families: Sequence[str] = (),
        features: FeatureSpec | None = None,
    ) -> "SafetyDetector":
        """Tie the detector to a target's heads (and extra features, packed after them, see
        ``lit_sahs.data.extra_features``) and the train-split normalisation; builds parameters."""
        if not isinstance(head_set, HeadSet):
            head_set = HeadSet(head_set)
        if len(head_set) == 0:
            raise LitSahsError("a detector needs at least one head: pass a non-empty HeadSet")
        head_set.validate(geometry)
        if fingerprint.geometry != geometry:
            raise LitSahsError(
                f"fingerprint geometry {fingerprint.geometry.shape} differs from geometry {geometry.shape}: "
                "take both from the same target"
            )
        features = features if features is not None else FeatureSpec((), ())
        k, d = len(head_set) + features.num_slots(geometry.head_dim), geometry.head_dim
        mean = torch.as_tensor(mean, dtype=torch.float32).detach().clone()
        std = torch.as_tensor(std, dtype=torch.float32).detach().clone()
        for name, t in (("mean", mean), ("std", std)):
            if tuple(t.shape) != (k, d):
                raise LitSahsError(
                    f"normalisation {name} has shape {tuple(t.shape)} but {k} heads / feature slots of dim {d} need "
                    f"({k}, {d}): compute it on the same HeadSet and features"
                )
        if not torch.isfinite(mean).all() or not torch.isfinite(std).all():
            raise LitSahsError("normalisation mean/std contain NaN or inf: check the training activations")
        std = std.clamp_min(1e-6)
        device = self.threshold.device
        self.register_buffer("mean", mean.to(device))
        self.register_buffer("std", std.to(device))
        self.head_set, self.geometry, self.fingerprint = head_set, geometry, fingerprint
        self.feature_spec = features
        self.families = [str(f) for f in families]
        self.build(k, d)
        self.to(device)
        self._build_metrics(self.families)
        return self

    def _require_bound(self) -> None:
        if not self.is_bound:
            raise LitSahsError(
                f"{type(self).__name__} is not bound to a target: fit it with a DataModule, "
                "or load one with load_detector(path) / load_from_checkpoint(path)"
            )

    def check_target(self, fingerprint: TargetFingerprint) -> None:
        """Raise LitSahsError unless this detector was made for the target `fingerprint` identifies."""
        self._require_bound()
        self.fingerprint.check(fingerprint, what=f"this {self.family or type(self).__name__} detector")

    def _check_datamodule(self, dm: Any) -> None:
        fp = getattr(dm, "fingerprint", None)
        if fp is not None:
            self.check_target(fp)
        hs = getattr(dm, "head_set", None)
        if hs is not None and tuple(hs) != tuple(self.head_set):
            raise LitSahsError(
                f"the data holds heads {HeadSet(hs).to_list()} but the detector reads {self.head_set.to_list()}: "
                "give the DataModule the detector's HeadSet"
            )
        spec = getattr(dm, "feature_spec", None)
        if spec is not None and spec != self.feature_spec:
            raise LitSahsError(
                f"the data serves features {list(spec.names)} but the detector reads {list(self.feature_spec.names)}: "
                "give the DataModule the detector's features"
            )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not self.is_bound:
            self.bind_datamodule(dm, stage)
        elif dm is not None:
            self._check_datamodule(dm)
        fams = getattr(dm, "families", None) if dm is not None else None
        if fams is not None and list(fams) != self._eval_families:
            # evaluation data (held-out attacks) may index another family list than training
            self._build_metrics([str(f) for f in fams])

    def bind_datamodule(self, dm: Any, stage: str = "fit") -> "SafetyDetector":
        """Bind to what a DataModule (after its ``setup(stage)``) serves: heads, target, train normalisation."""
        if dm is None:
            raise LitSahsError(
                f"{type(self).__name__} is not bound to a target and the Trainer has no DataModule: "
                "pass datamodule=... or load a fitted detector"
            )
        for attr in ("head_set", "geometry", "fingerprint"):
            if getattr(dm, attr, None) is None:
                raise LitSahsError(f"the DataModule has no {attr!r}: it cannot feed a detector")
        norm = getattr(dm, "normalisation", None)
        if norm is None:
            raise LitSahsError(
                f"the DataModule has no training normalisation after setup({stage!r}) and the detector is not fitted: "
                "fit the detector first or load a fitted one"
            )
        return self.bind(dm.head_set, dm.geometry, dm.fingerprint, norm[0], norm[1],
                         list(getattr(dm, "families", []) or []), getattr(dm, "feature_spec", None))

    def _build_metrics(self, families: Sequence[str]) -> None:
        self._eval_families = list(families)
        device = self.threshold.device
        self.val_metrics = nn.ModuleDict({"overall": detection_metrics()})
        self.test_metrics = nn.ModuleDict({"overall": detection_metrics()})
        for i, _ in enumerate(families):
            self.val_metrics[f"family_{i}"] = detection_metrics()
            self.test_metrics[f"family_{i}"] = detection_metrics()
        self._val_scores = ScoreCollector()  # every val (prob, label): calibrates the threshold
        self.val_metrics.to(device)
        self.test_metrics.to(device)
        self._val_scores.to(device)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        """Raw activations of the detector's heads [B, k, D] (HeadSet order) -> logits [B]."""
        self._require_bound()
        k, d = self.num_inputs, self.geometry.head_dim
        if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != (k, d):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            extra = f" then features {list(self.feature_spec.names)} packed" if self.feature_spec else ""
            raise LitSahsError(
                f"detector expects activations [batch, {k}, {d}] (heads {self.head_set.to_list()} in this order"
                f"{extra}), got {got}: capture exactly the detector's HeadSet"
                + (" and features (lit_sahs.data.extra_features)" if self.feature_spec else "")
            )
        z = (x.to(self.mean.dtype) - self.mean) / self.std
        return self.logits(z)

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self(x).double())

    @torch.no_grad()
    def scores(self, x: "np.ndarray | Tensor", batch_size: int = 4096) -> np.ndarray:
        """Probabilities for raw activations [n, k, D] of the detector's HeadSet (and features), in batches."""
        self.eval()
        x = torch.as_tensor(np.asarray(x, dtype=np.float32)) if not torch.is_tensor(x) else x.float()
        out = [self.predict_proba(x[i:i + batch_size].to(self.threshold.device)).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy() if out else np.empty(0)

    # ------------------------------------------------------------------ loops

    def _batch(self, batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if isinstance(batch, dict):
            return batch["x"], batch.get("y"), batch.get("family")
        if isinstance(batch, (list, tuple)):
            return batch[0], (batch[1] if len(batch) > 1 else None), (batch[2] if len(batch) > 2 else None)
        return batch, None, None

    def _gather_epoch(self, x: Tensor, y: Tensor, batch_idx: int) -> tuple[Tensor, Tensor] | None:
        """Collect the epoch's training batches; on its last batch return them concatenated
        (raw activations, labels), before that None."""
        if batch_idx == 0:
            self._epoch_batches: list[tuple[Tensor, Tensor]] = []
        self._epoch_batches.append((x.detach(), y.detach()))
        if not (self.trainer.is_last_batch or batch_idx + 1 >= self.trainer.num_training_batches):
            return None
        batches, self._epoch_batches = self._epoch_batches, []
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])

    def fit_full_batch(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Full-batch families: fit on the whole epoch's raw activations and labels; return the loss."""
        raise NotImplementedError

    def check_processes(self, world_size: int) -> None:
        """Full-batch fits run in one process: under DDP each rank would fit its own shard."""
        if not self.automatic_optimization and world_size > 1:
            raise LitSahsError(f"the full-batch {type(self).__name__} runs in one process: "
                               f"set {self.mini_batch_setting} for DDP")

    def on_fit_start(self) -> None:
        self.check_processes(self.trainer.world_size)

    def prepare_launch(self, trainer: L.Trainer, datamodule: Any) -> None:
        """The engine calls this in the launching process before a fit. With several processes it
        refuses a full-batch fit here (inside a spawned process the error would be a traceback)
        and binds the detector first: spawn and fork launchers (ddp_spawn, ddp_notebook) copy
        rank 0's weights back into this object non-strictly, so an unbound one would stay empty."""
        if trainer.world_size <= 1:
            return
        self.check_processes(trainer.world_size)
        if not self.is_bound and datamodule is not None:
            datamodule.setup("fit")
            self.bind_datamodule(datamodule, "fit")

    def training_loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self(x)
        loss = F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype)) + self.penalty()
        weight = float(self.hparams.get("low_fpr_weight", 0.0))
        return loss + weight * low_fpr_loss(logits, y, self.hparams.get("low_fpr", 0.05)) if weight else loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """Mini-batch families return the batch loss; full-batch ones (automatic_optimization off)
        gather the epoch and fit it at its last batch, before validation sees the epoch's weights."""
        x, y, _ = self._batch(batch)
        if y is None:
            raise LitSahsError("training batches need labels 'y' (1 malicious, 0 benign)")
        if self.automatic_optimization:
            loss = self.training_loss(x, y)
        else:
            epoch = self._gather_epoch(x, y, batch_idx)
            if epoch is None:
                return None
            loss, x = self.fit_full_batch(*epoch), epoch[0]
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss if self.automatic_optimization else None

    def _eval_step(self, batch: Any, metrics: nn.ModuleDict, stage: str) -> None:
        x, y, fam = self._batch(batch)
        if y is None:
            raise LitSahsError(f"{stage} batches need labels 'y' (1 malicious, 0 benign)")
        logits = self(x)
        y = y.to(logits.dtype)
        self.log(f"{stage}/loss", F.binary_cross_entropy_with_logits(logits, y), on_epoch=True, batch_size=x.shape[0])
        probs = torch.sigmoid(logits.double())
        target = y.long()
        metrics["overall"].update(probs, target)
        if stage == "val":
            self._val_scores.update(probs, target)
        if fam is not None and self._eval_families:
            fam = fam.long()
            if fam.min() < 0 or fam.max() >= len(self._eval_families):
                raise LitSahsError(
                    f"batch family index {int(fam.max())} outside the {len(self._eval_families)} families: "
                    "the DataModule's families list must cover every batch"
                )
            for i in torch.unique(fam).tolist():
                m = fam == i
                metrics[f"family_{i}"].update(probs[m], target[m])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def _log_metrics(self, metrics: nn.ModuleDict, stage: str) -> None:
        threshold = float(self.threshold)
        out: dict[str, Tensor] = {}
        for key, coll in metrics.items():
            if not coll["auroc"].update_called:  # this family has no sample in this split
                coll.reset()
                continue
            set_threshold(coll, threshold)
            name = stage if key == "overall" else f"{stage}/{self._eval_families[int(key.split('_')[1])]}"
            for metric, value in coll.compute().items():
                out[f"{name}/{metric}"] = value.float()
            coll.reset()
        out[f"{stage}/threshold"] = torch.tensor(threshold, dtype=torch.float32)
        # values are already gathered across processes by torchmetrics
        self.log_dict(out, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        calibrate = (
            self._val_scores.update_called
            and not self.trainer.sanity_checking
            and self.trainer.state.fn == "fit"
        )
        if calibrate:
            preds, target = self._val_scores.compute()
            benign = preds[target == 0]
            if benign.numel():
                self.threshold.fill_(calibrate_threshold(benign, self.hparams.target_fpr))
                self.calibration = None
                self.judge = None  # its cut was fitted at the old threshold
            else:
                log.warning("validation split has no benign samples: threshold left at %.4f", float(self.threshold))
        self._val_scores.reset()
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        x, _, _ = self._batch(batch)
        logits = self(x)
        probs = torch.sigmoid(logits.double())
        return {"logits": logits, "probs": probs, "flags": probs >= self.threshold}

    @property
    def lr(self) -> float:
        """The learning rate in use: the `lr` hyper-parameter, or the family's default when it is None."""
        return float(self.hparams.lr) if self.hparams.lr is not None else self.default_lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        self._require_bound()
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ checkpoints

    def metadata(self) -> dict[str, Any]:
        """Plain-typed description of what the detector is bound to (JSON- and weights_only-safe)."""
        self._require_bound()
        return {
            "detector": self.family,
            "head_set": self.head_set.to_list(),
            "geometry": self.geometry.to_dict(),
            "fingerprint": self.fingerprint.to_dict(),
            "families": list(self.families),
            "lit_sahs_version": lit_sahs.__version__,
            **({"features": self.feature_spec.to_dict()} if self.feature_spec else {}),
            # how the threshold was set when not on the validation split (``lit_sahs.crossfit``)
            **({"calibration": dict(self.calibration)} if self.calibration else {}),
            **({"judge": dict(self.judge)} if self.judge else {}),  # the judge band's cut (lit_sahs.judge_cut)
        }

    def bind_from_metadata(self, meta: dict[str, Any]) -> None:
        """Bind with placeholder normalisation of the right shape; the state dict fills the values."""
        try:
            head_set = HeadSet(meta["head_set"])
            geometry = Geometry.from_dict(meta["geometry"])
            fingerprint = TargetFingerprint.from_dict(meta["fingerprint"])
            families = list(meta.get("families", []))
            features = FeatureSpec.from_dict(meta.get("features"))
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf)
            raise LitSahsError(f"detector metadata is incomplete or corrupt ({e!r}): re-save the detector") from e
        if self.is_bound:
            if (tuple(head_set) != tuple(self.head_set) or not fingerprint.matches(self.fingerprint)
                    or features != self.feature_spec):
                raise LitSahsError(
                    "the checkpoint was made for other heads or another target than this detector is bound to: "
                    "resume with the same DataModule settings"
                )
            return  # resuming: keep the parameters the optimizer already holds
        k, d = len(head_set) + features.num_slots(geometry.head_dim), geometry.head_dim
        self.bind(head_set, geometry, fingerprint, torch.zeros(k, d), torch.ones(k, d), families, features)
        calibration = meta.get("calibration")
        self.calibration = dict(calibration) if isinstance(calibration, dict) else None
        judge = meta.get("judge")
        stored_rule(judge, "the detector")  # a corrupt record is refused here, not at the first guarded prompt
        self.judge = dict(judge) if judge else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.is_bound:
            checkpoint[CHECKPOINT_KEY] = self.metadata()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get(CHECKPOINT_KEY)
        if meta is None:
            raise LitSahsError("the checkpoint has no lit_sahs metadata: it was not written by a lit_sahs detector")
        self.bind_from_metadata(meta)
