"""Option types several commands share, as ``Literal`` choices so that ``--help`` lists them and a
wrong value is a parse error. (The device option's type is ``lit_sahs.devices.Device``.)"""
from __future__ import annotations

from typing import Literal, Optional

Dtype = Literal["float32", "bfloat16", "float16"]
# a prompt longer than the target's context: None refuses it, left keeps its end, right its start
Truncate = Optional[Literal["left", "right"]]
Pairing = Literal["round_robin", "all_pairs"]
Protocol = Literal["families", "sources"]
