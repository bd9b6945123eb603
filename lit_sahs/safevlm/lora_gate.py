"""Stage II's LoRA engaged per prompt by SafeVLM's own safety head.

Stage II's adapter makes the target refuse by itself, and it moves held-out benign prompts too: the
language model learns "refuse what sounds alarming" from a few hundred rows. ``LoRAGate`` keeps the
adapter for the prompts the safety head finds risky and decodes the rest as the stage-I model does
(the target's own weights, the safety tokens in place), so stage II's extra refusals are spent only
where the head's risk is at least ``threshold``.

The decision costs nothing extra: LoRA sits on the layers from ``SafeVLM.lora_first_layer()`` on, and every
input of the safety head (the feature layer, the joined heads) is taken before them. A pre-hook on
that first LoRA layer classifies the prefill's rows there. In a mixed batch, pre-hooks on the LoRA
layers then hand peft one adapter name a row (``"__base__"`` for the rows below ``threshold``, peft's
mixed-batch forward), so the adapter's matmuls run on the rows that keep it only — during the prefill
and every decode step after it (the KV cache then holds each row's own kind of states). When no row of
the batch reaches ``threshold`` the adapters are switched off for the rest of the generate (peft's
``enable_adapters(False)``), so a batch of low-risk prompts runs the target's own linear layers only;
when every row does, the layers run as they are.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn

from lit_sahs.errors import LitSahsError
from lit_sahs.safevlm.forward import SafetyForward
from lit_sahs.targets import sites


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft LoRA layer in `model` (the wrappers that hold ``lora_A`` / ``lora_B``)."""
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def switch_off(layers: list[nn.Module]) -> list[tuple[nn.Module, dict[str, bool]]]:
    """Switch the adapters of `layers` off (peft skips their matmuls); returns what ``switch_back`` restores."""
    switched = []
    for layer in layers:
        if not layer.disable_adapters:
            grads = {n: p.requires_grad for n, p in layer.named_parameters() if "lora_" in n}
            layer.enable_adapters(False)
            switched.append((layer, grads))
    return switched


def switch_back(switched: list[tuple[nn.Module, dict[str, bool]]]) -> None:
    for layer, grads in switched:
        layer.enable_adapters(True)
        for n, p in layer.named_parameters():  # enable_adapters(True) marks them trainable: undo that
            if n in grads:
                p.requires_grad_(grads[n])


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run `model` as stage I does: every LoRA adapter off inside the block, as it was after it."""
    switched = switch_off(lora_layers(model))
    try:
        yield
    finally:
        switch_back(switched)


def check_lora_threshold(det, threshold: Optional[float]) -> Optional[float]:
    """`threshold` as a float (None stays None) for SafeVLM `det`, which must carry a stage-II adapter."""
    if threshold is None:
        return None
    t = float(threshold)
    if math.isnan(t):
        raise LitSahsError("lora_threshold is NaN: give a risk in [0, 1], or none to keep LoRA on for every prompt")
    if not det.lora:
        raise LitSahsError("lora_threshold gates stage II's LoRA adapter: this SafeVLM has none "
                           "(a stage-I artifact); leave lora_threshold unset")
    return t


class LoRAGate:
    """A context for one generate over a ``with_slots`` batch (inside the same ``SafetyForward``):
    rows whose safety-head risk is below `threshold` decode without the LoRA adapter. ``engaged`` [B]
    bool says which rows kept it (None until the prefill reached the first LoRA layer). A row whose
    risk cannot be computed (NaN) keeps the adapter: the gate fails towards refusing. `decided` [B] bool:
    which rows keep it, already known (a hinted prompt's second generate keeps its first one's decision,
    which was made on the user's prompt, not on the hint in front of it)."""

    def __init__(self, det, fwd: SafetyForward, threshold: float, decided: Optional[Tensor] = None):
        self.det, self.fwd, self.threshold = det, fwd, check_lora_threshold(det, threshold)
        self.decided = None if decided is None else torch.as_tensor(decided, dtype=torch.bool)
        model = det.target.model
        self._first = sites.decoder_layers(model)[det.lora_first_layer()]
        self._lora = lora_layers(model)
        if not self._lora:
            raise LitSahsError("the target carries no LoRA adapter: prepare the SafeVLM on it first")
        self._handles: list = []
        self._switched_off: list[tuple[nn.Module, dict[str, bool]]] = []  # (layer, its adapters' requires_grad)
        self._all_engaged = False
        self._names: dict[str, list[str]] = {}  # adapter -> one name a row for peft's mixed-batch forward
        self.engaged: Optional[Tensor] = None

    def _decide(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self.engaged is None and hidden is not None and hidden.dim() == 3 \
                and hidden.shape[1] == self.fwd.slot_mask.shape[1]:  # the prefill, not a decode step
            if self.decided is not None:
                if len(self.decided) != hidden.shape[0]:
                    raise LitSahsError(f"the LoRA gate was given {len(self.decided)} decisions for {hidden.shape[0]} rows")
                self._engage(self.decided.to(hidden.device))
                return
            try:
                risk = self.det.risk(self.det.classify_forward(self.fwd)[0])
            except Exception:  # noqa: BLE001 - the guard's own gate reports (or raises) the scoring failure
                risk = torch.full((hidden.shape[0],), float("nan"), dtype=torch.float64, device=hidden.device)
            self._engage((risk >= self.threshold) | torch.isnan(risk))

    def _engage(self, engaged: Tensor) -> None:
        self.engaged = engaged
        self._all_engaged = bool(engaged.all())
        self._names.clear()
        if not bool(engaged.any()):
            self._switch_off()

    def _switch_off(self) -> None:
        """No row keeps the adapter: skip its matmuls from here on (not only zero their output)."""
        self._switched_off += switch_off(self._lora)

    def _switch_back(self) -> None:
        switch_back(self._switched_off)
        self._switched_off.clear()

    def _route(self, module, args, kwargs):
        """Before a LoRA layer: in a mixed batch, peft's per-row adapter names (the adapter for the rows that
        keep it, ``"__base__"`` for the rest), so the adapter's matmuls see the engaged rows only."""
        if self.engaged is None:
            raise LitSahsError("a LoRA layer ran before the safety head's risk was known: the gate needs "
                               "every LoRA layer at or past SafeVLM.lora_first_layer()")
        if self._all_engaged or module.disable_adapters:
            return None  # every row keeps the adapter (or none does: switched off)
        active = module.active_adapters
        if len(active) != 1:
            raise LitSahsError(f"the LoRA gate routes rows to one adapter; this layer has {len(active)} active")
        names = self._names.get(active[0])
        if names is None:
            names = self._names[active[0]] = [active[0] if e else "__base__" for e in self.engaged.tolist()]
        return args, {**kwargs, "adapter_names": names}

    def __enter__(self) -> "LoRAGate":
        self._handles.append(self._first.register_forward_pre_hook(self._decide, with_kwargs=True))
        self._handles += [m.register_forward_pre_hook(self._route, with_kwargs=True) for m in self._lora]
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._switch_back()
        return False
