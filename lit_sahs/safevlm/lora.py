"""What SafeVLM's stage II puts into the target: peft LoRA adapters on the decoder layers' linear
layers from a first layer on, and the target shapes the safety modules depend on."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_sahs.errors import LitSahsError
from lit_sahs.targets import sites


def target_dims(target) -> dict[str, int]:
    """What the safety modules' shapes depend on, read from the target."""
    model = target.model
    cfg = sites.text_config(model.config)
    dims = {"hidden": int(cfg.hidden_size), "num_layers": len(sites.decoder_layers(model)), "vision_dim": 0}
    if target.is_vision_language:
        try:
            sites.vision_projector(model)
            dims["vision_dim"] = sites.vision_width(model)
        except LitSahsError as e:
            raise LitSahsError(f"SafeVLM reads the vision features at the input of the target's vision projector "
                               f"(LLaVA, Qwen2-VL, Idefics3 / SmolVLM layouts); {target.name!r} has none where "
                               f"lit_sahs can reach them ({e})") from None
    return dims


def lora_module_names(model: nn.Module, first_layer: int) -> list[str]:
    """Full names of every nn.Linear inside the decoder layers >= first_layer."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, layer in enumerate(sites.decoder_layers(model)):
        if i < first_layer:
            continue
        prefix = names[id(layer)]
        out += [f"{prefix}.{n}" for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n]
    return out


def inject_lora(model: nn.Module, cfg: dict[str, Any]) -> None:
    """LoRA adapters (rank, alpha, dropout, modules) into `model`, once; only they train afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(model, "_lit_sahs_lora", None) is not None:
        if model._lit_sahs_lora != cfg:
            raise LitSahsError("this target already carries another SafeVLM's LoRA adapter: load the target again")
        return
    inject_adapter_in_model(LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                                       target_modules=list(cfg["modules"]), bias="none"), model)
    model._lit_sahs_lora = dict(cfg)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def load_lora(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy saved LoRA tensors into `model`'s adapters; names and shapes must match exactly."""
    params = lora_parameters(model)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise LitSahsError(f"the LoRA tensors do not fit this target (missing {missing}, unexpected {extra}): "
                           "the artifact was made for another target or is corrupt")
    with torch.no_grad():
        for n, p in params.items():
            if tuple(p.shape) != tuple(state[n].shape):
                raise LitSahsError(f"LoRA tensor {n} has shape {tuple(state[n].shape)}, the target needs "
                                   f"{tuple(p.shape)}: the artifact is corrupt")
            p.copy_(state[n].to(p.device, p.dtype))
