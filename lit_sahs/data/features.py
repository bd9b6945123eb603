"""What a detector sees of a prompt: which heads (``resolve_heads``) and how their activations
are normalised (``RunningMoments``, fitted on the train split).

Both DataModules serve the same features whether they read a store or run the target, so the
choice of heads and the normalisation statistics are computed here once for both. Moments are
merged block by block so that normalising a store of any size holds one block in memory.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from lit_sahs.errors import LitSahsError
from lit_sahs.heads import HeadSet, TargetFingerprint

NORM_EPS = 1e-6  # std floor: a constant head dimension must not divide by zero


def resolve_heads(fingerprint: TargetFingerprint, heads: Union[str, HeadSet, Sequence, None] = None,
                  ranking: Optional[str] = None, top_k: int = 8, all_heads: bool = False) -> HeadSet:
    """The HeadSet a DataModule serves: explicit ``heads`` > ``ranking`` top-k > ``all_heads``.
    A ranking must have been made for the same target; every head must lie inside the geometry."""
    if heads is not None and not (isinstance(heads, str) and not heads.strip()):
        if isinstance(heads, HeadSet):
            head_set = heads
        elif isinstance(heads, str):
            head_set = HeadSet.parse(heads)
        else:
            head_set = HeadSet(heads)
        if not len(head_set):
            raise LitSahsError("the HeadSet given with --data.heads is empty: name at least one 'layer.head'")
    elif ranking:
        from lit_sahs.ranking import HeadRanking

        r = HeadRanking.load(ranking)
        r.fingerprint.check(fingerprint, f"head ranking {ranking}")
        head_set = r.top_k(int(top_k))
    elif all_heads:
        head_set = HeadSet.all(fingerprint.geometry)
    else:
        raise LitSahsError("no heads chosen: pass --data.heads 'layer.head,...' or --data.ranking ranking.json "
                           "(run `python -m lit_sahs locate` first), or --data.all_heads true")
    return head_set.validate(fingerprint.geometry)


class RunningMoments:
    """Streaming per-feature mean and population variance (Chan et al. merge of batch moments, float64),
    so normalisation over any number of rows needs memory for one block only."""

    def __init__(self, shape: tuple[int, ...]):
        self.n = 0
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, x: Union[np.ndarray, torch.Tensor]) -> None:
        x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).detach().to("cpu", torch.float64)
        m = x.shape[0]
        if m == 0:
            return
        bmean = x.mean(0)
        bm2 = ((x - bmean) ** 2).sum(0)
        total = self.n + m
        delta = bmean - self.mean
        self.mean += delta * (m / total)
        self.m2 += bm2 + delta ** 2 * (self.n * m / total)
        self.n = total

    def result(self, eps: float = NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n == 0:
            raise LitSahsError("cannot fit normalisation: the train split has no rows")
        std = (self.m2 / self.n).sqrt().clamp_min(eps)
        return self.mean.float(), std.float()
