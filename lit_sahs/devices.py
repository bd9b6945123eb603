"""One device vocabulary for every command: ``auto`` (CUDA when this torch sees a GPU, else the CPU),
``cpu``, ``cuda``, ``cuda:N`` or ``mps``. ``Device`` is the option type (a bad spelling is a parse
error naming the pattern); ``resolve_device`` turns a value into the device to use and refuses one
this torch cannot use with a LitSahsError instead of torch's assertion deep inside a load.

torch is imported only when a device is resolved, so a command's ``--help`` does not load it."""
from __future__ import annotations

import re
from typing import Optional

from jsonargparse.typing import restricted_string_type

from lit_sahs.errors import LitSahsError

DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:\d+|mps)$"
Device = restricted_string_type("Device", DEVICE_PATTERN)
Device.__doc__ = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: Optional[str] = "auto") -> str:
    """The device a command runs on: ``auto`` (or None) is ``cuda`` when torch sees a GPU, else ``cpu``;
    anything else is checked against this torch build and its visible devices."""
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    if not re.match(DEVICE_PATTERN, name):
        raise LitSahsError(f"device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise LitSahsError(f"device {name}: this torch cannot use CUDA ({why}): use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise LitSahsError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) visible "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LitSahsError("device mps: this torch cannot use MPS (Apple GPUs only): use --device cpu or auto")
    return name
