"""The bare-vs-capture forward timing shared by the extraction benchmarks (experiments/benchmarks/)."""
from __future__ import annotations

import statistics
import time

import torch

from lit_sahs.hooks import HeadCapture


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(model, batch: dict, capture: bool, device="cpu") -> float:
    """One forward as extraction runs it (last-position logits, no cache), with or without every
    head captured and copied out as float16."""
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        if capture:
            with HeadCapture(model) as cap:
                model(**batch, logits_to_keep=1, use_cache=False)
            cap.activations().to(torch.float16)
        else:
            model(**batch, logits_to_keep=1, use_cache=False)
    sync(device)
    return time.perf_counter() - t


def alternate_bare_and_capture(model, batches: list[dict], repeats: int, device="cpu") -> dict:
    """Warm up on the first batch, then `repeats` passes over all batches, bare and captured in
    turn so drift hits both. Seconds per pass, their medians and the sorted per-repeat ratios."""
    for b in batches[:1]:
        forward_seconds(model, b, False, device), forward_seconds(model, b, True, device)
    bare, captured = [], []
    for _ in range(repeats):
        bare.append(sum(forward_seconds(model, b, False, device) for b in batches))
        captured.append(sum(forward_seconds(model, b, True, device) for b in batches))
    return {"bare": statistics.median(bare), "captured": statistics.median(captured),
            "ratios": sorted(c / b for b, c in zip(bare, captured))}
