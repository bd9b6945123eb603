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
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from lit_sahs.errors import LitSahsError

FIRST_TOKEN_INDEX = -1  # column of the first-token position in a left-padded batch
POSITION_RULE = "last_prompt_token_after_assistant_prefix"

ImageSpec = Union[None, str, "os.PathLike", Sequence[str]]  # per prompt: no image, one path, or a list


def chat_messages(text: str, with_image: Union[bool, int] = False) -> list[dict]:
    """One user turn; `with_image` is a flag (one image) or the number of images, which come
    before the text as in LLaVA, Qwen2-VL and Idefics3 examples."""
    n = int(with_image)
    if n:
        return [{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}]
    return [{"role": "user", "content": text}]


def render_prompt(template_owner, text: str, with_image: Union[bool, int] = False) -> str:
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


def encode(target, texts: Sequence[str], images: Optional[Sequence[ImageSpec]] = None,
           ids: Optional[Sequence[str]] = None) -> dict:
    """Tokenise a batch for `target` with left padding; returns model kwargs (position_ids from the
    mask where the model does not compute its own). `images[i]` is prompt i's image path, list of
    paths, or None."""
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
