"""Model families: the one interface every trained detector offers the commands, and the one registry.

A *model family* is what ``fit`` trains and ``save_detector`` writes: the safety-head detectors
(logistic, mlp, sparse, attnpool), SafeVLM's safety modules, or a family of your own. Every command that
holds a detector — artifact load/save, the MLflow registry, ``evaluate``, ``guard``, ``screen``,
``tune``, the MLflow pyfunc model — reaches it through ``ModelFamily`` and finds its class through
``FAMILIES``; none asks which family it holds.

Adding a family is one package plus its registration::

    from lit_sahs.family import ModelFamily, register_family

    @register_family("my_probe")
    class MyProbe(ModelFamily, L.LightningModule):
        ...  # implement the abstract methods below

    # then: python -m lit_sahs fit --model MyProbe ..., load_detector(dir), guard, screen, evaluate

Built-in families register when ``lit_sahs.families`` is imported (it also loads plug-ins declared
under the ``lit_sahs.families`` entry-point group). This module stays at the bottom of the house:
it imports nothing of lit_sahs but errors and heads.
"""
from __future__ import annotations

import abc
import inspect
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Sequence, TypeVar

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import TargetFingerprint

if TYPE_CHECKING:  # pragma: no cover - types only
    import numpy as np
    import torch


CHECKPOINT_KEY = "lit_sahs"  # where a Lightning checkpoint keeps a detector's description


class ModelFamily(abc.ABC):
    """What a trained detector offers the rest of lit_sahs.

    Scores are probabilities of "malicious" (float64); a prompt is flagged when its score is at or
    above ``threshold`` (a float64 buffer calibrated on validation benign prompts during ``fit``).
    """

    family: ClassVar[str] = ""            # the registry name, written as "detector" into artifacts
    report_name: ClassVar[str] = "heads"  # the method's name in reports (beside tfidf, residual, ...)
    trainer_defaults: ClassVar[dict[str, Any]] = {}  # Lightning Trainer settings the family needs (Engine)
    reads_store: ClassVar[bool] = False   # trains on stored head activations: tune and the folds can search it
    threshold: "torch.Tensor"
    fingerprint: Optional[TargetFingerprint]
    # how the threshold was set when not on the validation benign prompts (``lit_sahs.crossfit``)
    calibration: Optional[dict] = None
    # the judge band's calibrated cut, when the detector has one (``lit_sahs.judge_cut``)
    judge: Optional[dict] = None
    # the answer side's calibrated cut and refusal direction, shipped in the artifact (``lit_sahs.answer_cut``)
    answer: Optional[dict] = None
    answer_direction: Any = None

    # ------------------------------------------------------------------ identity and target

    @property
    @abc.abstractmethod
    def is_bound(self) -> bool:
        """True once fitted or loaded (tied to a target's shape)."""

    def check_target(self, fingerprint: TargetFingerprint) -> None:
        """Raise LitSahsError unless this detector was made for the target `fingerprint` names."""
        if not self.is_bound or self.fingerprint is None:
            raise LitSahsError(f"this {self.family or type(self).__name__} detector is not fitted: fit it or load a saved one")
        self.fingerprint.check(fingerprint, what=f"this {self.family or type(self).__name__} detector")

    def prepare(self, target) -> None:
        """Tie a loaded detector to the `target` it will score on (checked against the fingerprint)."""
        self.check_target(target.fingerprint)

    @property
    def bound_target(self):
        """The loaded target this detector runs inside, for a family whose weights live in it (SafeVLM's LoRA),
        else None. Whoever scores a fitted detector uses it: a second copy of the target would not carry them."""
        return None

    # ------------------------------------------------------------------ artifacts (safetensors + JSON, no pickle)

    @abc.abstractmethod
    def artifact_metadata(self) -> dict[str, Any]:
        """Plain JSON values describing the detector (the format header is added by the writer)."""

    @abc.abstractmethod
    def artifact_tensors(self) -> dict[str, "torch.Tensor"]:
        """Every tensor the detector needs, CPU and contiguous (written to detector.safetensors)."""

    @classmethod
    @abc.abstractmethod
    def from_artifact(cls, meta: Mapping[str, Any], tensors: Mapping[str, "torch.Tensor"], source: str) -> "ModelFamily":
        """Rebuild a detector from what ``artifact_metadata``/``artifact_tensors`` wrote; anything that does
        not fit is a LitSahsError naming `source`."""

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], source: str) -> "ModelFamily":
        """Rebuild a detector from a Lightning checkpoint read with ``weights_only=True``."""
        raise LitSahsError(f"{source}: a {cls.family} detector is not read from a Lightning checkpoint: "
                           "export it with save_detector and load that directory")

    # ------------------------------------------------------------------ scoring prompts with the target

    @abc.abstractmethod
    def score_encoded(self, target, enc: dict) -> "np.ndarray":
        """Probabilities [batch] (float64, NaN where unscored) for a batch encoded by ``prompting.encode``,
        running `target` only as far as the family needs."""

    def score_prompts(self, target, enc: dict, texts: Sequence) -> "np.ndarray":
        """``score_encoded`` for a batch whose prompts (texts or conversations, in batch order) are
        known: a family that reads the prompt again (the judge feature's second prefill) needs them.
        Screen, guard and evaluate call this one."""
        return self.score_encoded(target, enc)

    def layers_run(self, target) -> int:
        """Decoder layers of `target` one ``score_encoded`` runs (the rest is skipped)."""
        return target.geometry.num_layers

    def categories(self) -> Sequence[str]:
        """Names of per-category scores the family gives (empty: one score only)."""
        return ()

    def category_scores(self, target, enc: dict) -> Optional["np.ndarray"]:
        """[batch, len(categories())] probabilities, or None for a family without categories."""
        return None

    @abc.abstractmethod
    def make_guard(self, target, refusal: Optional[str] = None, threshold: Optional[float] = None,
                   fail_closed: bool = True, judge_band=None, answer_below=None,
                   answer_direction=None):
        """A guard for generation on `target`: an object with ``generate(texts, images=None, ids=None,
        max_new_tokens=128, **generate_kwargs)`` returning a ``lit_sahs.guarding.GuardResult``. Each of
        `texts` is a user prompt or a conversation (a list of {role, content} messages ending with the
        user's turn), encoded by ``prompts.encode_prompts``. `judge_band`: the uncertain band the
        target's own verdict decides (``lit_sahs.self_judge.judge_rule``: None = the detector's
        calibrated one, if any; "off" = none); a family without that second stage refuses a band.
        `answer_below`: prompts scored below it may not open with a refusal (``lit_sahs.answer_nudge``; None:
        the detector's calibrated cut, ``answer``, if any; "off": none); `answer_direction`: a
        ``RefusalDirection`` (or its file) ablated while those prompts decode (None: ``answer_direction``,
        if any; "off": none). ``answer_nudge.answer_settings`` resolves both."""

    # ------------------------------------------------------------------ reports

    @abc.abstractmethod
    def split_scores(self, dm, split: str) -> "np.ndarray":
        """Scores for one split of the family's own DataModule (rows in ``dm.split_rows(split)`` order)."""

    def report_label(self) -> str:
        """What the test report calls this detector."""
        return f"{self.report_name} = {type(self).__name__}"

    def extra_artifacts(self) -> dict[str, Any]:
        """JSON documents written next to the artifact after a fit ({file name: value}), e.g. the heads
        a sparse detector kept."""
        return {}

    def prepare_launch(self, trainer, datamodule) -> None:
        """Called by the engine in the launching process before a fit (checks that must fail before
        worker processes start)."""

    def describe(self) -> dict[str, Any]:
        """A short summary for metadata endpoints and registry tags."""
        fp = self.fingerprint
        return {"family": self.family, "target": fp.name if fp is not None else None,
                "threshold": float(self.threshold), "categories": list(self.categories()),
                "answer_below": (self.answer or {}).get("answer_below")}


# ---------------------------------------------------------------- the registry

FAMILIES: dict[str, type[ModelFamily]] = {}

# The built-in families by name, as "module:Class" strings, so that ``fit --help`` lists them without
# importing them (they are LightningModules: importing one loads torch and Lightning). They register
# when ``lit_sahs.families`` imports their packages; a test checks this table against what registers.
BUILTIN_FAMILIES: dict[str, str] = {
    "attnpool": "lit_sahs.detectors.attnpool:AttentionPoolDetector",
    "logistic": "lit_sahs.detectors.logistic:LogisticDetector",
    "mlp": "lit_sahs.detectors.mlp:MLPDetector",
    "sparse": "lit_sahs.detectors.sparse:SparseHeadDetector",
    "safevlm": "lit_sahs.safevlm.module:SafeVLM",
}
ENTRY_POINT_GROUP = "lit_sahs.families"  # plug-in packages name their family modules here


def family_paths() -> dict[str, str]:
    """Every family a command can use, without importing one: name -> "module.Class" for the
    built-ins, entry-point name -> "module (plug-in)" for the declared plug-ins."""
    from importlib.metadata import entry_points

    paths = {name: path.replace(":", ".") for name, path in BUILTIN_FAMILIES.items()}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        paths.setdefault(ep.name, f"{ep.value} (plug-in)")
    return dict(sorted(paths.items()))
F = TypeVar("F", bound=type)


def register_family(*names: str) -> Callable[[F], F]:
    """Class decorator: register a ``ModelFamily`` subclass under `names` (default: its ``family``).
    The class must implement every abstract method; a name may be taken once."""

    def deco(cls: F) -> F:
        if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
            raise LitSahsError(f"{cls!r} is not a ModelFamily subclass: a model family implements lit_sahs.family.ModelFamily")
        if inspect.isabstract(cls):
            missing = sorted(getattr(cls, "__abstractmethods__", ()))
            raise LitSahsError(f"{cls.__name__} does not implement {', '.join(missing)}: a model family needs them all")
        keys = names or (cls.family,)
        for name in keys:
            if not name or not isinstance(name, str):
                raise LitSahsError(f"{cls.__name__}: a family name must be a non-empty string")
            old = FAMILIES.get(name)
            if old is not None and old is not cls:
                raise LitSahsError(f"model family {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        if not cls.family:
            cls.family = keys[0]
        for name in keys:
            FAMILIES[name] = cls
        return cls

    return deco


def family_class(name: str) -> type[ModelFamily]:
    """The class registered as `name` (call ``lit_sahs.families.family_class`` to have the built-ins loaded)."""
    try:
        return FAMILIES[str(name)]
    except KeyError:
        raise LitSahsError(f"unknown detector family {name!r}: use one of {', '.join(sorted(FAMILIES)) or '(none registered)'}") from None


def require_family(obj: Any) -> ModelFamily:
    """`obj` if it is an instance of a registered family, else one clear error."""
    if not isinstance(obj, ModelFamily):
        raise LitSahsError(f"{type(obj).__name__} is not a lit_sahs model family: it must implement lit_sahs.family.ModelFamily")
    if FAMILIES.get(obj.family) is not type(obj):
        raise LitSahsError(f"{type(obj).__name__} is not a registered model family: decorate it with @register_family")
    return obj
