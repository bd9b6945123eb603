"""Captures over the prompt's own tokens, not one position: every head pooled over them
(``PooledHeadCapture``) and chosen heads' outputs at each of them (``TokenHeadCapture``).

"The prompt's own tokens" are ``prompting.user_token_mask``'s: the last user turn's text inside the
chat template. A capture takes that mask from its caller, or (``tokenizer=``) derives it itself
from the ``input_ids`` of the first forward it sees (a pre-hook on the model), so it works inside
any forward — extraction, a live DataModule, the guard's prefill inside ``generate`` — and finds
the same tokens there. Like every capture in ``lit_sahs.hooks``, only the prefill is recorded
(each hook removes itself after it fires once) and the hooks are always removed on exit.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lit_sahs.data.extra_features import POOLS, check_pools
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet
from lit_sahs.targets import sites
from lit_sahs.targets.prompting import user_token_mask


class PromptMask:
    """The user mask of the forward being captured: given, or derived from the first forward's ids.
    Several captures of one forward can share one (pass it as their ``user_mask``): it is derived once."""

    def __init__(self, model: nn.Module, user_mask: Optional[torch.Tensor], tokenizer):
        if user_mask is None and tokenizer is None:
            raise LitSahsError("a capture over the prompt's tokens needs the user mask or the target's tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.given = None if user_mask is None else user_mask.bool()
        self.mask: Optional[torch.Tensor] = self.given
        self._handle = None

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise LitSahsError("the forward has no input_ids (embeddings were passed): the prompt's tokens "
                               "cannot be found")
        attention = kwargs.get("attention_mask")
        attention = torch.ones_like(ids) if attention is None else attention
        self.mask = user_token_mask(self.tokenizer, ids, attention)
        self._handle.remove()
        self._handle = None

    def __enter__(self) -> "PromptMask":
        if self._handle is not None:  # a second capture sharing this mask entered the same forward
            return self
        self.mask = self.given
        if self.given is None:
            self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def for_batch(self, b: int, t: int, device) -> torch.Tensor:
        """[b, t, 1] bool on `device`; refuses a mask of another shape or a row without own tokens."""
        if self.mask is None:
            raise LitSahsError("no user mask for this forward: the model's pre-hook did not fire")
        if tuple(self.mask.shape) != (b, t):
            raise LitSahsError(f"user mask {tuple(self.mask.shape)} does not match the batch ({b}, {t})")
        if not bool(self.mask.any(dim=1).all()):
            raise LitSahsError("a prompt has no tokens of its own to pool over")
        return self.mask.to(device)[:, :, None]


class _PromptCapture:
    """What the captures here share: the prompt's mask, one pre-hook per layer they read that removes
    itself after the prefill, and every hook removed on exit. Subclasses say which layers
    (``_layers``), what to clear before a forward (``_reset``) and what to keep of a layer's
    input [batch, seq, heads*head_dim] (``_record``)."""

    def _attach(self, model: nn.Module, user_mask: "Optional[torch.Tensor | PromptMask]", tokenizer) -> None:
        self.prompt = user_mask if isinstance(user_mask, PromptMask) else PromptMask(model, user_mask, tokenizer)
        self._projs = sites.output_projections(model)
        self._handles: dict[int, torch.utils.hooks.RemovableHandle] = {}

    def _layers(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _reset(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _record(self, layer: int, x: torch.Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hook(self, layer: int):
        def hook(module, args):
            with torch.no_grad():
                self._record(layer, args[0])
            handle = self._handles.pop(layer, None)
            if handle is not None:
                handle.remove()

        return hook

    def __enter__(self):
        self._reset()
        self.prompt.__enter__()
        for layer in self._layers():
            self._handles[layer] = self._projs[layer].register_forward_pre_hook(self._hook(layer))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self.prompt.__exit__(*exc)


class PooledHeadCapture(_PromptCapture):
    """Every head's output pooled over the prompt's own tokens, from the same pre-hooks as HeadCapture:
    ``pooled()`` gives {pool: [batch, layers, heads, head_dim]} for the pools asked for (mean, max)."""

    def __init__(self, model: nn.Module, user_mask: "Optional[torch.Tensor | PromptMask]" = None,
                 pools: "tuple[str, ...]" = POOLS, geometry: Optional[Geometry] = None, tokenizer=None):
        self.model, self.pools = model, check_pools(pools)
        if not self.pools:
            raise LitSahsError(f"no pooling asked for: use {' and/or '.join(POOLS)}")
        if torch.is_tensor(user_mask) and not bool(user_mask.bool().any(dim=1).all()):
            raise LitSahsError("a prompt has no tokens of its own to pool over")
        self.geometry = geometry or sites.geometry(model)
        self._attach(model, user_mask, tokenizer)
        self._records: dict[str, dict[int, torch.Tensor]] = {p: {} for p in self.pools}

    def _layers(self):
        return range(self.geometry.num_layers)

    def _reset(self) -> None:
        for recs in self._records.values():
            recs.clear()

    def _record(self, layer: int, x: torch.Tensor) -> None:
        g, (b, t) = self.geometry, x.shape[:2]
        m = self.prompt.for_batch(b, t, x.device)
        if "mean" in self.pools:
            mean = (x * m).sum(1) / m.sum(1)
            self._records["mean"][layer] = mean.reshape(b, g.num_heads, g.head_dim).float().cpu()
        if "max" in self.pools:
            mx = x.masked_fill(~m, float("-inf")).amax(1)
            self._records["max"][layer] = mx.reshape(b, g.num_heads, g.head_dim).float().cpu()

    def pooled(self) -> dict[str, torch.Tensor]:
        layers = range(self.geometry.num_layers)
        if any(l not in self._records[p] for p in self.pools for l in layers):
            raise LitSahsError("no pooled activations captured: run a forward inside the capture")
        return {p: torch.stack([self._records[p][l] for l in layers], dim=1) for p in self.pools}


def last_tokens_index(mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a [batch, seq] mask: (index [batch, length] into seq, valid [batch, length] bool) of each
    row's last `length` masked positions, right-aligned (slot length-1 is the row's last own token);
    slots before a short prompt's first token are invalid (index 0)."""
    mask = mask.bool()
    from_end = mask.flip(1).long().cumsum(1).flip(1)  # 1 at a row's last own token, 2 at the one before...
    keep = mask & (from_end <= length)
    slot = (length - from_end).clamp_min(0)
    index = torch.zeros(mask.shape[0], length, dtype=torch.long, device=mask.device)
    valid = torch.zeros(mask.shape[0], length, dtype=torch.bool, device=mask.device)
    rows, cols = keep.nonzero(as_tuple=True)
    index[rows, slot[rows, cols]] = cols
    valid[rows, slot[rows, cols]] = True
    return index, valid


class TokenHeadCapture(_PromptCapture):
    """`heads`' outputs at each of the prompt's last `length` own tokens: ``tokens()`` gives
    (values [batch, length, k, head_dim] float32, valid [batch, length] bool), right-aligned, zeros
    where a prompt is shorter. What an attention-pooling detector reads."""

    def __init__(self, model: nn.Module, heads: HeadSet, length: int,
                 user_mask: "Optional[torch.Tensor | PromptMask]" = None, geometry: Optional[Geometry] = None,
                 tokenizer=None):
        if length < 1:
            raise LitSahsError(f"token length must be >= 1, got {length}")
        self.model, self.length = model, int(length)
        self.geometry = geometry or sites.geometry(model)
        self.heads = HeadSet(heads).validate(self.geometry)
        if not len(self.heads):
            raise LitSahsError("no heads to record at the prompt's tokens")
        self._attach(model, user_mask, tokenizer)
        self._records: dict[int, torch.Tensor] = {}
        self._index: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # one per forward, shared by its layers

    def _layers(self):
        return self.heads.layers

    def _reset(self) -> None:
        self._records.clear()
        self._index = None

    def _record(self, layer: int, x: torch.Tensor) -> None:
        g, (b, t) = self.geometry, x.shape[:2]
        if self._index is None:
            self._index = last_tokens_index(self.prompt.for_batch(b, t, x.device)[:, :, 0], self.length)
        index, valid = self._index
        wanted = [h for l, h in self.heads if l == layer]
        rows = torch.gather(x, 1, index[:, :, None].expand(b, self.length, x.shape[2]).to(x.device))
        rows = rows.reshape(b, self.length, g.num_heads, g.head_dim)[:, :, wanted]
        self._records[layer] = (rows * valid[:, :, None, None].to(x.device)).float().cpu()

    def tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        if any(l not in self._records for l in self.heads.layers) or self._index is None:
            raise LitSahsError("no token activations captured: run a forward inside the capture")
        seen = {l: 0 for l in self.heads.layers}
        cols = []
        for l, _ in self.heads:  # HeadSet order
            cols.append(self._records[l][:, :, seen[l]])
            seen[l] += 1
        return torch.stack(cols, dim=2), self._index[1].cpu()
