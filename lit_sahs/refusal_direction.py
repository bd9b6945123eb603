"""The refusal direction of a target and its ablation in generation: the answer side's strong form.

A target's refusals are mediated largely by one direction of its residual stream (the difference
of the mean residual over harmful and over benign prompts at the post-instruction positions;
Arditi et al. 2024, "Refusal in language models is mediated by a single direction"). Projected out
of every layer's output, the target stops refusing, whatever words its refusal would open with.

A guard uses it on one side only: prompts its detector scores as clearly benign (``answer_below``,
``lit_sahs.answer_nudge``) decode with the direction ablated, so an over-refusal wrapped in a persona
tag ("[GAN]: I'm sorry, ...") is reached where a ban on refusal openings at the first position is
not. The decision comes from the prefill's scores, so the ablation starts at the first decode step:
the prefill (and the first token, whose refusal openings the nudge bans) runs unchanged, and a
prompt the guard passes costs no extra forward.

The direction comes from an activation store of the same target (``from_store``): the store's
``residual_layers`` extra records the residual stream at the first-token position, the post-instruction
position the seed paper's heads are read at. Rows of held-out families or sources are left out, so a
direction can be fitted on a detector's training rows alone. Which layer's direction removes refusals
differs by target and is picked by effect (``select_layer``, the paper's rule): the one whose ablation
leaves the least refusal-opening mass at the first position of the (kept) harmful rows, among the
recorded layers below 80% of the depth (a direction read near the output moves the logits directly
rather than the model's decision).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lit_sahs.data.holdout import Holdout
from lit_sahs.data.store import ActivationStore
from lit_sahs.errors import LitSahsError
from lit_sahs.heads import TargetFingerprint
from lit_sahs.io import atomic_write_bytes
from lit_sahs.refusal import encode_batches, first_token_logits, refusal_probability, refusal_token_ids
from lit_sahs.targets import sites

FORMAT = "lit_sahs.refusal_direction/1"


@dataclass(frozen=True)
class RefusalDirection:
    """A unit vector [hidden] of `fingerprint`'s residual stream, fitted at decoder layer `layer` on
    `rows` = {"harmful": n, "benign": n} store rows; `selection`: {layer: the harmful rows' mean refusal mass
    with that layer's direction ablated} where ``select_layer`` picked the layer (empty otherwise)."""

    vector: torch.Tensor
    layer: int
    fingerprint: TargetFingerprint
    rows: dict
    selection: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """One safetensors file (the vector, with layer, rows and fingerprint as metadata), written atomically."""
        meta = {"format": FORMAT, "layer": str(self.layer), "rows": json.dumps(self.rows),
                "fingerprint": json.dumps(self.fingerprint.to_dict()), "selection": json.dumps(self.selection)}
        atomic_write_bytes(path, save_tensors({"direction": self.vector.float().contiguous()}, metadata=meta))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "RefusalDirection":
        path = Path(path)
        if not path.is_file():
            raise LitSahsError(f"no refusal direction file at {path}: make one with `python -m lit_sahs direction`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            vector = load_tensors(path.read_bytes())["direction"]
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            fp = TargetFingerprint.from_dict(json.loads(meta["fingerprint"]))
            layer, rows = int(meta["layer"]), json.loads(meta["rows"])
            selection = {int(k): float(v) for k, v in json.loads(meta.get("selection") or "{}").items()}
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
            raise LitSahsError(f"{path} is not a refusal direction file ({type(e).__name__}: {e})") from None
        if vector.ndim != 1 or vector.numel() == 0 or not torch.isfinite(vector).all():
            raise LitSahsError(f"{path} holds a direction of shape {tuple(vector.shape)}: one finite vector is needed")
        return cls(vector / vector.norm(), layer, fp, rows, selection)

    def check(self, target) -> None:
        """Raise unless the direction was fitted on `target` (weights, geometry and residual width)."""
        self.fingerprint.check(target.fingerprint, "the refusal direction")
        width = int(sites.text_config(target.model.config).hidden_size)
        if self.vector.numel() != width:
            raise LitSahsError(f"the refusal direction has {self.vector.numel()} values but the target's residual "
                               f"stream has {width}")


def from_store(store: str | Path | ActivationStore, layer: Optional[int] = None,
               held_out: "Holdout | None" = None) -> RefusalDirection:
    """The normalised difference of the mean first-token residual over harmful and over benign rows at
    `layer` (one of the layers the store recorded; default: the recorded layer nearest the middle of the
    target, where refusal directions are usually found), leaving out the rows of `held_out`."""
    store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    if layer is None:
        middle = store.fingerprint.geometry.num_layers / 2
        layer = min(recorded_layers(store), key=lambda v: (abs(v + 1 - middle), v))
    return directions(store, [int(layer)], held_out)[int(layer)]


def recorded_layers(store: ActivationStore) -> list[int]:
    if "residual_layers" not in store.extra_names():
        raise LitSahsError(f"store {store.path} records no residual layers (extra 'residual_layers'): extract it "
                           "with the baseline extras to fit a refusal direction from it")
    return [int(v) for v in store.read_extra("residual_layer_ids", rows=[0])[0]]


def directions(store: ActivationStore, layers: list[int], held_out: "Holdout | None" = None) -> dict[int, RefusalDirection]:
    """``from_store``'s direction at each of `layers`, from one read of the kept rows' residuals."""
    recorded = recorded_layers(store)
    missing = [v for v in layers if v not in recorded]
    if missing:
        raise LitSahsError(f"store {store.path} recorded the residual stream at layers {recorded}, not at {missing[0]}")
    keep = np.array((held_out or Holdout()).keeps(store.index()), dtype=bool)
    labels = store.labels()
    counts = {"harmful": int((keep & (labels == 1)).sum()), "benign": int((keep & (labels == 0)).sum())}
    if not counts["harmful"] or not counts["benign"]:
        raise LitSahsError(f"a refusal direction needs harmful and benign rows; store {store.path} has "
                           f"{counts['harmful']} harmful and {counts['benign']} benign outside the held-out ones")
    res, y = store.read_extra("residual_layers", rows=np.flatnonzero(keep)).astype(np.float64), labels[keep]
    out = {}
    for layer in layers:
        at = res[:, recorded.index(layer)]
        diff = at[y == 1].mean(0) - at[y == 0].mean(0)
        norm = float(np.linalg.norm(diff))
        if not np.isfinite(norm) or norm == 0.0:
            raise LitSahsError(f"the harmful and benign rows of store {store.path} have the same mean residual at layer {layer}")
        out[layer] = RefusalDirection(torch.from_numpy(diff / norm).float(), int(layer), store.fingerprint, dict(counts))
    return out


def select_layer(target, store: str | Path | ActivationStore, held_out: "Holdout | None" = None,
                 max_rows: int = 64, batch_size: int = 8, seed: int = 0, progress: bool = False) -> RefusalDirection:
    """The direction of the recorded layer (below 80% of the depth) whose ablation, at every position
    of a forward, leaves the kept harmful rows the least refusal-opening mass at the first position
    (``refusal.refusal_probability``); up to `max_rows` of them (drawn with `seed`) are scored per layer."""
    store = store if isinstance(store, ActivationStore) else ActivationStore.open(store)
    store.fingerprint.check(target.fingerprint, f"store {store.path}")
    layers = recorded_layers(store)
    candidates = [v for v in layers if v < 0.8 * store.fingerprint.geometry.num_layers] or layers
    fitted = directions(store, candidates, held_out)
    index = store.index()
    keep = (held_out or Holdout()).keeps(index)
    harmful = [r["text"] for r, k in zip(index, keep) if k and int(r["label"]) == 1]
    if len(harmful) > max_rows:
        harmful = [harmful[i] for i in sorted(np.random.default_rng(seed).choice(len(harmful), max_rows, replace=False))]
    ids, batches = refusal_token_ids(target.tokenizer), encode_batches(target, harmful, batch_size)
    from tqdm.auto import tqdm

    selection = {}
    for layer in tqdm(candidates, desc="refusal direction layers", unit="layer", disable=not progress, leave=False):
        masses = []
        with torch.no_grad(), DirectionAblation(target.model, fitted[layer]) as ab:
            for enc in batches:
                ab.rows = torch.ones(enc["input_ids"].shape[0], dtype=torch.bool)
                masses.append(refusal_probability(first_token_logits(target.model, enc), ids).double().cpu())
        selection[layer] = float(torch.cat(masses).mean())
    best = min(candidates, key=lambda v: (selection[v], v))
    return replace(fitted[best], selection=selection)


class DirectionAblation:
    """Context manager: while ``rows`` ([batch] bool) is set, every decoder layer's output loses its
    component along the direction in those rows (x - (x . r) r), at every position of the forward;
    ``rows`` None (the start) leaves every forward as it is. Hooks are removed on exit."""

    def __init__(self, model: torch.nn.Module, direction: RefusalDirection):
        self.blocks = sites.decoder_layers(model)
        self.vector = direction.vector
        self._rows: Optional[torch.Tensor] = None
        self._handles: list = []

    @property
    def rows(self) -> Optional[torch.Tensor]:
        return self._rows

    @rows.setter
    def rows(self, rows: Optional[torch.Tensor]) -> None:
        # decided once per generate: no host sync per layer and step, and no-op hooks when no row is chosen
        self._rows = rows if rows is not None and bool(rows.any()) else None

    def _hook(self, module, args, output):
        if self._rows is None:
            return None
        h = output if torch.is_tensor(output) else output[0]
        r = self.vector.to(device=h.device, dtype=h.dtype)
        keep = self._rows.to(h.device).view(-1, *([1] * (h.dim() - 1)))
        h = torch.where(keep, h - (h @ r).unsqueeze(-1) * r, h)
        return h if torch.is_tensor(output) else (h,) + tuple(output[1:])

    def __enter__(self) -> "DirectionAblation":
        self._handles = [b.register_forward_hook(self._hook) for b in self.blocks]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.rows = None
