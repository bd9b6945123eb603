"""`python -m lit_sahs direction`: fit a target's refusal direction from an activation store (the
difference of the mean first-token residual over harmful and over benign rows at one recorded layer;
``lit_sahs.refusal_direction``) and write it to one file that ``guard --answer_direction`` reads.

    python -m lit_sahs direction --store stores/safevlm-heads-qwen0.5b --out artifacts/refusal-direction.safetensors \
        --held_out_families dan --held_out_sources future_tense,rho_overrefusal,innocent_alarming
"""
from __future__ import annotations

import json
from typing import Optional

from lit_sahs.commands import run_command


def direction_command(store: str, out: str, layer: Optional[int] = None, held_out_families: str = "",
                      held_out_sources: str = "") -> int:
    """Fit the refusal direction on a store's rows and write it (one safetensors file, atomically).

    Args:
        store: an activation store of the target, extracted with its residual layers (the default extras)
        out: the file to write (replaced atomically where it exists)
        layer: the decoder layer, one the store recorded (default: the recorded layer nearest mid-depth)
        held_out_families: comma-separated attack families whose rows are left out (e.g. a test family)
        held_out_sources: comma-separated sources whose rows are left out (e.g. validation sources)
    """
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.outputs import check_outputs
    from lit_sahs.refusal_direction import from_store

    check_outputs(files={"--out": out})
    d = from_store(store, layer, Holdout(families=held_out_families, sources=held_out_sources))
    d.save(out)
    print(json.dumps({"direction": str(out), "target": d.fingerprint.name, "layer": d.layer, "rows": d.rows}))
    return 0


def main(argv: list[str]) -> int:
    return run_command(direction_command, argv, prog="python -m lit_sahs direction")
