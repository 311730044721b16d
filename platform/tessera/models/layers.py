"""Small building blocks shared by the towers and the ranker: MLPs and a masked transformer block.

The transformer block takes an explicit boolean "may attend" mask. :func:`attention_mask` always
lets a position attend to itself, so no query row is ever fully masked: a fully masked softmax row is
NaN, and a NaN value at a padded position would poison every row in the next layer through
``0 * NaN = NaN`` in the attention-weighted sum.

Example::

    block = TransformerBlock(d_model=32, n_heads=4, dropout=0.0)
    valid = torch.tensor([[False, True, True]])           # left-padded sequence
    y = block(torch.randn(1, 3, 32), attention_mask(valid, causal=True))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float = 0.0,
        activation: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """``Linear -> activation -> Dropout`` per hidden width, then a final ``Linear`` to ``out_dim``.

    Args:
        in_dim: input width.
        hidden: hidden widths (may be empty: a single linear layer).
        out_dim: output width.
        dropout: dropout after each hidden activation.
        activation: activation module class.

    Example::

        head = mlp(64, [128], 1)        # 64 -> 128 -> 1
    """
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), activation(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


def attention_mask(valid: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """Boolean ``(B, T, T)`` mask, True where query ``i`` may attend to key ``j``.

    Keys that are not ``valid`` are masked; with ``causal`` a query also cannot see later keys. The
    diagonal is always allowed, so padded (or causally isolated) rows stay finite; their outputs are
    meaningless and callers must ignore or zero them.

    Args:
        valid: ``(B, T)`` bool, True for real tokens.
        causal: additionally mask keys after the query position.
    """
    B, T = valid.shape
    allowed = valid[:, None, :].expand(B, T, T)  # (B, T, T)
    if causal:
        allowed = allowed & torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return allowed | eye


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer encoder block (Vaswani et al. 2017) with an explicit bool mask.

    Args:
        d_model: token width.
        n_heads: attention heads; must divide ``d_model``.
        dropout: dropout on attention weights and residual branches.
        ff_mult: feed-forward hidden width as a multiple of ``d_model``.

    Example::

        block = TransformerBlock(32, 4, 0.1)
        y = block(x, attention_mask(valid))     # x: (B, T, 32), valid: (B, T)
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, ff_mult: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = mlp(d_model, [ff_mult * d_model], d_model, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape  # (B, T, D)
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)  # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(  # (B, H, T, D/H)
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(B, T, D)))  # (B, T, D)
        return x + self.drop(self.ff(self.ln2(x)))  # (B, T, D)
