"""User tower: encodes a user's recent items (item-tower vectors) into one L2-normalised vector.

There is no per-user id table: the user *is* their recent history, so a new user with a handful of
interactions is served immediately, and a user with none gets a learned default vector.

The last ``max_history`` item vectors (left-padded, with a mask) become tokens; each token adds

* a recency position (0 = most recent), as in SASRec (Kang & McAuley 2018),
* a log time-gap bucket ``floor(log2(1 + (t_last - t_item) / time_unit_ms))``, a bucketed form of
  the time intervals of TiSASRec (Li et al. 2020), measured from the history's latest event
  ``t_last``: the tower is given no request time, so training (where the next event's time is known),
  evaluation, the index self-check and serving (where "now" is the snapshot's clock at best) cannot
  place the query differently,
* optionally the interaction's event weight, through ``Linear(log1p(weight))``.

A learned query token is appended last; it always attends to itself, so even an empty history
produces a finite vector, and every padded row has at least one key (see
:func:`tessera.models.layers.attention_mask`). The query token's output plus the mean of the history
tokens' outputs is projected back to the item space and added to the mean input item vector (an
identity path: an untrained tower already scores items by similarity to the history, which removes
the long initial plateau of a randomly rotated output); the sum, L2-normalised, is the user vector.

Example::

    tower = UserTower(UserTowerConfig(item_dim=64, d_model=64, max_history=20))
    u = tower(item_vecs, mask, timestamps_ms, weights)     # (B, 64), unit norm
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tessera.config import TesseraConfig
from tessera.models.artifacts import SavableModule
from tessera.models.layers import TransformerBlock, attention_mask


class UserTowerConfig(TesseraConfig):
    """Config of :class:`UserTower`.

    Args:
        item_dim: width of the item-tower vectors read and of the user vector written.
        d_model: transformer width.
        n_layers: transformer blocks.
        n_heads: attention heads.
        dropout: dropout in the transformer.
        max_history: N, the most recent items used; longer inputs are cut on the left.
        time_encoding: ``"log_gap"`` adds log time-gap bucket embeddings, ``"none"`` does not.
        num_time_buckets: buckets of the log2 gap; larger gaps fall into the last one.
        time_unit_ms: gap unit before the log (1000 = seconds).
        use_event_weight: add an embedding of ``log1p(weight)`` to each token.
        causal: history tokens only see earlier ones (the query token always sees all).
    """

    item_dim: int = Field(128, gt=0)
    d_model: int = Field(128, gt=0)
    n_layers: int = Field(2, ge=0)
    n_heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    max_history: int = Field(50, gt=0)
    time_encoding: Literal["log_gap", "none"] = "log_gap"
    num_time_buckets: int = Field(40, gt=0)
    time_unit_ms: float = Field(1000.0, gt=0)
    use_event_weight: bool = True
    causal: bool = False

    @model_validator(mode="after")
    def _check_heads(self) -> UserTowerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


def log_gap_buckets(timestamps_ms: torch.Tensor, origin_ms: torch.Tensor, num_buckets: int,
                    unit_ms: float = 1000.0) -> torch.Tensor:
    """``clamp(floor(log2(1 + max(t_origin - t, 0) / unit)), 0, num_buckets - 1)``.

    Args:
        timestamps_ms: ``(B, N)`` int64 event times in ms.
        origin_ms: ``(B,)`` int64 time the gaps are measured to (the tower: the history's latest event).

    Example::

        log_gap_buckets(torch.tensor([[0, 3000]]), torch.tensor([4000]), 40)   # tensor([[2, 1]])
    """
    gap = (origin_ms[:, None] - timestamps_ms).clamp(min=0).double() / unit_ms  # (B, N)
    return torch.floor(torch.log2(1.0 + gap)).long().clamp(0, num_buckets - 1)


class UserTower(SavableModule):
    """Time-aware transformer over the user's recent item vectors; see the module docstring.

    Args:
        config: a :class:`UserTowerConfig`.
    """

    config_class = UserTowerConfig

    def __init__(self, config: UserTowerConfig):
        super().__init__(config)
        c = config
        self.input = nn.Linear(c.item_dim, c.d_model)
        self.recency = nn.Embedding(c.max_history, c.d_model)
        self.time = nn.Embedding(c.num_time_buckets, c.d_model) if c.time_encoding == "log_gap" else None
        self.weight_proj = nn.Linear(1, c.d_model) if c.use_event_weight else None
        self.query = nn.Parameter(0.02 * torch.randn(c.d_model))
        self.blocks = nn.ModuleList(TransformerBlock(c.d_model, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.item_dim)

    def forward(self, item_vecs: torch.Tensor, mask: torch.Tensor, timestamps_ms: torch.Tensor | None = None,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """User vectors.

        Args:
            item_vecs: ``(B, N, item_dim)`` item-tower vectors, oldest first, left-padded.
            mask: ``(B, N)`` bool, True for real interactions. Padded values are never read.
            timestamps_ms: ``(B, N)`` int64 event times; needed when ``time_encoding="log_gap"``.
            weights: ``(B, N)`` event weights; defaults to 1.

        Returns:
            ``(B, item_dim)`` L2-normalised; a row with no history gives the learned default.
        """
        c = self.config
        N = min(item_vecs.shape[1], c.max_history)
        item_vecs, mask = item_vecs[:, -N:], mask[:, -N:].bool()  # (B, N, E), (B, N)
        B = item_vecs.shape[0]
        x = torch.where(mask[..., None], item_vecs, torch.zeros_like(item_vecs))  # (B, N, E)
        h = self.input(x)  # (B, N, D)
        h = h + self.recency(torch.arange(N - 1, -1, -1, device=h.device))  # (B, N, D)
        if self.time is not None:
            if timestamps_ms is None:
                raise ValueError("time_encoding='log_gap' needs timestamps_ms")
            ts = timestamps_ms[:, -N:]  # (B, N)
            latest = torch.where(mask, ts, torch.zeros_like(ts)).amax(dim=1)  # (B,) the gaps' origin
            h = h + self.time(log_gap_buckets(ts, latest, c.num_time_buckets, c.time_unit_ms))
        if self.weight_proj is not None:
            w = torch.ones_like(mask, dtype=h.dtype) if weights is None else weights[:, -N:].to(h.dtype)
            w = torch.where(mask, w, torch.zeros_like(w)).clamp(min=0)  # (B, N)
            h = h + self.weight_proj(torch.log1p(w)[..., None])  # (B, N, D)
        h = torch.where(mask[..., None], h, torch.zeros_like(h))  # padded tokens carry nothing
        h = torch.cat([h, self.query.expand(B, 1, -1)], dim=1)  # (B, N + 1, D)
        valid = torch.cat([mask, mask.new_ones(B, 1)], dim=1)  # (B, N + 1)
        allowed = attention_mask(valid, causal=c.causal)  # (B, N + 1, N + 1); query row sees all
        for block in self.blocks:
            h = block(h, allowed)
        w = mask[..., None].to(h.dtype)  # (B, N, 1)
        count = w.sum(1).clamp(min=1.0)  # (B, 1)
        pooled = h[:, -1] + (h[:, :-1] * w).sum(1) / count  # (B, D)
        # Identity path: the mean history item vector (0 for an empty history) plus the learned part.
        skip = (x * w).sum(1) / count  # (B, E)
        return F.normalize(self.head(self.ln(pooled)) + skip, dim=-1)  # (B, item_dim)
