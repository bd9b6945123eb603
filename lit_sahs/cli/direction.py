"""`python -m lit_sahs direction`: fit a target's refusal direction from an activation store (the
difference of the mean first-token residual over harmful and over benign rows at one recorded layer;
``lit_sahs.refusal_direction``) and write it to one file that ``guard --answer_direction`` reads. Without
``--layer`` the layer is picked by effect on the target (``select_layer``: a few forwards per recorded layer).

    python -m lit_sahs direction --store stores/safevlm-heads-qwen0.5b --out artifacts/refusal-direction.safetensors \
        --held_out_families dan --held_out_sources future_tense,rho_overrefusal,innocent_alarming
"""
from __future__ import annotations

import json
from typing import Optional

from lit_sahs.commands import run_command


def direction_command(store: str, out: str, layer: Optional[int] = None, held_out_families: str = "",
                      held_out_sources: str = "", target: Optional[str] = None, max_rows: int = 64,
                      batch_size: int = 8, device: str = "auto") -> int:
    """Fit the refusal direction on a store's rows and write it (one safetensors file, atomically).

    Args:
        store: an activation store of the target, extracted with its residual layers (the default extras)
        out: the file to write (replaced atomically where it exists)
        layer: the decoder layer, one the store recorded (default: picked by effect: the recorded layer below 80%
            of the depth whose direction, ablated, leaves the kept harmful rows the least refusal at the first token)
        held_out_families: comma-separated attack families whose rows are left out (e.g. a test family)
        held_out_sources: comma-separated sources whose rows are left out (e.g. validation sources)
        target: the target the store was extracted from, for the pick by effect (default: the store's own)
        max_rows: harmful rows scored per layer in the pick by effect
        batch_size: prompts per forward in the pick by effect
        device: where the target runs: auto, cpu, cuda, cuda:N or mps
    """
    from lit_sahs.checks import at_least
    from lit_sahs.data.holdout import Holdout
    from lit_sahs.data.store import ActivationStore
    from lit_sahs.outputs import check_outputs
    from lit_sahs.refusal_direction import from_store, select_layer

    check_outputs(files={"--out": out})
    at_least({"--max_rows": max_rows, "--batch_size": batch_size}, 1)
    held = Holdout(families=held_out_families, sources=held_out_sources)
    if layer is not None:
        d = from_store(store, layer, held)
    else:
        from lit_sahs.devices import resolve_device
        from lit_sahs.targets import load_target

        opened = ActivationStore.open(store)
        loaded = load_target(target or opened.fingerprint.name, device=resolve_device(device))
        d = select_layer(loaded, opened, held, max_rows=max_rows, batch_size=batch_size, progress=True)
    d.save(out)
    print(json.dumps({"direction": str(out), "target": d.fingerprint.name, "layer": d.layer, "rows": d.rows,
                      "harmful_refusal_after_ablation": d.selection}))
    return 0


def main(argv: list[str]) -> int:
    return run_command(direction_command, argv, prog="python -m lit_sahs direction")
