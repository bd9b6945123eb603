"""Per architecture: where the decoder layers, the attention output projections and (for
vision-language targets) the vision features live.

A head's output is the slice of the attention output projection's *input* that belongs to
that head: o_proj(concat_h head_h). So head_dim is the width of that input divided by the
number of query heads — not hidden/heads, which is wrong for Gemma-style models — and
grouped-query attention needs nothing special, since keys/values are shared only before it.
"""
from __future__ import annotations

from torch import nn

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import Geometry

# Paths from the top-level model to its decoder layer list, most specific first.
_LAYER_PATHS = (
    "model.language_model.layers",  # LLaVA, Qwen2-VL, Idefics3 / SmolVLM (transformers >= 4.52)
    "model.text_model.layers",  # Idefics3 / SmolVLM variants
    "language_model.model.layers",  # older LVLM layout
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi-3
    "transformer.h",  # GPT-2 style
    "gpt_neox.layers",
)
# Path inside a decoder layer to the attention output projection.
_OUT_PROJ_PATHS = ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attention.dense", "attn.o_proj")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise LitSahsError(
        f"cannot find decoder layers in {type(model).__name__}: add its layer path to lit_sahs/targets/sites.py"
    )


def output_projections(model: nn.Module) -> list[nn.Linear]:
    """The attention output projection of every decoder layer, in layer order (a LoRA-wrapped one as
    peft leaves it: its input is the same head outputs)."""
    projs = []
    for i, layer in enumerate(decoder_layers(model)):
        proj = next((p for p in (_get(layer, q) for q in _OUT_PROJ_PATHS)
                     if isinstance(p, nn.Linear) or isinstance(getattr(p, "base_layer", None), nn.Linear)), None)
        if proj is None:
            raise LitSahsError(
                f"layer {i} of {type(model).__name__} has no attention output projection at any of "
                f"{_OUT_PROJ_PATHS}: add it to lit_sahs/targets/sites.py"
            )
        projs.append(proj)
    return projs


def text_config(config):
    """The language model's config (VLM configs nest it)."""
    return getattr(config, "text_config", None) or config


def geometry(model: nn.Module) -> Geometry:
    projs = output_projections(model)
    cfg = text_config(model.config)
    num_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not num_heads:
        raise LitSahsError(f"{type(model).__name__} config has no num_attention_heads")
    width = projs[0].in_features
    if width % num_heads:
        raise LitSahsError(f"attention output width {width} is not divisible by {num_heads} heads")
    return Geometry(num_layers=len(projs), num_heads=int(num_heads), head_dim=width // int(num_heads))


_FINAL_NORM_PATHS = ("model.language_model.norm", "model.text_model.norm", "language_model.model.norm",
                     "model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last decoder layer: its input is the last-layer residual stream and its
    output is what the LM head reads."""
    for path in _FINAL_NORM_PATHS:
        norm = _get(model, path)
        if isinstance(norm, nn.Module):
            return norm
    raise LitSahsError(f"cannot find the final norm of {type(model).__name__}: add its path to lit_sahs/targets/sites.py")


# The module whose forward input is the vision encoder's patch features, per architecture, with the
# rule that ties those features to the prompt's image tokens (see `vision_features_per_prompt`):
# * LLaVA / LLaVA-NeXT: the multi-modal projector, input [images, patches, vision width]; one
#   image token per patch vector (PSA-VLM reads the same features for its safety projector);
# * Idefics3 / SmolVLM: the connector (pixel shuffle + MLP), input [tiles, patches, vision width]
#   over every tile of every prompt's images; one image token per scale_factor**2 patch vectors;
# * Qwen2-VL: the vision tower's patch merger, input [patches, vision width] flattened over every
#   image (image_grid_thw gives their sizes); one image token per spatial_merge_size**2 patch vectors.
# Other models with a module at one of these paths (Idefics2's perceiver connector, Qwen2.5-VL's
# windowed merger, ...) lay their features out otherwise and are refused by model type.
_VISION_SITES = (
    ("model.multi_modal_projector", "llava"), ("multi_modal_projector", "llava"),  # transformers >= 4.52 / older
    ("model.connector", "idefics3"),
    ("model.visual.merger", "qwen2_vl"), ("visual.merger", "qwen2_vl"),
)
_VISION_MODEL_TYPES = {"idefics3": ("idefics3", "smolvlm"), "qwen2_vl": ("qwen2_vl",)}


def _vision_site(model: nn.Module) -> tuple[nn.Module, str]:
    model_type = getattr(model.config, "model_type", "")
    for path, kind in _VISION_SITES:
        module = _get(model, path)
        if isinstance(module, nn.Module):
            if kind in _VISION_MODEL_TYPES and model_type not in _VISION_MODEL_TYPES[kind]:
                raise LitSahsError(f"{type(model).__name__} ({model_type}) has a module at {path}, but lit_sahs knows "
                                   f"its input layout only for {', '.join(_VISION_MODEL_TYPES[kind])}: add the rule "
                                   "to lit_sahs/targets/sites.py")
            if kind == "llava" and getattr(model.config, "image_grid_pinpoints", None):
                kind = "llava_next"
            return module, kind
    raise LitSahsError(f"cannot find the vision projector of {type(model).__name__} (LLaVA, Qwen2-VL and "
                       "Idefics3 / SmolVLM layouts are known): add its path to lit_sahs/targets/sites.py")


def vision_projector(model: nn.Module) -> nn.Module:
    """The module that turns the target's vision-encoder patch features into language-model tokens
    (LLaVA's projector, Idefics3's connector, Qwen2-VL's patch merger); its forward input is what a
    second (safety) projector reads beside it (`vision_features_per_prompt` splits it per prompt)."""
    return _vision_site(model)[0]


def vision_width(model: nn.Module) -> int:
    """The width of the patch features the vision projector reads."""
    _, kind = _vision_site(model)
    cfg = getattr(model.config, "vision_config", None)
    # Qwen2-VL's vision_config.hidden_size is the merger's *output* width; its patches are embed_dim wide
    width = getattr(cfg, "embed_dim", None) if kind == "qwen2_vl" else getattr(cfg, "hidden_size", None)
    if not width:
        raise LitSahsError(f"{type(model).__name__} has no vision_config."
                           f"{'embed_dim' if kind == 'qwen2_vl' else 'hidden_size'}")
    return int(width)


def image_token_id(model: nn.Module) -> int:
    """The id of the token the target's image features replace in input_ids."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v >= 0:
            return v
    raise LitSahsError(f"{type(model).__name__} config has no image_token_id")


def patches_per_image_token(model: nn.Module) -> int:
    """How many patch vectors of the vision projector's input stand behind one image token."""
    _, kind = _vision_site(model)
    if kind == "qwen2_vl":
        return int(model.config.vision_config.spatial_merge_size) ** 2
    if kind == "idefics3":
        return int(model.config.scale_factor) ** 2
    return 1


def vision_features_per_prompt(model: nn.Module, features, input_ids) -> list:
    """The vision projector's input (`features`, as its forward pre-hook received it) split into each
    prompt's patch features, [P_b, vision width] per row of `input_ids` (P_b = 0 for a prompt without
    an image; a prompt's several images or tiles follow each other). Every architecture here feeds
    the projector its images in prompt order, and each image token of a prompt stands for a fixed
    number of patch vectors (`patches_per_image_token`), so the image-token count of each row gives
    its share. A layout that breaks this rule is refused with its reason."""
    _, kind = _vision_site(model)
    if kind == "llava_next":
        raise LitSahsError(f"{type(model).__name__}'s projector reads one feature set per crop of its 'anyres' tiling, "
                           "and its image tokens are the crops' features after unpadding plus row separators: they do "
                           "not map back to the projector's input, so SafeVLM cannot read its images (text-only "
                           "prompts work; use a LLaVA-1.5, Qwen2-VL or Idefics3 target for images)")
    width = features.shape[-1]
    flat = features.reshape(-1, width)
    counts = (input_ids == image_token_id(model)).sum(dim=1) * patches_per_image_token(model)
    if int(counts.sum()) != flat.shape[0]:
        raise LitSahsError(f"the vision projector of {type(model).__name__} read {flat.shape[0]} patch vectors but the "
                           f"prompts' image tokens stand for {int(counts.sum())}: this target's image features do not "
                           "follow its image tokens, so SafeVLM cannot tell which prompt each belongs to")
    return list(flat.split(counts.tolist(), dim=0))
