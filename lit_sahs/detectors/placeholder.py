"""A logistic detector with random weights, for measuring what a detector costs (the cost of
capturing and scoring does not depend on the weights): the guard and serving benchmarks use it
where no trained detector is given."""
from __future__ import annotations

import torch

from lit_sahs.detectors.logistic import LogisticDetector
from lit_sahs.heads import HeadSet


def random_detector(target, k: int, depth: float, seed: int = 0) -> LogisticDetector:
    """A logistic detector bound to `target` with random weights on `k` heads in the first `depth`
    of the layers, the deepest at exactly that depth (which sets how early screening can stop)."""
    g = target.geometry
    deepest = max(0, round(depth * g.num_layers) - 1)
    gen = torch.Generator().manual_seed(seed)
    layers = torch.linspace(deepest / 2, deepest, k).round().long().tolist()
    heads, used = [], set()
    for layer in layers:
        h = int(torch.randint(g.num_heads, (1,), generator=gen))
        while (layer, h) in used:
            h = (h + 1) % g.num_heads
        used.add((layer, h))
        heads.append((layer, h))
    heads[-1] = (deepest, heads[-1][1])
    hs = HeadSet(dict.fromkeys(heads))
    det = LogisticDetector().bind(hs, g, target.fingerprint, torch.zeros(len(hs), g.head_dim),
                                  torch.ones(len(hs), g.head_dim))
    with torch.no_grad():
        det.linear.weight.normal_(0, 0.01, generator=gen)
    return det.eval()
