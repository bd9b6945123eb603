"""Per architecture: where the decoder layers and the attention output projections live.

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
    """The attention output projection of every decoder layer, in layer order."""
    projs = []
    for i, layer in enumerate(decoder_layers(model)):
        proj = next((p for p in (_get(layer, q) for q in _OUT_PROJ_PATHS) if isinstance(p, nn.Linear)), None)
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


# The module whose input is the vision encoder's selected patch features, per architecture:
# LLaVA / LLaVA-NeXT's multi-modal projector (PSA-VLM reads the same features for its safety projector).
_VISION_PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector")


def vision_projector(model: nn.Module) -> nn.Module:
    """The target's own vision projector; its input [images, patches, vision width] is what a second
    (safety) projector reads beside it."""
    for path in _VISION_PROJECTOR_PATHS:
        proj = _get(model, path)
        if isinstance(proj, nn.Module):
            return proj
    raise LitSahsError(f"cannot find the vision projector of {type(model).__name__} (LLaVA-style targets only): "
                       "add its path to lit_sahs/targets/sites.py")


def vision_width(model: nn.Module) -> int:
    """The width of the patch features the vision projector reads."""
    cfg = getattr(model.config, "vision_config", None)
    width = getattr(cfg, "hidden_size", None)
    if not width:
        raise LitSahsError(f"{type(model).__name__} has no vision_config.hidden_size")
    return int(width)
