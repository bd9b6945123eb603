"""Every forward hook on a target, and the capture forward that runs them.

* ``HeadCapture``: read every attention head's output at the first-token position;
  ``ResidualCapture`` / ``LayerResidualCapture``: the residual stream (baselines, extra features);
  ``FeatureCapture``: heads plus a detector's extra features (``lit_sahs.data.extra_features``: residuals,
  the refusal probability of the first-token logits) from one prefill; ``capture_for`` picks one;
* ``HeadAblation``: switch heads off (zero / mean) in every forward it wraps;
* ``EarlyExit`` / ``StopForward``: stop a forward once the needed layers have run;
* ``capture_forward``: one forward of an encoded batch under the capture a detector reads.

Each hook is a context manager that always removes itself. A forward pre-hook on each attention
output projection sees the concatenated head outputs [batch, seq, heads*head_dim] before they are
mixed; slicing the first-token column and reshaping gives [batch, heads, head_dim] per layer.
Inside `generate`, only the first call (the prefill) is recorded: each hook removes itself after
it fires once, so decode steps run hook-free.

Targets dispatched over several devices (``load_target(..., device_map=...)``, accelerate hooks,
layers on different GPUs or offloaded to CPU/disk): a pre-hook sees a layer's input on that
layer's execution device. HeadCapture copies every record to one gather device (the device of
the first layer that fires, unless ``gather_device`` is given), so stacking never mixes devices;
HeadAblation builds its masks on the device of the input it rewrites.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from lit_sahs.data.extra_features import from_forward
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet
from lit_sahs.prompt_hooks import PooledHeadCapture, PromptMask, TokenHeadCapture
from lit_sahs.refusal import refusal_probability, refusal_token_ids
from lit_sahs.self_judge import NEEDS_TEXTS, judge_feature_values
from lit_sahs.targets import sites
from lit_sahs.targets.prompting import FIRST_TOKEN_INDEX

if TYPE_CHECKING:
    from lit_sahs.targets import Target


class HeadCapture:
    """Context manager; after the forward, `activations()` gives [batch, layers, heads, head_dim]
    (all heads) or `selected()` [batch, k, head_dim] for the HeadSet given.

    Hooks are always removed on exit, also when the forward raised.
    """

    def __init__(self, model: nn.Module, heads: Optional[HeadSet] = None, geometry: Optional[Geometry] = None,
                 gather_device: Optional[str | torch.device] = None, positions: Optional[torch.Tensor] = None):
        """`positions` [batch]: the column each row is read at when it is not the last one (a
        sequence that continues past the prompt, e.g. a training row with its answer appended)."""
        self.model = model
        self.positions = positions
        self.gather_device = torch.device(gather_device) if gather_device is not None else None
        self.geometry = geometry or sites.geometry(model)
        self.heads = heads.validate(self.geometry) if heads is not None else None
        self.layers = self.heads.layers if self.heads is not None else tuple(range(self.geometry.num_layers))
        self._projs = sites.output_projections(model)
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._records: dict[int, torch.Tensor] = {}
        self._gather: Optional[torch.device] = self.gather_device

    def _hook(self, layer: int):
        g = self.geometry

        def hook(module, args):
            x = args[0]
            if self.positions is None:
                col = x[:, FIRST_TOKEN_INDEX, :]
            else:
                col = x[torch.arange(x.shape[0], device=x.device), self.positions.to(x.device)]
            rec = col.reshape(x.shape[0], g.num_heads, g.head_dim)
            if self._gather is None:
                self._gather = x.device
            # clone: a view would keep the whole [batch, seq, width] input alive; .to() of another
            # device copies already
            self._records[layer] = rec.clone() if rec.device == self._gather else rec.to(self._gather)
            handle = self._handles.pop(layer, None)
            if handle is not None:
                handle.remove()  # only the prefill is recorded; decode steps run hook-free

        return hook

    def __enter__(self) -> "HeadCapture":
        self._records.clear()
        self._gather = self.gather_device
        for layer in self.layers:
            self._handles[layer] = self._projs[layer].register_forward_pre_hook(self._hook(layer))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    @property
    def complete(self) -> bool:
        return all(layer in self._records for layer in self.layers)

    def _check(self) -> None:
        if not self.complete:
            missing = [l for l in self.layers if l not in self._records]
            raise LitSahsError(f"no activations captured for layers {missing}: run a forward inside the capture")

    def activations(self) -> torch.Tensor:
        """[batch, layers, heads, head_dim] for all layers (requires a capture without a HeadSet)."""
        self._check()
        if self.heads is not None and len(self.layers) != self.geometry.num_layers:
            raise LitSahsError("this capture hooked only the HeadSet's layers: use selected()")
        return torch.stack([self._records[l] for l in range(self.geometry.num_layers)], dim=1)

    def selected(self, heads: Optional[HeadSet] = None) -> torch.Tensor:
        """[batch, k, head_dim] for `heads` (default: the capture's HeadSet), in HeadSet order."""
        self._check()
        heads = heads or self.heads
        if heads is None:
            raise LitSahsError("selected() needs a HeadSet")
        return torch.stack([self._records[l][:, h] for l, h in heads], dim=1)


class ResidualCapture:
    """Context manager recording, in the same forward as HeadCapture, what the baselines need:
    the last-layer residual stream at the first-token position and the prompt's mean token
    negative log-likelihood (for a perplexity filter), computed from the final norm's output
    row by row so that the full [batch, seq, vocab] logits never exist at once."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._norm = sites.final_norm(model)
        self._handle = None
        self.residual: Optional[torch.Tensor] = None
        self._normed: Optional[torch.Tensor] = None

    def _hook(self, module, args, output):
        if self.residual is None:  # prefill only
            self.residual = args[0][:, FIRST_TOKEN_INDEX, :].clone()
            self._normed = output if torch.is_tensor(output) else output[0]

    def __enter__(self) -> "ResidualCapture":
        self.residual, self._normed = None, None
        self._handle = self._norm.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def prompt_nll(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   ignore_ids: tuple[int, ...] = (), chunk_positions: int = 1024) -> torch.Tensor:
        """Mean NLL per prompt of each real token given the tokens before it. `ignore_ids` (e.g.
        image placeholder tokens) are not scored, and their logits are never computed: in a
        LLaVA-1.5 prompt 576 of ~620 positions are image tokens. The whole batch is scored at
        once, `chunk_positions` positions per LM-head call (memory: chunk x vocab floats), with
        no host sync per row."""
        if self._normed is None:
            raise LitSahsError("no forward ran inside ResidualCapture")
        head = self.model.get_output_embeddings()
        dev = self._normed.device  # a dispatched target's final norm, LM head and inputs may sit apart
        targets = input_ids[:, 1:].to(dev)
        real = attention_mask.to(dev).bool()
        scored = real[:, :-1] & real[:, 1:]  # left padding: real tokens are contiguous
        if ignore_ids:
            scored &= ~torch.isin(targets, torch.tensor(ignore_ids, device=dev))
        rows, cols = scored.nonzero(as_tuple=True)
        hidden = self._normed[:, :-1][rows, cols]
        wanted = targets[rows, cols]
        nll = torch.cat([torch.nn.functional.cross_entropy(head(hidden[i:i + chunk_positions]).to(dev).float(),
                                                           wanted[i:i + chunk_positions], reduction="none")
                         for i in range(0, len(rows), chunk_positions)]) if len(rows) else hidden.new_zeros(0)
        batch = input_ids.shape[0]
        sums = torch.zeros(batch, dtype=torch.float32, device=nll.device).index_add_(0, rows, nll.float())
        counts = scored.sum(1).to(sums)
        self._normed = None
        return sums / counts  # NaN where no token is scored (0 / 0)


class LayerResidualCapture:
    """Context manager recording the residual stream after each of `layers` (decoder layer
    outputs) at the first-token position, prefill only, in the same forward as HeadCapture.
    `residuals()` gives [batch, len(layers), hidden]. Hooks are removed on exit."""

    def __init__(self, model: nn.Module, layers: "tuple[int, ...] | list[int]"):
        blocks = sites.decoder_layers(model)
        bad = [l for l in layers if not 0 <= int(l) < len(blocks)]
        if bad or not layers:
            raise LitSahsError(f"residual layers {list(layers)} must be non-empty and lie in 0..{len(blocks) - 1}")
        self.layers = tuple(int(l) for l in layers)
        self._blocks = blocks
        self._handles: list = []
        self._records: dict[int, torch.Tensor] = {}

    def _hook(self, layer: int):
        def hook(module, args, output):
            if layer in self._records:  # prefill only
                return
            h = output if torch.is_tensor(output) else output[0]
            self._records[layer] = h[:, FIRST_TOKEN_INDEX, :].clone()

        return hook

    def __enter__(self) -> "LayerResidualCapture":
        self._records.clear()
        self._handles = [self._blocks[l].register_forward_hook(self._hook(l)) for l in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def residuals(self) -> torch.Tensor:
        missing = [l for l in self.layers if l not in self._records]
        if missing:
            raise LitSahsError(f"no residual captured for layers {missing}: run a forward inside the capture")
        dev = self._records[self.layers[0]].device
        return torch.stack([self._records[l].to(dev) for l in self.layers], dim=1)


class FeatureCapture:
    """HeadCapture plus the extra features a detector reads (``lit_sahs.data.extra_features``), from
    the same prefill: residuals after the spec's layers, and the refusal-token probability of the
    first-token logits (a forward hook on the LM head, first call only: inside ``generate`` that
    is the prefill). ``selected()`` gives [batch, k + slots, head_dim], the detector's input, so it
    stands in for a HeadCapture wherever one is read (the guard's gate, ``capture_forward``). The
    judge feature's values, `judge` [batch], come from its own prefill, run before (``capture_for``)."""

    def __init__(self, model: nn.Module, heads: HeadSet, geometry: Geometry, spec, tokenizer,
                 judge: Optional[torch.Tensor] = None):
        if "judge" in spec.names and judge is None:
            raise LitSahsError(NEEDS_TEXTS)
        self.model, self.spec, self.geometry, self.judge = model, spec, geometry, judge
        self.head_capture = HeadCapture(model, heads, geometry)
        self.heads = self.head_capture.heads
        layers = spec.residual_layers
        self.residual_capture = LayerResidualCapture(model, layers) if layers else None
        self.refusal_ids = refusal_token_ids(tokenizer) if "refusal" in spec.names else None
        # over the prompt's own tokens, found once from the forward's ids (lit_sahs.prompt_hooks)
        prompt = PromptMask(model, None, tokenizer) if spec.pools or spec.token_heads else None
        self.pooled_capture = PooledHeadCapture(model, prompt, spec.pools, geometry) if spec.pools else None
        self.token_capture = (TokenHeadCapture(model, HeadSet(spec.token_heads), spec.token_length, prompt, geometry)
                              if spec.token_heads else None)
        self._handle = None
        self._logits: Optional[torch.Tensor] = None

    def _parts(self):
        return [c for c in (self.head_capture, self.residual_capture, self.pooled_capture, self.token_capture)
                if c is not None]

    def _lm_hook(self, module, args, output):
        if self._logits is None:
            out = output if torch.is_tensor(output) else output[0]
            self._logits = out[:, -1].detach().clone()

    def __enter__(self) -> "FeatureCapture":
        self._logits = None
        for part in self._parts():
            part.__enter__()
        if self.refusal_ids is not None:
            head = self.model.get_output_embeddings()
            if head is None:
                raise LitSahsError(f"{type(self.model).__name__} has no LM head: the refusal feature needs one")
            self._handle = head.register_forward_hook(self._lm_hook)
        return self

    def __exit__(self, *exc) -> None:
        for part in self._parts():
            part.__exit__(*exc)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def selected(self) -> torch.Tensor:
        x = self.head_capture.selected()
        res = self.residual_capture.residuals() if self.residual_capture is not None else None
        prob = None
        if self.refusal_ids is not None:
            if self._logits is None:
                raise LitSahsError("no logits captured for the refusal feature: run a forward inside the capture")
            prob = refusal_probability(self._logits, self.refusal_ids)
        pooled = self.pooled_capture.pooled() if self.pooled_capture is not None else None
        tokens = self.token_capture.tokens() if self.token_capture is not None else None
        judge = None if self.judge is None else self.judge.reshape(-1).cpu()
        if judge is not None and len(judge) != x.shape[0]:
            raise LitSahsError(f"the judge prefill scored {len(judge)} prompts, the capture {x.shape[0]}")
        packed = from_forward(self.spec, None if res is None else res.cpu(), None if prob is None else prob.cpu(),
                              self.geometry.head_dim, pooled=pooled, tokens=tokens, judge_logodds=judge)
        return torch.cat([x.float(), packed.to(x.device)], dim=1)


def capture_for(target, heads: HeadSet, spec=None, texts=None):
    """The capture a detector reads: a HeadCapture of its `heads`, or a FeatureCapture when it was
    fitted with extra features (`spec`, a non-empty FeatureSpec). A spec with the judge feature needs
    the batch's prompt `texts` (or conversations): its prefill runs here, before any hook exists."""
    if not spec:
        return HeadCapture(target.model, heads, target.geometry)
    return FeatureCapture(target.model, heads, target.geometry, spec, target.tokenizer,
                          judge=judge_feature_values(target, spec.names, texts))


ABLATION_MODES = ("zero", "mean")


class HeadAblation:
    """Context manager that switches heads off during every forward it wraps (a plain forward,
    or the prefill *and* every decode step of `generate`).

    A forward pre-hook on each affected layer's attention output projection rewrites the input
    ``[batch, seq, heads*head_dim]`` at every position as ``x * keep + fill``: ``keep`` is 0 on
    the ablated heads' slices and 1 elsewhere, ``fill`` is 0 (``mode="zero"``) or the head's mean
    output (``mode="mean"``, ``means[i]`` of shape [head_dim] for the i-th head of the HeadSet,
    e.g. the mean over benign rows of a store; see ``lit_sahs.ablate.benign_means``). Two
    elementwise ops, no indexing and no host sync, so decode steps stay cheap.

    Enter it *before* a HeadCapture to capture what the ablated model computes (the captured
    slice of a zero-ablated head is then zero). Hooks are always removed on exit.
    """

    def __init__(self, model: nn.Module, heads: HeadSet, mode: str = "zero", means: Optional[torch.Tensor] = None,
                 geometry: Optional[Geometry] = None):
        if mode not in ABLATION_MODES:
            raise LitSahsError(f"unknown ablation mode {mode!r}: use one of {', '.join(ABLATION_MODES)}")
        if not isinstance(heads, HeadSet):
            heads = HeadSet(heads)
        self.model = model
        self.geometry = geometry or sites.geometry(model)
        self.heads = heads.validate(self.geometry)
        self.mode = mode
        g = self.geometry
        if mode == "mean":
            if means is None:
                raise LitSahsError("mean ablation needs the heads' mean outputs: pass means [k, head_dim] "
                                   "(lit_sahs.ablate.benign_means(store, heads) computes them from a store)")
            means = torch.as_tensor(means, dtype=torch.float32)
            if tuple(means.shape) != (len(heads), g.head_dim):
                raise LitSahsError(f"means have shape {tuple(means.shape)} but {len(heads)} heads of dim {g.head_dim} "
                                   f"need ({len(heads)}, {g.head_dim}), in HeadSet order")
            if not torch.isfinite(means).all():
                raise LitSahsError("ablation means contain NaN or inf: check the store they came from")
        self.means = means
        self._projs = sites.output_projections(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _layer_tensors(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._tensors.get(layer)
        if cached is not None and cached[0].device == like.device and cached[0].dtype == like.dtype:
            return cached
        g = self.geometry
        keep = torch.ones(g.num_heads, g.head_dim, dtype=like.dtype, device=like.device)
        fill = torch.zeros(g.num_heads, g.head_dim, dtype=like.dtype, device=like.device)
        for i, (l, h) in enumerate(self.heads):
            if l != layer:
                continue
            keep[h] = 0
            if self.mode == "mean":
                fill[h] = self.means[i].to(device=like.device, dtype=like.dtype)
        cached = (keep.reshape(-1), fill.reshape(-1))
        self._tensors[layer] = cached
        return cached

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            keep, fill = self._layer_tensors(layer, x)
            return (x * keep + fill,) + tuple(args[1:])

        return hook

    def __enter__(self) -> "HeadAblation":
        self.remove()
        for layer in self.heads.layers:
            self._handles.append(self._projs[layer].register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ---------------------------------------------------------------- early exit and the capture forward

class StopForward(Exception):
    """Raised by EarlyExit's hook to abandon a forward once the needed layers have run."""


class EarlyExit:
    """Context manager: a forward on `model` stops at the attention output projection of `layer`
    (its input, i.e. that layer's head outputs, has been computed; nothing after it runs). Enter
    it *after* the HeadCapture whose hooks must see that input. Call the model through ``run``,
    which swallows the StopForward."""

    def __init__(self, model: nn.Module, layer: int):
        projs = sites.output_projections(model)
        if not 0 <= layer < len(projs):
            raise LitSahsError(f"early exit at layer {layer} is outside the target's {len(projs)} layers")
        self.model, self.layer, self._proj = model, layer, projs[layer]
        self._handle = None
        self.stopped = False

    def _hook(self, module, args):
        self.stopped = True
        raise StopForward()

    def __enter__(self) -> "EarlyExit":
        self.stopped = False
        self._handle = self._proj.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return exc[0] is StopForward  # a StopForward escaping a `with` block is the expected exit

    def run(self, **inputs) -> None:
        try:
            self.model(**inputs)
        except StopForward:
            pass
        if not self.stopped:
            raise LitSahsError(f"the forward never reached layer {self.layer}: early exit did not fire")


@torch.no_grad()
def capture_forward(target: Target, enc: dict, heads: HeadSet, early_exit: bool = False,
                    features=None, texts=None) -> torch.Tensor:
    """[batch, k, head_dim]: `heads` at the first-token position for an encoded batch, from one
    forward without a KV cache whose LM head runs on the last position only; with `early_exit` the
    forward stops after the deepest layer of `heads` (the same values, bit for bit). With extra
    `features` (a detector's ``feature_spec``) they follow the heads, [batch, k + slots, head_dim], from
    the same forward run to the end (the refusal feature needs the logits; the judge, `texts`)."""
    heads = heads.validate(target.geometry)
    model = target.model
    enc = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in enc.items()}
    if features:
        with capture_for(target, heads, features, texts) as cap:
            model(**enc, use_cache=False, logits_to_keep=1)
        return cap.selected()
    with HeadCapture(model, heads, target.geometry) as cap:
        if early_exit:
            with EarlyExit(model, max(heads.layers)) as stop:
                stop.run(**enc, use_cache=False)
        else:
            model(**enc, use_cache=False, logits_to_keep=1)
    return cap.selected()
