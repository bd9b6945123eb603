"""HeadFamily: the ModelFamily interface, implemented once for every safety-head detector
(``SafetyDetector`` subclasses): artifacts, scoring prompts with a forward that stops after the
deepest head, the guard, split scores. Training lives in ``base.py``."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
from torch import Tensor

from lit_sahs.artifact_format import check_threshold, init_args, state_error_reason
from lit_sahs.errors import LitSahsError
from lit_sahs.family import CHECKPOINT_KEY, ModelFamily


class HeadFamily(ModelFamily):
    """What the commands ask of a safety-head detector. Expects the SafetyDetector members
    (head_set, feature_spec, geometry, scores, metadata, bind_from_metadata, state_dict)."""

    reads_store = True

    def prepare(self, target) -> None:
        self.check_target(target.fingerprint)
        self.head_set.validate(target.geometry)

    def score_encoded(self, target, enc: dict) -> np.ndarray:
        """The detector's heads (and features) at the first-token position, from a forward that stops
        after the deepest layer it reads (runs to the end when it reads extra features)."""
        return self.score_prompts(target, enc, None)

    def score_prompts(self, target, enc: dict, texts) -> np.ndarray:
        """``score_encoded``; the judge feature's prefill reads the prompts' `texts`."""
        from lit_sahs.hooks import capture_forward

        x = capture_forward(target, enc, self.head_set, features=self.feature_spec, texts=texts)
        return self.scores(x)

    def report_label(self) -> str:
        return f"{len(self.head_set)} heads; {self.report_name} = {type(self).__name__}"

    def layers_run(self, target) -> int:
        if self.feature_spec:  # residual layers and the refusal logits: the whole forward
            return target.geometry.num_layers
        return max(self.head_set.layers) + 1

    def make_guard(self, target, refusal: Optional[str] = None, threshold: Optional[float] = None,
                   fail_closed: bool = True, judge_band=None, answer_below=None,
                   answer_direction=None):
        from lit_sahs.detectors.guard import SafetyGuard

        return SafetyGuard(target, self, refusal=refusal, fail_closed=fail_closed, threshold=threshold,
                           judge_band=judge_band, answer_below=answer_below, answer_direction=answer_direction)

    def split_scores(self, dm, split: str) -> np.ndarray:
        """Scores of one split of a CachedActivationDataModule, read from its store (heads, then the
        extra features the detector reads)."""
        from lit_sahs.data.extra_features import read_inputs

        return self.scores(read_inputs(dm.store, self.head_set, self.feature_spec, self.geometry.head_dim,
                                       rows=dm.splits[split]))

    def artifact_metadata(self) -> dict[str, Any]:
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}",
                "hparams": init_args(self.hparams), **self.metadata()}

    def artifact_tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    @classmethod
    def _instantiate(cls, hparams: Any, source: str) -> "HeadFamily":
        if not isinstance(hparams, dict):
            raise LitSahsError(f"{source}: hyper-parameters are not a mapping: the artifact is corrupt")
        try:
            return cls(**init_args(hparams))
        except TypeError as e:
            raise LitSahsError(f"{source}: hyper-parameters do not fit {cls.__name__} ({e}): "
                               "was it written by another lit_sahs version?") from e

    def _load_state(self, state: Mapping[str, Tensor], source: str) -> None:
        try:
            self.load_state_dict(dict(state), strict=True)
        except RuntimeError as e:
            raise LitSahsError(f"{source} does not fit its own description ({state_error_reason(e)}): "
                               "the artifact is corrupt, re-save it") from e
        check_threshold(self.threshold, source)

    @classmethod
    def from_artifact(cls, meta: Mapping[str, Any], tensors: Mapping[str, Tensor], source: str) -> "HeadFamily":
        det = cls._instantiate(meta.get("hparams", {}), source)
        det.bind_from_metadata(dict(meta))
        det._load_state(tensors, source)
        return det

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], source: str) -> "HeadFamily":
        det = cls._instantiate(checkpoint.get("hyper_parameters", {}), source)
        det.bind_from_metadata(checkpoint[CHECKPOINT_KEY])
        det._load_state(checkpoint["state_dict"], source)
        return det
