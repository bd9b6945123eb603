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
  ``hidden_states[k]``) and, for vision-language targets, the vision patch features: the input
  of the target's own vision projector (``sites.vision_projector``: LLaVA's projector, Idefics3's
  connector, Qwen2-VL's patch merger), split per prompt by its image tokens
  (``sites.vision_features_per_prompt``) into ``patches`` [B, P, Dv], zero-padded with
  ``patch_padding`` [B, P] where rows differ (image sizes, tiles, a prompt without an image);
* with ``heads`` (a HeadSet: joined heads), records those attention heads' outputs at each row's
  first-token position (``hooks.HeadCapture``) in the same forward: ``head_outputs`` [B, k, D];
* with ``stop=True`` abandons the forward once those are taken (scoring needs nothing later).

Stage II puts LoRA only on layers at or above ``feature_layer``, so the features the frozen
safety head reads are the same with and without the adapter.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, HeadSet
from lit_sahs.hooks import HeadCapture, StopForward
from lit_sahs.targets import prompting, sites

IGNORE_INDEX = -100


# per-token inputs besides input_ids / attention_mask that move with their tokens (slots and answer: 0, text)
TOKEN_ALIGNED = ("mm_token_type_ids", "token_type_ids")


def with_slots(enc: dict, n_slots: int, pad_id: int, answers: Optional[Sequence[Sequence[int]]] = None) -> dict:
    """[pad][prompt[0]][slots][prompt[1:]][answer] rows, left-padded. Returns model inputs (input_ids,
    attention_mask, position_ids, the prompt's image tensors unchanged, per-token inputs such as
    Qwen2-VL's ``mm_token_type_ids`` moved with their tokens) plus ``slot_mask``,
    ``prompt_mask`` [B, T] bool, ``first_pos`` [B] (the last prompt position: where the first
    answer token is predicted) and, with answers, ``labels`` (-100 except the answer tokens).
    Where ``enc`` has no position_ids (Qwen2-VL with images: the model computes its 3-D positions
    from input_ids, mm_token_type_ids and the mask) none are added."""
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
    for key in TOKEN_ALIGNED:
        if torch.is_tensor(enc.get(key)):
            src = enc[key]
            moved = torch.zeros((B, width), dtype=src.dtype)
            for b in range(B):
                own = src[b][mask[b]]
                moved[b, prompt_mask[b]] = own  # the prompt's positions (slots excluded), in order
            out[key] = moved
    out.update(input_ids=input_ids, attention_mask=attention, slot_mask=slot_mask, prompt_mask=prompt_mask,
               first_pos=first_pos)
    if "position_ids" in enc:
        out["position_ids"] = prompting.position_ids_from_mask(attention)
    if answers is not None:
        out["labels"] = labels
    return out


MODEL_KEYS_DROPPED = ("slot_mask", "prompt_mask", "first_pos", "labels", "y", "level", "type", "family", "source")


def answer_logits(batch: dict) -> dict:
    """``logits_to_keep`` for a forward over a batch with answer ``labels``: the answers sit at the end
    of every row, so the LM head runs on the positions from the earliest ``first_pos`` (where a row's
    first answer token is predicted) to the end only. A full
    [batch, seq, vocab] would dominate memory on long prompts (a 1,100-token jailbreak with a
    152k vocabulary is 0.7 GB of float32 logits per row, before its gradient)."""
    if batch.get("labels") is None:
        return {}
    return {"logits_to_keep": int(batch["input_ids"].shape[1] - batch["first_pos"].min())}  # from first_pos on


def model_inputs(batch: dict) -> dict:
    """The keys of a ``with_slots`` batch the target's forward takes."""
    return {k: v for k, v in batch.items() if k not in MODEL_KEYS_DROPPED}


class SafetyForward:
    """Hooks for one forward (or one generate) over a ``with_slots`` batch; see the module docstring.
    After the forward: ``query`` [B, H] (embedding at the first-token position), ``features``
    [B, T, F], ``padding`` [B, T] (True outside the prompt), ``patches`` [B, P, Dv] or None and
    ``patch_padding`` [B, P] (True past a row's own patches) or None when no row is padded.
    ``vision`` needs the batch's ``input_ids`` (their image tokens say which patches are whose)."""

    def __init__(self, model: nn.Module, input_tokens: Tensor, feature_layer: int, slot_mask: Tensor,
                 prompt_mask: Tensor, first_pos: Tensor, vision: bool = False, stop: bool = False,
                 input_ids: Optional[Tensor] = None, heads: Optional[HeadSet] = None,
                 geometry: Optional[Geometry] = None):
        self.model, self.tokens, self.feature_layer = model, input_tokens, int(feature_layer)
        self.slot_mask, self.prompt_mask, self.first_pos = slot_mask, prompt_mask, first_pos
        self.vision, self.stop, self.input_ids = vision, stop, input_ids
        if vision and input_ids is None:
            raise LitSahsError("SafetyForward reads images only with the batch's input_ids (pass input_ids=...)")
        layers = sites.decoder_layers(model)
        if not 0 <= self.feature_layer <= len(layers):
            raise LitSahsError(f"feature_layer {feature_layer} is outside 0..{len(layers)} for this target")
        self._layers = layers
        self.capture = HeadCapture(model, heads, geometry, positions=first_pos) if heads is not None else None
        self._handles: list = []
        self.query: Optional[Tensor] = None
        self.features: Optional[Tensor] = None
        self._vision_input: Optional[Tensor] = None
        self._patches: Optional[tuple[Tensor, Optional[Tensor]]] = None
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

    @property
    def patches(self) -> Optional[Tensor]:
        return self._split()[0]

    @property
    def patch_padding(self) -> Optional[Tensor]:
        return self._split()[1]

    def _split(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The captured projector input as [B, P, Dv] per prompt (+ padding), computed once."""
        if self._vision_input is None:
            return None, None
        if self._patches is None:
            ids = self.input_ids.to(self._vision_input.device)
            rows = sites.vision_features_per_prompt(self.model, self._vision_input, ids)
            lengths = [r.shape[0] for r in rows]
            longest = max(lengths)
            if longest == 0:
                return None, None
            patches = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # zero-padded to the longest
            padding = torch.arange(longest, device=patches.device)[None, :] >= torch.tensor(
                lengths, device=patches.device)[:, None]
            self._patches = (patches, padding if bool(padding.any()) else None)
        return self._patches

    def _vision_hook(self, module, args):
        if self._vision_input is None and args:
            self._vision_input = args[0]
            if self.features is not None:  # the features came first (feature_layer 0): nothing else is needed
                self._maybe_stop()

    def _maybe_stop(self) -> None:
        if self.stop and self.features is not None and (not self.vision or self._vision_input is not None) \
                and (self.capture is None or self.capture.complete):
            raise StopForward()

    def _heads_hook(self, module, args, output):
        self._maybe_stop()  # the deepest joined head's layer has run

    @property
    def head_outputs(self) -> Optional[Tensor]:
        """[B, k, head_dim]: the joined heads at each row's first-token position, or None without heads."""
        return self.capture.selected() if self.capture is not None else None

    def __enter__(self) -> "SafetyForward":
        self._armed = True
        if self.vision:  # registered first: the vision tower runs before the language model's layers
            self._handles.append(sites.vision_projector(self.model).register_forward_pre_hook(self._vision_hook))
        self._handles.append(self.model.get_input_embeddings().register_forward_hook(self._embed_hook))
        if self.feature_layer > 0:
            self._handles.append(self._layers[self.feature_layer - 1].register_forward_hook(self._layer_hook))
        if self.capture is not None:
            self.capture.__enter__()
            self._handles.append(self.capture)
            self._handles.append(self._layers[max(self.capture.layers)].register_forward_hook(self._heads_hook))
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

