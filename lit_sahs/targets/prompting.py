"""Chat template + images -> a left-padded batch; the one definition of the first-token position.

The first-token position is the prompt position whose output produces the first generated
token: the last prompt token, *after* the chat template's assistant prefix. With left padding
that is the last column of every row, which is why every batch here is left-padded.

Images: each prompt has its own list of images (none, one path, or several). The chat template
puts one image placeholder per image before the text; the processor then expands each
placeholder into that image's tokens (LLaVA: a fixed count; LLaVA-NeXT, Qwen2-VL, Idefics3: a
count that depends on the image size). Left padding keeps the first-token position in the last
column whatever those counts are.

Positions: for ordinary rotary or absolute-position models the position ids are computed here
from the attention mask, so padding does not shift them. Qwen2-VL / Qwen2.5-VL use 3-D
"mrope" positions (time, height, width) for image tokens; their model computes those itself
from input_ids, the image grid and the attention mask (padding skipped), so for a batch with
images nothing is passed and for a text-only batch the 2-D ids from the mask are passed (the
model broadcasts them to its three rotary sections).
"""
from __future__ import annotations

from dataclasses import dataclass
import logging
import os
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from lit_sahs.choices import truncate_side
from lit_sahs.errors import LitSahsError

FIRST_TOKEN_INDEX = -1  # column of the first-token position in a left-padded batch
POSITION_RULE = "last_prompt_token_after_assistant_prefix"

ImageSpec = Union[None, str, "os.PathLike", Sequence[str]]  # per prompt: no image, one path, or a list


ROLES = ("system", "user", "assistant")


def conversation(messages: Sequence[dict], sid: str = "") -> list[dict]:
    """`messages` checked as a conversation the chat template renders: {role, content} dicts with
    role system, user or assistant and text content, ending with a user turn (the assistant prefix
    then follows it, so the first-token position stays the last prompt position)."""
    where = f"sample {sid}: " if sid else ""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LitSahsError(f"{where}a conversation is a non-empty list of messages")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LitSahsError(f"{where}message {n} must be {{role: {' | '.join(ROLES)}, content: text}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise LitSahsError(f"{where}the last message must be the user's (the answer follows it)")
    return out


def is_conversation(prompt) -> bool:
    """A prompt given as a list of chat messages rather than one user text."""
    return isinstance(prompt, (list, tuple))


def prompt_text(prompt) -> str:
    """The text a prompt asks about: itself, or a checked conversation's last user turn."""
    return prompt[-1]["content"] if is_conversation(prompt) else prompt


def prefixed(prompt, prefix: str):
    """`prompt` with `prefix` before its text (a conversation: before its last user turn)."""
    if is_conversation(prompt):
        return [*prompt[:-1], {**prompt[-1], "content": prefix + prompt[-1]["content"]}]
    return prefix + prompt


def chat_messages(text: str, with_image: Union[bool, int] = False) -> list[dict]:
    """One user turn; `with_image` is a flag (one image) or the number of images, which come
    before the text as in LLaVA, Qwen2-VL and Idefics3 examples."""
    n = int(with_image)
    if n:
        return [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}]
    return [{"role": "user", "content": text}]


def render_prompt(template_owner, text, with_image: Union[bool, int] = False) -> str:
    """The full prompt string the target sees, assistant prefix included. `text` is one user turn
    or a conversation (``conversation``: system prompt, earlier turns, the last user turn)."""
    if is_conversation(text):
        if with_image:
            raise LitSahsError("images are placed in single-turn prompts only: give the image with a text prompt")
        if not getattr(template_owner, "chat_template", None):
            raise LitSahsError("this target has no chat template, so it cannot render a conversation")
        return template_owner.apply_chat_template(conversation(text), tokenize=False, add_generation_prompt=True)
    if getattr(template_owner, "chat_template", None):
        return template_owner.apply_chat_template(
            chat_messages(text, with_image), tokenize=False, add_generation_prompt=True
        )
    if with_image:
        raise LitSahsError("this target has no chat template, so it cannot place an image in the prompt")
    return text


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token: left padding must not shift them
    (absolute-position models would otherwise see different positions in a batch)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_image(path: str, sample_id: str = "") -> Image.Image:
    """An RGB image, fully decoded now (PIL opens lazily), or one error naming the sample."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise LitSahsError(f"sample {sample_id}: image {path} does not exist") from None
    except IsADirectoryError:
        raise LitSahsError(f"sample {sample_id}: image {path} is a directory, not an image file") from None
    except Exception as e:  # PIL raises several types for undecodable files
        raise LitSahsError(f"sample {sample_id}: image {path} cannot be decoded ({type(e).__name__}: {e})") from None


def image_list(spec: ImageSpec) -> list[str]:
    """A prompt's images as a list of paths: None -> [], one path -> [path], a list stays."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        return [str(spec)]
    return [str(p) for p in spec]


def image_placeholder(processor) -> Optional[str]:
    """The text the processor expands into an image's tokens (<image>, <|image_pad|>, ...)."""
    token = getattr(processor, "image_token", None)
    return token if isinstance(token, str) and token else None


def encode(target, texts: Sequence, images: Optional[Sequence[ImageSpec]] = None,
           ids: Optional[Sequence[str]] = None) -> dict:
    """Tokenise a batch for `target` with left padding; returns model kwargs (position_ids from the
    mask where the model does not compute its own). `texts[i]` is one user turn or a conversation
    (a list of {role, content} messages); `images[i]` is prompt i's image path, list of paths, or None."""
    return Encoder.of(target)(texts, images, ids)


@dataclass
class Encoder:
    """What encoding needs from a target, without its weights: a DataLoader worker can hold it
    (tokenising and preprocessing images there, beside the forward) without a copy of the model."""

    name: str
    tokenizer: Any
    processor: Any
    dtype: Optional[torch.dtype]  # floating inputs (pixel values) are cast to the model's dtype
    mrope: bool  # the model computes its own 3-D positions (Qwen2-VL family)

    @classmethod
    def of(cls, target) -> "Encoder":
        return cls(target.name, target.tokenizer, getattr(target, "processor", None), _float_dtype(target),
                   _uses_mrope(target))

    def __call__(self, texts: Sequence[str], images: Optional[Sequence[ImageSpec]] = None,
                 ids: Optional[Sequence[str]] = None) -> dict:
        texts = list(texts)
        if not texts:
            raise LitSahsError("empty batch: nothing to encode")
        per_row = [image_list(s) for s in images] if images is not None else [[] for _ in texts]
        ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
        if not (len(per_row) == len(ids) == len(texts)):
            raise LitSahsError(f"encode got {len(texts)} texts, {len(per_row)} image entries and {len(ids)} ids: "
                               "give one of each per prompt")
        processor = self.processor
        if processor is None:
            bad = next((i for i, ims in zip(ids, per_row) if ims), None)
            if bad is not None:
                raise LitSahsError(f"sample {bad} has an image but target {self.name!r} is text-only: "
                                   "use a vision-language target or drop the image")
        owner = processor if processor is not None else self.tokenizer
        prompts = []
        for t, ims, i in zip(texts, per_row, ids):
            try:
                prompts.append(render_prompt(owner, t, len(ims)))
            except LitSahsError as e:
                raise LitSahsError(f"sample {i}: {e}") from None
        self.tokenizer.padding_side = "left"
        if processor is not None:
            _check_placeholders(self, processor, prompts, per_row, ids)
            processor.tokenizer.padding_side = "left"
            if any(per_row):
                pil = [[load_image(p, i) for p in ims] for ims, i in zip(per_row, ids)]
                batch = processor(text=prompts, images=_layout(processor, pil), return_tensors="pt", padding=True)
            else:
                batch = processor(text=prompts, return_tensors="pt", padding=True)
        else:
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = dict(batch)
        mask = batch["attention_mask"]
        if not bool(mask[:, FIRST_TOKEN_INDEX].all()):
            raise LitSahsError("batch is not left-padded: the first-token position must be the last column")
        dtype = self.dtype
        for k, v in batch.items():  # pixel values in the target's dtype (bf16 targets)
            if torch.is_tensor(v) and v.is_floating_point() and dtype is not None:
                batch[k] = v.to(dtype)
        if not (self.mrope and any(per_row)):
            batch["position_ids"] = position_ids_from_mask(mask)
        return batch

    def user_mask(self, texts: Sequence) -> torch.Tensor:
        """[batch, seq] bool, aligned with ``self(texts)``: each prompt's own tokens (``user_token_mask``).
        Text-only targets only."""
        return self.mask_of(self(texts))

    def mask_of(self, enc: dict) -> torch.Tensor:
        """``user_mask`` of a batch this encoder made (no second tokenisation)."""
        if self.processor is not None:
            raise LitSahsError(f"pooling over the prompt's tokens is available for text-only targets; {self.name} "
                               "is a vision-language target")
        return user_token_mask(self.tokenizer, enc["input_ids"], enc["attention_mask"])


USER_SENTINEL = "LITSAHSUSERTEXT"  # stands for the user's text when the chat template is rendered alone


def user_markers(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(opener, closer): the token ids the chat template puts right before the last user turn's text
    (from its last special token on, e.g. ``<|im_start|> user \n``) and right after it (the end of the
    turn and the assistant prefix, up to the first-token position). Both empty without a template.
    Cached on the tokenizer: rendering costs more than matching."""
    cached = getattr(tokenizer, "_lit_sahs_user_markers", None)
    if cached is not None:
        return cached
    if not getattr(tokenizer, "chat_template", None):
        markers: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())
    else:
        prompt = render_prompt(tokenizer, USER_SENTINEL)
        at = prompt.rfind(USER_SENTINEL)
        if at < 0:
            raise LitSahsError("the chat template does not place the user's text verbatim: "
                               "pooling over the prompt's tokens cannot find it")
        before = tokenizer(prompt[:at], add_special_tokens=False)["input_ids"]
        after = tokenizer(prompt[at + len(USER_SENTINEL):], add_special_tokens=False)["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        last = max((i for i, t in enumerate(before) if t in special), default=max(len(before) - 1, 0))
        markers = (tuple(before[last:]), tuple(after))
    try:
        tokenizer._lit_sahs_user_markers = markers
    except AttributeError:  # pragma: no cover - a tokenizer that refuses attributes: no cache
        pass
    return markers


def user_token_mask(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: the tokens of each row's own text (a conversation's last user turn) in a
    left-padded batch: after the last occurrence of the template's user-turn opener and before its
    closer, which ends every row (``user_markers``). The one definition of "the prompt's tokens"
    that pooled features read, computed from the ids alone, so a capture inside any forward
    (extraction, a live DataModule, the guard's prefill) finds the same tokens. A row where the
    markers are not found falls back to every attended token."""
    opener, closer = user_markers(tokenizer)
    ids, attended = input_ids.cpu(), attention_mask.cpu().bool()
    out = attended.clone()
    seq = ids.shape[1]
    for i in range(ids.shape[0]):
        row = ids[i].tolist()
        end = seq - len(closer)
        if closer and tuple(row[end:]) != closer:
            continue
        start = 0
        if opener:
            n = len(opener)
            hit = next((p for p in range(end - n, -1, -1) if tuple(row[p:p + n]) == opener), None)
            if hit is None:
                continue
            start = hit + n
        if start >= end:
            continue
        span = torch.zeros(seq, dtype=torch.bool)
        span[start:end] = True
        out[i] = attended[i] & span
    return out.to(input_ids.device)


def _check_placeholders(target, processor, prompts: list[str], per_row: list[list[str]], ids: list[str]) -> None:
    """Each prompt must hold exactly one placeholder per image: more images than placeholders (a
    template that drops images) or more placeholders than images (the placeholder string typed in
    the text) would otherwise fail deep inside the model with a shape error."""
    token = image_placeholder(processor)
    if token is None:
        return
    for prompt, ims, i in zip(prompts, per_row, ids):
        n = prompt.count(token)
        if len(ims) > n:
            raise LitSahsError(f"sample {i}: {len(ims)} image(s) but the prompt rendered for target {target.name!r} "
                               f"has {n} image placeholder(s) {token!r}: its chat template does not place that many "
                               "images; give fewer images or a template that places them")
        if n > len(ims):
            raise LitSahsError(f"sample {i}: the prompt has {n} image placeholder(s) {token!r} but "
                               f"{len(ims)} image(s): the text itself contains {token!r}; remove it from the text")


def image_token_ids(target) -> tuple[int, ...]:
    """Token ids that stand for image content or image structure (placeholders, Qwen2-VL's vision
    start/end, Idefics3's tile markers): a prompt's perplexity should not score them."""
    cfg = getattr(target.model, "config", None)
    ids = set()
    for name in ("image_token_id", "image_token_index", "vision_start_token_id", "vision_end_token_id",
                 "video_token_id"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    processor = getattr(target, "processor", None)
    for name in ("image_token_id", "fake_image_token_id", "global_image_token_id", "image_start_token_id",
                 "image_end_token_id"):
        v = getattr(processor, name, None)
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    for v in getattr(processor, "row_col_ids", None) or ():
        if isinstance(v, int) and v >= 0:
            ids.add(v)
    unk = getattr(target.tokenizer, "unk_token_id", None)
    ids.discard(unk)  # tokens the tokenizer does not know map to <unk>, a real text token
    return tuple(sorted(ids))


def _layout(processor, pil: list[list[Image.Image]]):
    """Images as the processor wants them: one list per prompt (Idefics3 / SmolVLM and most newer
    processors), or a flat list in prompt order for processors that fill placeholders in order
    and reject empty per-prompt lists (LLaVA, LLaVA-NeXT, Qwen2-VL)."""
    if type(processor).__name__.startswith(("Idefics", "SmolVLM")):
        return pil
    return [im for ims in pil for im in ims]


def _float_dtype(target) -> Optional[torch.dtype]:
    try:
        p = next(target.model.parameters())
    except (StopIteration, AttributeError):
        return None
    return p.dtype if p.is_floating_point() else None


def _uses_mrope(target) -> bool:
    """Qwen2-VL style 3-D rotary positions are computed by the model itself from the mask."""
    model_type = getattr(getattr(target.model, "config", None), "model_type", "") or ""
    return model_type.startswith(("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))


# ---------------------------------------------------------------- prompts longer than the context

_SHOWN = 10  # offending rows named in the error


def context_length(target) -> Optional[int]:
    """The target's context in tokens (max_position_embeddings), or None when its config has none."""
    from lit_sahs.targets.sites import text_config

    cfg = text_config(target.model.config)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if n else None


def prompt_lengths(target, texts: Sequence[str], images: Optional[Sequence[ImageSpec]] = None,
                   ids: Optional[Sequence[str]] = None, chunk: int = 32) -> list[int]:
    """Tokens of each prompt as the target sees it (chat template and image tokens included), from
    the same encoder a forward uses; `chunk` prompts are tokenised at a time."""
    encoder = target if isinstance(target, Encoder) else Encoder.of(target)
    texts = list(texts)
    images = list(images) if images is not None else [None] * len(texts)
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    out: list[int] = []
    for i in range(0, len(texts), chunk):
        mask = encoder(texts[i:i + chunk], images[i:i + chunk], ids[i:i + chunk])["attention_mask"]
        out += mask.sum(-1).tolist()
    return out


def fit_context(target, texts: Sequence[str], images: Optional[Sequence[ImageSpec]] = None,
                ids: Optional[Sequence[str]] = None, truncate: Optional[str] = None, reserve: int = 0,
                lengths: Optional[Sequence[int]] = None) -> list[str]:
    """The one length policy of every command that encodes prompts (extract, evaluate --data, screen,
    guard, ablate). Each prompt as the target sees it, plus `reserve` tokens to generate, must fit the
    target's context. With `truncate` None the prompts that do not are refused: one LitSahsError
    names them (ids) with their token counts. With "left" / "right" the *text* of each such prompt
    is cut (never the chat template, whose assistant prefix decides the first-token position) to
    keep its end / its start, and a warning says how many were cut. Returns the texts, cut ones
    replaced. Call it on a whole input before the first forward; `lengths` skips the tokenising
    when the caller has the counts."""
    truncate = truncate_side(truncate)
    texts = list(texts)
    limit = context_length(target)
    if limit is None or not texts:
        return texts
    images = list(images) if images is not None else [None] * len(texts)
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    budget = limit - int(reserve)
    if budget < 1:
        raise LitSahsError(f"{reserve} new tokens do not fit the target's context of {limit} tokens: "
                           "lower max_new_tokens")
    encoder = Encoder.of(target)
    lengths = list(lengths) if lengths is not None else prompt_lengths(encoder, texts, images, ids)
    over = [i for i, n in enumerate(lengths) if n > budget]
    if not over:
        return texts
    if truncate is None:
        raise LitSahsError(_too_long([(ids[i], lengths[i]) for i in over], limit, reserve))
    cut = [ids[i] for i in over if is_conversation(texts[i])]
    if cut:
        raise LitSahsError(f"conversation {cut[0]} is longer than the target's context of {limit} tokens: "
                           "a conversation is not cut; drop earlier turns or shorten it")
    for i in over:
        texts[i] = _cut(encoder, texts[i], images[i], ids[i], lengths[i], budget, truncate)
    logging.getLogger(__name__).warning(
        "cut %d prompt(s) longer than the target's context of %d tokens%s to fit, keeping the %s of each: %s",
        len(over), limit, f" (less {reserve} new tokens)" if reserve else "",
        "end" if truncate == "left" else "start", ", ".join(ids[i] for i in over[:_SHOWN]))
    return texts


def _too_long(rows: list[tuple[str, int]], limit: int, reserve: int) -> str:
    """One message naming every prompt that does not fit (the first _SHOWN of them) and the fix."""
    fix = ": shorten {it}" + (", lower max_new_tokens" if reserve else "") + \
          " or pass --truncate left (keep the end of the text) or --truncate right (keep its start)"
    if len(rows) == 1:
        (sid, n), = rows
        plus = f" plus {reserve} new tokens" if reserve else ""
        return f"prompt {sid} is {n} tokens{plus}, longer than the target's context of {limit} tokens" + \
            fix.format(it="it")
    named = ", ".join(f"{sid} ({n} tokens)" for sid, n in rows[:_SHOWN])
    more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
    plus = f" plus {reserve} new tokens each" if reserve else ""
    return (f"{len(rows)} prompts{plus} are longer than the target's context of {limit} tokens: {named}{more}"
            + fix.format(it="them"))


def _cut(encoder: Encoder, text: str, image: ImageSpec, sid: str, n: int, budget: int, side: str) -> str:
    """`text` cut on `side` until its prompt (n tokens now) takes at most `budget` tokens."""
    tok = encoder.tokenizer
    for _ in range(8):  # decoding and tokenising again can merge tokens differently: measure, cut again
        pieces = tok(text, add_special_tokens=False)["input_ids"]
        keep = len(pieces) - (n - budget)
        if keep < 1:
            raise LitSahsError(f"prompt {sid}: the chat template{' and images' if image else ''} alone take "
                               f"{n - len(pieces)} of the {budget} tokens the context leaves, so no text fits: "
                               "cutting the text cannot make it fit")
        pieces = pieces[len(pieces) - keep:] if side == "left" else pieces[:keep]
        text = tok.decode(pieces, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        n = prompt_lengths(encoder, [text], [image], [sid])[0]
        if n <= budget:
            return text
    raise LitSahsError(f"prompt {sid} could not be cut to fit the target's context: shorten it yourself")
