"""Chat template + images -> a left-padded batch; the one definition of the first-token position.

The first-token position is the prompt position whose output produces the first generated
token: the last prompt token, *after* the chat template's assistant prefix. With left padding
that is the last column of every row, which is why every batch here is left-padded.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from PIL import Image

from lit_sahs.errors import LitSahsError

FIRST_TOKEN_INDEX = -1  # column of the first-token position in a left-padded batch
POSITION_RULE = "last_prompt_token_after_assistant_prefix"


def chat_messages(text: str, with_image: bool) -> list[dict]:
    if with_image:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return [{"role": "user", "content": text}]


def render_prompt(template_owner, text: str, with_image: bool = False) -> str:
    """The full prompt string the target sees, assistant prefix included."""
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
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise LitSahsError(f"sample {sample_id}: image {path} does not exist") from None
    except Exception as e:  # PIL raises several types for undecodable files
        raise LitSahsError(f"sample {sample_id}: image {path} cannot be decoded ({e})") from None


def encode(target, texts: Sequence[str], images: Optional[Sequence[Optional[str]]] = None,
           ids: Optional[Sequence[str]] = None) -> dict:
    """Tokenise a batch for `target` with left padding; returns model kwargs incl. position_ids."""
    images = list(images) if images is not None else [None] * len(texts)
    ids = list(ids) if ids is not None else [str(i) for i in range(len(texts))]
    if not texts:
        raise LitSahsError("empty batch: nothing to encode")
    has_image = [im is not None for im in images]
    if any(has_image) and target.processor is None:
        bad = ids[has_image.index(True)]
        raise LitSahsError(f"sample {bad} has an image but target {target.name!r} is text-only: "
                           "use a vision-language target or drop the image")
    owner = target.processor if target.processor is not None else target.tokenizer
    prompts = [render_prompt(owner, t, im is not None) for t, im in zip(texts, images)]
    tok = target.tokenizer
    tok.padding_side = "left"
    if target.processor is not None:
        target.processor.tokenizer.padding_side = "left"
        pil = [load_image(p, i) for p, i in zip(images, ids) if p is not None]
        if pil and len(pil) != len(prompts):
            # processors want one image list per prompt; text-only rows in an image batch get none
            pil = [[load_image(p, i)] if p is not None else [] for p, i in zip(images, ids)]
        batch = target.processor(text=prompts, images=pil or None, return_tensors="pt", padding=True)
    else:
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    batch = dict(batch)
    mask = batch["attention_mask"]
    if not bool(mask[:, FIRST_TOKEN_INDEX].all()):
        raise LitSahsError("batch is not left-padded: the first-token position must be the last column")
    if not _uses_mrope(target):
        batch["position_ids"] = position_ids_from_mask(mask)
    return batch


def _uses_mrope(target) -> bool:
    """Qwen2-VL style 3-D rotary positions are computed by the model itself from the mask."""
    return "qwen2_vl" in getattr(target.model.config, "model_type", "") or "qwen2_5_vl" in getattr(
        target.model.config, "model_type", "")
