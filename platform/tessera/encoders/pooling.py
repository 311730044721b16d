"""Pooling of token / frame sequences and feature maps into one vector per item.

Example::

    hidden = model(input_ids, attention_mask=mask).last_hidden_state   # (B, L, D)
    vectors = pool_sequence(hidden, mask.bool(), "mean")              # (B, D)
"""

from __future__ import annotations

import torch

SEQUENCE_POOLINGS = ("mean", "avg", "max", "cls")
SPATIAL_POOLINGS = ("avg", "mean", "max")


def pool_sequence(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool a padded sequence over its valid positions.

    Args:
        hidden: ``(B, L, D)`` token or frame states.
        mask: ``(B, L)`` bool, True at valid positions (each row has at least one).
        how: ``mean`` (alias ``avg``) over valid positions, ``max`` over valid positions, or ``cls``
            (the first position, as BERT-style models are trained for).

    Returns:
        ``(B, D)`` in the dtype of ``hidden``.
    """
    if how == "cls":
        return hidden[:, 0]  # (B, D)
    m = mask.unsqueeze(-1)  # (B, L, 1)
    if how in ("mean", "avg"):
        summed = (hidden * m.to(hidden.dtype)).sum(dim=1)  # (B, D)
        count = m.sum(dim=1).clamp(min=1).to(hidden.dtype)  # (B, 1)
        return summed / count
    if how == "max":
        return hidden.masked_fill(~m, torch.finfo(hidden.dtype).min).amax(dim=1)  # (B, D)
    raise ValueError(f"unknown sequence pooling {how!r}; expected one of {SEQUENCE_POOLINGS}")


def pool_spatial(features: torch.Tensor, how: str) -> torch.Tensor:
    """Pool a ``(B, C, H, W)`` feature map to ``(B, C)`` by ``avg`` (alias ``mean``) or ``max``."""
    if how in ("avg", "mean"):
        return features.mean(dim=(2, 3))  # (B, C)
    if how == "max":
        return features.amax(dim=(2, 3))  # (B, C)
    raise ValueError(f"unknown spatial pooling {how!r}; expected one of {SPATIAL_POOLINGS}")


def pool_features(features: torch.Tensor, how: str) -> torch.Tensor:
    """Pool a vision backbone's output: a ``(B, C, H, W)`` map or a ``(B, L, D)`` token sequence."""
    if features.ndim == 4:
        return pool_spatial(features, how)
    if features.ndim == 3:
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)  # (B, L)
        return pool_sequence(features, mask, how)
    if features.ndim == 2:
        return features  # already (B, D)
    raise ValueError(f"cannot pool backbone output of shape {tuple(features.shape)}")
