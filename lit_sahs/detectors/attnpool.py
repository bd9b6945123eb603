"""AttentionPoolDetector: a learned attention pooling, per head, over every prompt token.

The seed recipe reads each head at one position (the first-token position). Probes that pool over
every token of the prompt with a learned attention generalise better across prompt collections in
the literature; this family is that probe on the safety heads. For each head it reads at every
token (feature ``tokens``, ``lit_sahs.data.extra_features``), ``queries`` learned vectors score the
head's output at each of the prompt's own tokens, a softmax over the real tokens (padding masked)
weighs them, and a linear read-out of the pooled vectors, plus a linear term on everything else
the detector reads (the heads at the first-token position, other features), gives the logit.

Token vectors are standardised per head, with the statistics of that head at the first-token
position when the detector reads it there (the DataModule's per-slot statistics of token slots mix
positions and padding), else with the token slots' own statistics averaged over positions. Both
are functions of the saved buffers, so an artifact scores as the fitted detector did.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_sahs.detectors.base import SafetyDetector, check_low_fpr
from lit_sahs.errors import LitSahsError
from lit_sahs.family import register_family

MASKED = -1e4  # attention score of a padding slot (softmax weight ~0; a finite value keeps an empty row finite)


@register_family()
class AttentionPoolDetector(SafetyDetector):
    """Per head: softmax(x_t . q / sqrt(D)) over the prompt's tokens -> pooled vector -> linear read-out;
    plus a linear term on the first-token heads and other features. AdamW, mini-batch."""

    family = "attnpool"
    report_name = "attention-pooled heads"
    trainer_defaults = {"max_epochs": 100}  # small batches of data per epoch in source folds (batch 256)
    default_lr = 3e-3

    def __init__(self, queries: int = 1, dropout: float = 0.1, first_token: bool = True, lr: float | None = None,
                 weight_decay: float = 1e-2, target_fpr: float = 0.05, low_fpr_weight: float = 0.0,
                 low_fpr: float = 0.05) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, target_fpr=target_fpr)
        check_low_fpr(low_fpr_weight, low_fpr)
        if queries < 1:
            raise LitSahsError(f"queries must be >= 1, got {queries}")
        if not 0.0 <= dropout < 1.0:
            raise LitSahsError(f"dropout must lie in [0, 1), got {dropout}")

    # ------------------------------------------------------------------ layout

    def _layout(self, k: int, head_dim: int) -> None:
        """Which input rows are token slots (per head), the mask, and the rest (linear term)."""
        spec = self.feature_spec
        if not spec.token_heads:
            raise LitSahsError("the attnpool detector reads heads at every prompt token: fit it with features "
                               "'tokens' (--data.features tokens) on a store extracted with --token_heads, "
                               "or on a live DataModule")
        n_heads = len(self.head_set)
        token_rows, mask_row, rest = [], None, list(range(n_heads))
        for name, a, b in spec.groups(head_dim):
            a, b = a + n_heads, b + n_heads
            if name.startswith("tok:"):
                token_rows.append((a, b))
            elif name == "tokmask":
                mask_row = (a, b)
            else:
                rest += list(range(a, b))
        self.length = spec.token_length
        self._token_rows, self._mask_row = token_rows, mask_row
        self._rest = rest if self.hparams.first_token else [r for r in rest if r >= n_heads]
        # per token head: the first-token row of the same head, when the detector reads it there
        where = {tuple(h): i for i, h in enumerate(self.head_set)}
        self._same_head = [where.get(h) for h in spec.token_heads]

    def build(self, k: int, head_dim: int) -> None:
        self._layout(k, head_dim)
        q, n_tok = self.hparams.queries, len(self._token_rows)
        self.query = nn.Parameter(torch.randn(n_tok, q, head_dim) * head_dim ** -0.5)
        self.readout = nn.Parameter(torch.zeros(n_tok, q, head_dim))
        self.linear = nn.Linear(len(self._rest) * head_dim, 1) if self._rest else None
        self.bias = nn.Parameter(torch.zeros(()))
        self.dropout = nn.Dropout(self.hparams.dropout)

    # ------------------------------------------------------------------ scoring

    def _token_stats(self, j: int, a: int, b: int) -> tuple[Tensor, Tensor]:
        i = self._same_head[j]
        if i is not None:
            return self.mean[i], self.std[i]
        return self.mean[a:b].mean(0), self.std[a:b].mean(0)

    def tokens(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(standardised token vectors [B, heads, T, D], valid [B, T]) from normalised inputs z."""
        raw = z * self.std + self.mean  # back to raw values: token slots need per-head statistics
        valid = raw[:, self._mask_row[0]:self._mask_row[1]].flatten(1)[:, : self.length] > 0.5
        out = []
        for j, (a, b) in enumerate(self._token_rows):
            mean, std = self._token_stats(j, a, b)
            x = raw[:, a:b].reshape(len(z), -1)[:, : self.length * z.shape[2]].reshape(len(z), self.length, -1)
            out.append((x - mean) / std * valid[:, :, None])
        return torch.stack(out, dim=1), valid

    def attention(self, z: Tensor) -> Tensor:
        """Attention weights [B, heads, queries, T] over each prompt's tokens (what each head reads)."""
        return self._attend(*self.tokens(z))

    def _attend(self, x: Tensor, valid: Tensor) -> Tensor:
        scores = torch.einsum("bhtd,hqd->bhqt", x, self.query) / math.sqrt(x.shape[-1])
        return scores.masked_fill(~valid[:, None, None, :], MASKED).softmax(-1)

    def logits(self, z: Tensor) -> Tensor:
        x, valid = self.tokens(z)  # once: the attention and the pooled values read the same tokens
        pooled = torch.einsum("bhqt,bhtd->bhqd", self._attend(x, valid), x)
        out = (self.dropout(pooled) * self.readout).sum((1, 2, 3)) + self.bias
        if self.linear is not None:
            out = out + self.linear(self.dropout(z[:, self._rest].flatten(1))).squeeze(-1)
        return out
