"""SafeVLM's safety modules as plain ``nn.Module``s (no target inside): the safety projector, the
two sets of learnable safety tokens and the safety head.

Shapes (H: the language model's width, B: batch, T: prompt positions, P: vision patches):

* ``SafetyProjector``: [B, T, F] features of the prompt (token embeddings or one layer's hidden
  states) -> [B, T, H]; LayerNorm and a two-layer MLP, like the target's own vision projector.
* ``VisionAbstractor``: [B, P, Dv] vision-encoder patch features -> [B, Q, H]: a convolution over
  the patch sequence, adaptive pooling to Q queries, then the two-layer MLP (PSA-VLM puts a
  convolutional abstractor before its MLP for the same reason: fewer, smoother tokens). Rows
  whose patch counts differ (Qwen2-VL's dynamic resolution, Idefics3's tiles, a prompt without an
  image) come padded with a [B, P] mask; each row is then abstracted from its own patches alone,
  so a prompt scores the same in any batch, and a row without patches gets Q masked queries.
* ``SafetyTokens``: ``n`` learnable vectors of width H. One set (``input_tokens``) goes into the
  language model's input sequence in front of the prompt; the other (``head_tokens``) is used
  only as keys/values inside the safety head.
* ``SafetyHead``: multi-head attention whose queries are the prompt's token embeddings and whose
  keys/values are the head's safety tokens followed by the projected features (padding masked);
  the output at the first-token position feeds a risk-level and a risk-type classifier.
* ``JoinedHeads`` (optional): the located safety heads' outputs [B, k, D] at the first-token
  position as k more keys/values of the safety head, and a logistic logit added to its risk
  (``safevlm.joined`` explains why and loads the detector it starts from).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_sahs.errors import LitSahsError


class SafetyProjector(nn.Module):
    """LayerNorm, then the two-layer MLP. The norm matters for hidden states: a decoder's residual
    stream carries a few huge dimensions that would otherwise swamp the MLP."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = nn.Linear(in_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(self.norm(x))))


class VisionAbstractor(nn.Module):
    def __init__(self, vision_dim: int, hidden: int, queries: int = 16):
        super().__init__()
        if queries < 1:
            raise LitSahsError(f"vision_queries must be >= 1, got {queries}")
        self.conv = nn.Conv1d(vision_dim, vision_dim, kernel_size=3, padding=1)
        self.queries = int(queries)
        self.mlp = SafetyProjector(vision_dim, hidden)

    def forward(self, patches: Tensor, padding: Optional[Tensor] = None) -> Tensor:
        """patches [B, P, Dv], padding [B, P] True past a row's own patches (None: none padded)
        -> [B, Q, H]; a row without any patch gets zeros (the caller masks its queries)."""
        if padding is None or not bool(padding.any()):
            return self._abstract(patches)
        rows = []
        for b in range(patches.shape[0]):
            own = patches[b][~padding[b].to(patches.device)]
            rows.append(self._abstract(own.unsqueeze(0))[0] if own.shape[0] else None)
        width = self.mlp.linear_2.out_features
        zeros = patches.new_zeros((self.queries, width), dtype=self.mlp.linear_2.weight.dtype)
        return torch.stack([r if r is not None else zeros for r in rows])

    def _abstract(self, patches: Tensor) -> Tensor:
        x = F.gelu(self.conv(patches.transpose(1, 2)))                 # [B, Dv, P]
        x = F.adaptive_avg_pool1d(x, self.queries).transpose(1, 2)   # [B, Q, Dv]
        return self.mlp(x)


class SafetyTokens(nn.Module):
    def __init__(self, n: int, hidden: int):
        super().__init__()
        if n < 1:
            raise LitSahsError(f"num_safety_tokens must be >= 1, got {n}")
        self.weight = nn.Parameter(torch.randn(n, hidden) * 0.02)

    def forward(self, batch: int) -> Tensor:
        return self.weight.unsqueeze(0).expand(batch, -1, -1)


class SafetyHead(nn.Module):
    def __init__(self, hidden: int, num_heads: int, num_levels: int, num_types: int):
        super().__init__()
        if hidden % num_heads:
            raise LitSahsError(f"the safety head's {num_heads} attention heads must divide the target's width "
                               f"{hidden}: choose head_heads among its divisors")
        self.attention = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.level_classifier = nn.Linear(hidden, num_levels)
        self.type_classifier = nn.Linear(hidden, num_types)

    def forward(self, query: Tensor, tokens: Tensor, features: Tensor,
                feature_padding: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """query [B, H] (the first-token position's embedding), tokens [B, n, H], features [B, T, H]
        with feature_padding [B, T] True where a position is not part of the prompt
        -> (level logits [B, levels], type logits [B, types])."""
        kv = torch.cat([tokens, features], dim=1)
        mask = None
        if feature_padding is not None:
            keep = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            mask = torch.cat([keep, feature_padding.to(torch.bool)], dim=1)
        out, _ = self.attention(query.unsqueeze(1), kv, kv, key_padding_mask=mask, need_weights=False)
        out = out[:, 0]
        return self.level_classifier(out), self.type_classifier(out)


class JoinedHeads(nn.Module):
    def __init__(self, k: int, head_dim: int, hidden: int):
        super().__init__()
        self.k, self.head_dim = int(k), int(head_dim)
        self.register_buffer("mean", torch.zeros(k, head_dim))
        self.register_buffer("std", torch.ones(k, head_dim))
        self.keys = SafetyProjector(head_dim, hidden)
        self.score = nn.Linear(k * head_dim, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, heads: Tensor) -> tuple[Tensor, Tensor]:
        """heads [B, k, D] raw outputs in HeadSet order -> (keys [B, k, H], logit s [B])."""
        if heads.dim() != 3 or tuple(heads.shape[1:]) != (self.k, self.head_dim):
            raise LitSahsError(f"joined heads need outputs [batch, {self.k}, {self.head_dim}], got {tuple(heads.shape)}")
        z = (heads.to(self.mean.dtype) - self.mean) / self.std
        return self.keys(z), self.score(z.flatten(1)).squeeze(-1)

    @torch.no_grad()
    def init_from(self, detector) -> None:
        """Copy a logistic detector's normalisation and weights (its logit becomes ``s``)."""
        self.mean.copy_(detector.mean)
        self.std.copy_(detector.std)
        self.score.weight.copy_(detector.linear.weight)
        self.score.bias.copy_(detector.linear.bias)


def join_level_logits(level: Tensor, s: Tensor) -> Tensor:
    """Level logits [B, L] whose risk 1 - P(safe) is sigmoid(s + u), u the unsafe-vs-safe logit of
    `level` (logsumexp of the unsafe levels minus the safe one); the unsafe levels keep their
    proportions. Returned as log-probabilities (valid logits for cross-entropy and softmax)."""
    level = level.float()
    t = s.float() + torch.logsumexp(level[:, 1:], dim=-1) - level[:, 0]
    unsafe = F.logsigmoid(t)[:, None] + torch.log_softmax(level[:, 1:], dim=-1)
    return torch.cat([F.logsigmoid(-t)[:, None], unsafe], dim=-1)


def neutral_level_classifier(classifier: nn.Linear) -> None:
    """Zero weights and the bias that makes u = 0 (the safe logit equals logsumexp of the others)."""
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.zero_()
        classifier.bias[0] = math.log(classifier.out_features - 1)



class SafetyModules(nn.Module):
    """Everything SafeVLM adds to a target, in one module: what stage I trains and the artifact saves."""

    def __init__(self, hidden: int, feature_dim: int, num_tokens: int, num_heads: int, num_levels: int,
                 num_types: int, vision_dim: int = 0, vision_queries: int = 16):
        super().__init__()
        self.input_tokens = SafetyTokens(num_tokens, hidden)
        self.head_tokens = SafetyTokens(num_tokens, hidden)
        self.projector = SafetyProjector(feature_dim, hidden)
        self.vision = VisionAbstractor(vision_dim, hidden, vision_queries) if vision_dim else None
        self.head = SafetyHead(hidden, num_heads, num_levels, num_types)
        self.joined: Optional[JoinedHeads] = None

    def join(self, joined: "JoinedHeads") -> None:
        """Read the located safety heads too (``joined.JoinedHeads``): extra keys for the head's
        attention and a logit added to its risk; the level classifier starts where that logit alone
        decides the risk."""
        self.joined = joined
        neutral_level_classifier(self.head.level_classifier)

    def classify(self, query: Tensor, features: Tensor, feature_padding: Tensor,
                 patches: Optional[Tensor] = None, patch_padding: Optional[Tensor] = None,
                 heads: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """query [B, H], features [B, T, F] with feature_padding [B, T]; patches [B, P, Dv] with
        patch_padding [B, P] (True past a row's own patches; None: every row has all P) or None;
        heads [B, k, D]: the joined heads' outputs (needed exactly when heads are joined)."""
        if (heads is None) != (self.joined is None):
            raise LitSahsError("the joined heads' outputs must be given exactly when these safety modules join heads")
        proj = self.projector(features.to(self.projector.linear_1.weight.dtype))
        pad = feature_padding.to(proj.device)
        if patches is not None:
            if self.vision is None:
                raise LitSahsError("these safety modules were built without a vision abstractor: "
                                   "they cannot read images (fit them on a vision-language target)")
            vis = self.vision(patches.to(self.projector.linear_1.weight.dtype), patch_padding)
            if patch_padding is None:
                vis_pad = torch.zeros(vis.shape[:2], dtype=torch.bool, device=vis.device)
            else:  # a row without any patch (a prompt without an image) masks its vision queries
                vis_pad = patch_padding.to(vis.device).all(dim=1, keepdim=True).expand(-1, vis.shape[1])
            proj = torch.cat([vis, proj], dim=1)
            pad = torch.cat([vis_pad, pad], dim=1)
        tokens = self.head_tokens(query.shape[0])
        if self.joined is None:
            return self.head(query.to(proj.dtype), tokens, proj, pad)
        keys, s = self.joined(heads.to(proj.device))
        level, rtype = self.head(query.to(proj.dtype), torch.cat([tokens, keys.to(tokens.dtype)], dim=1), proj, pad)
        return join_level_logits(level, s), rtype
