"""The target side of SafeVLM: safety-token slots in the input sequence and the taps the safety
head reads, as hooks on an unmodified target.

``with_slots`` turns a left-padded prompt batch (``prompting.encode``) into the sequence SafeVLM
runs: ``[padding][prompt's first token][n safety-token slots][rest of the prompt][answer + EOS]``
(the answer only when training; the first token stays first because decoders use it as their
attention sink),
with the masks the head needs. ``SafetyForward`` is a context manager that, for the next forward
over that batch (the prefill of ``generate`` included):

* writes the learnable input safety tokens into the slots (a forward hook on the input embedding;
  decode steps, one position long, pass untouched);
* keeps the prompt's token embeddings (the head's queries), the hidden states at
  ``feature_layer`` (0: the embeddings; k: the output of decoder layer k-1, as Hugging Face's
  ``hidden_states[k]``) and, for LLaVA-style targets, the vision patch features;
* with ``stop=True`` abandons the forward once those are taken (scoring needs nothing later).

Stage II puts LoRA only on layers at or above ``feature_layer``, so the features the frozen
safety head reads are the same with and without the adapter.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lit_sahs.errors import LitSahsError
from lit_sahs.runtime import StopForward
from lit_sahs.targets import prompting, sites

IGNORE_INDEX = -100


def with_slots(enc: dict, n_slots: int, pad_id: int, answers: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """[pad][prompt[0]][slots][prompt[1:]][answer] rows, left-padded. Returns model inputs (input_ids,
    attention_mask, position_ids, and the prompt's image tensors unchanged) plus ``slot_mask``,
    ``prompt_mask`` [B, T] bool, ``first_pos`` [B] (the last prompt position: where the first
    answer token is predicted) and, with answers, ``labels`` (-100 except the answer tokens)."""
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    rows = []
    for b in range(ids.shape[0]):
        prompt = ids[b][mask[b]].tolist()
        answer = list(answers[b]) if answers is not None else []
        rows.append((prompt, answer))
    width = max(n_slots + len(p) + len(a) for p, a in rows)
    B = len(rows)
    input_ids = torch.full((B, width), int(pad_id), dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    slot_mask = torch.zeros((B, width), dtype=torch.bool)
    prompt_mask = torch.zeros((B, width), dtype=torch.bool)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    first_pos = torch.zeros(B, dtype=torch.long)
    for b, (prompt, answer) in enumerate(rows):
        # [prompt[0]][slots][prompt[1:]][answer]: the prompt's first token keeps its place at the start
        # (decoders use it as their attention sink; a learnable vector there would disturb every layer)
        start = width - (n_slots + len(prompt) + len(answer))
        s0, s1 = start + 1, start + 1 + n_slots
        a0 = s1 + len(prompt) - 1
        input_ids[b, start] = prompt[0]
        input_ids[b, s1:a0] = torch.tensor(prompt[1:], dtype=torch.long)
        if answer:
            input_ids[b, a0:] = torch.tensor(answer, dtype=torch.long)
            labels[b, a0:] = torch.tensor(answer, dtype=torch.long)
        attention[b, start:] = 1
        slot_mask[b, s0:s1] = True
        prompt_mask[b, start] = True
        prompt_mask[b, s1:a0] = True
        first_pos[b] = a0 - 1
    out = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "position_ids")}
    out.update(input_ids=input_ids, attention_mask=attention, position_ids=prompting.position_ids_from_mask(attention),
               slot_mask=slot_mask, prompt_mask=prompt_mask, first_pos=first_pos)
    if answers is not None:
        out["labels"] = labels
    return out


MODEL_KEYS_DROPPED = ("slot_mask", "prompt_mask", "first_pos", "labels", "y", "level", "type", "family")


def model_inputs(batch: dict) -> dict:
    """The keys of a ``with_slots`` batch the target's forward takes."""
    return {k: v for k, v in batch.items() if k not in MODEL_KEYS_DROPPED}


class SafetyForward:
    """Hooks for one forward (or one generate) over a ``with_slots`` batch; see the module docstring.
    After the forward: ``query`` [B, H] (embedding at the first-token position), ``features``
    [B, T, F], ``padding`` [B, T] (True outside the prompt), ``patches`` [B, P, Dv] or None."""

    def __init__(self, model: nn.Module, input_tokens: Tensor, feature_layer: int, slot_mask: Tensor,
                 prompt_mask: Tensor, first_pos: Tensor, vision: bool = False, stop: bool = False):
        self.model, self.tokens, self.feature_layer = model, input_tokens, int(feature_layer)
        self.slot_mask, self.prompt_mask, self.first_pos = slot_mask, prompt_mask, first_pos
        self.vision, self.stop = vision, stop
        layers = sites.decoder_layers(model)
        if not 0 <= self.feature_layer <= len(layers):
            raise LitSahsError(f"feature_layer {feature_layer} is outside 0..{len(layers)} for this target")
        self._layers = layers
        self._handles: list = []
        self.query: Optional[Tensor] = None
        self.features: Optional[Tensor] = None
        self.patches: Optional[Tensor] = None
        self._armed = False

    @property
    def padding(self) -> Tensor:
        return ~self.prompt_mask.to(self.features.device)

    def _embed_hook(self, module, args, output: Tensor):
        if not self._armed or output.dim() != 3 or output.shape[1] != self.slot_mask.shape[1]:
            return None  # decode steps and unrelated calls
        self._armed = False
        slots = self.slot_mask.to(output.device)
        B, n = output.shape[0], self.tokens.shape[0]
        if int(slots.sum()) != B * n:
            raise LitSahsError(f"{int(slots.sum())} safety-token slots in a batch of {B} rows, expected {B * n}: "
                               "build the batch with with_slots and the same number of safety tokens")
        out = output.clone()
        out[slots] = self.tokens.to(output.dtype).repeat(B, 1)  # row-major: each row's slots in order
        rows = torch.arange(out.shape[0], device=out.device)
        self.query = out[rows, self.first_pos.to(out.device)]
        if self.feature_layer == 0:
            self.features = out
            self._maybe_stop()
        return out

    def _layer_hook(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if self.features is None and hidden.dim() == 3 and hidden.shape[1] == self.slot_mask.shape[1]:
            self.features = hidden
            self._maybe_stop()

    def _vision_hook(self, module, args):
        if self.patches is None and args:
            self.patches = args[0]

    def _maybe_stop(self) -> None:
        if self.stop and (not self.vision or self.patches is not None):
            raise StopForward()

    def __enter__(self) -> "SafetyForward":
        self._armed = True
        if self.vision:  # registered first: the vision tower runs before the language model's layers
            self._handles.append(sites.vision_projector(self.model).register_forward_pre_hook(self._vision_hook))
        self._handles.append(self.model.get_input_embeddings().register_forward_hook(self._embed_hook))
        if self.feature_layer > 0:
            self._handles.append(self._layers[self.feature_layer - 1].register_forward_hook(self._layer_hook))
        return self

    def __exit__(self, *exc) -> bool:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._armed = False
        return exc[0] is StopForward

    def run(self, **inputs):
        """Run the model on `inputs`; with ``stop`` returns None once the features are taken."""
        try:
            return self.model(**inputs)
        except StopForward:
            return None

