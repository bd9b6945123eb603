"""Option types and defaults several commands share: choices as ``Literal`` types, so that ``--help``
lists them and a wrong value is a parse error (the device option's type is
``lit_sahs.devices.Device``), and the refusal a guard answers with."""
from __future__ import annotations

from typing import Literal, Optional

from lit_sahs.errors import LitSahsError

Dtype = Literal["float32", "bfloat16", "float16"]
# a prompt longer than the target's context: None refuses it, left keeps its end, right its start
Truncate = Optional[Literal["left", "right"]]
Pairing = Literal["round_robin", "all_pairs"]
Protocol = Literal["families", "sources"]

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."
TRUNCATE_SIDES = ("left", "right")  # left: drop the start of the text (keep its end); right: keep its start


def truncate_side(truncate: Optional[str]) -> Optional[str]:
    """`truncate` checked: None (refuse long prompts), "left" or "right"."""
    if truncate is not None and truncate not in TRUNCATE_SIDES:
        raise LitSahsError(f"truncate must be left (keep the end of a long prompt) or right (keep its start), "
                           f"got {truncate!r}; leave it unset to refuse prompts longer than the context")
    return truncate
