"""The retrieval model being trained: item tower + user tower behind one ``forward`` (plain torch).

DDP wants one module and one forward per step, so :class:`TwoTowerModel` wraps both towers and
returns the loss: in-batch sampled softmax with logQ correction (Yi et al. 2019) plus the
cross-modal InfoNCE between single-modality views of the batch's target items. Item vectors are
computed only for the distinct items of a batch (history + targets), never for the whole catalog.

A *variant* chooses what the item tower sees: ``fused`` (every modality), one modality alone, or
``id_only`` (hashed item ids, every modality masked out), so baselines are the same model with
less input.

Example::

    model = TwoTowerModel.build(variant("text", catalog.modalities), catalog, towers_cfg, log_q, max_history=20)
    loss = model(batch)                              # batch: example columns as tensors
    scores = model.score(eval_set.history)    # (U, I)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tessera.models import (
    HistoryBatch,
    ItemTower,
    ItemTowerConfig,
    UserTower,
    UserTowerConfig,
    cross_modal_infonce,
    log_sampling_probability,
    sampled_softmax_loss,
)
from tessera.train.catalog import ItemCatalog
from tessera.train.config import TowerSection
from tessera.train.examples import history_from_batch


@dataclass(frozen=True)
class Variant:
    """What the item tower of one trained model sees: ``modalities`` and/or hashed ``ids``."""

    name: str
    modalities: tuple[str, ...]
    ids: bool


def variant(name: str, modalities: list[str], fused_ids: bool = False) -> Variant:
    """``fused`` -> every modality; a modality name -> that one; ``id_only`` -> ids alone."""
    if name == "fused":
        return Variant(name, tuple(modalities), fused_ids)
    if name == "id_only":
        return Variant(name, (), True)
    if name not in modalities:
        raise ValueError(f"variant {name!r}: the embedding run has no such modality ({modalities})")
    return Variant(name, (name,), fused_ids)


def num_id_buckets(cfg: TowerSection, num_items: int) -> int:
    """``cfg.num_id_buckets``, or twice the catalog size rounded up to a power of two when 0."""
    return cfg.num_id_buckets or 1 << int(np.ceil(np.log2(max(2 * num_items, 2))))


class TwoTowerModel(nn.Module):
    """Item tower + user tower; ``forward(batch)`` is the training loss. See the module docstring.

    The catalog's tensors are plain attributes, not buffers: DDP would otherwise broadcast them
    every step.
    """

    def __init__(self, item_tower: ItemTower, user_tower: UserTower, catalog: ItemCatalog, var: Variant,
                 log_q: torch.Tensor, cfg: TowerSection):
        super().__init__()
        self.item_tower, self.user_tower = item_tower, user_tower
        self.catalog, self.variant, self.cfg = catalog, var, cfg
        self.log_q = log_q
        n_buckets = item_tower.config.num_id_buckets
        self.id_buckets = catalog.id_buckets(n_buckets) if var.ids and n_buckets else None

    @classmethod
    def build(cls, var: Variant, catalog: ItemCatalog, cfg: TowerSection, counts: np.ndarray,
              max_history: int) -> TwoTowerModel:
        """Fresh towers for ``var``; ``counts`` are training interactions per catalog row (for logQ)."""
        # id_only keeps one (always masked) modality slot: the tower needs at least one.
        dims = {m: catalog.dims[m] for m in (var.modalities or catalog.modalities[:1])}
        item = ItemTower(ItemTowerConfig(
            modality_dims=dims, d_model=cfg.d_model, n_heads=cfg.n_heads, n_layers=1, proj_hidden=cfg.proj_hidden,
            dropout=cfg.dropout, modality_dropout=cfg.modality_dropout, out_dim=cfg.out_dim,
            num_id_buckets=num_id_buckets(cfg, catalog.num_items) if var.ids else 0, input_norm=cfg.input_norm))
        if cfg.input_norm:
            item.set_input_stats(catalog.embeddings, catalog.present)
        user = UserTower(UserTowerConfig(item_dim=cfg.out_dim, d_model=cfg.d_model, n_heads=cfg.n_heads,
                                         n_layers=cfg.user_layers, dropout=cfg.dropout, max_history=max_history))
        return cls(item, user, catalog, var, log_sampling_probability(counts), cfg)

    def _inputs(self, rows: torch.Tensor):
        names = self.item_tower.modalities
        feats, masks = self.catalog.features(rows, names)
        if not self.variant.modalities:  # id_only: every modality is masked out
            masks = {m: torch.zeros_like(v) for m, v in masks.items()}
        ids = self.id_buckets[rows] if self.id_buckets is not None else None
        return feats, masks, ids

    def item_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """``(K,)`` catalog rows -> ``(K, out_dim)`` item vectors."""
        feats, masks, ids = self._inputs(rows)
        return self.item_tower(feats, masks, ids)

    def user_vectors(self, history: HistoryBatch, item_vecs: torch.Tensor) -> torch.Tensor:
        """User vectors from a history batch and the ``(I', D)`` vectors its ``item_idx`` points into."""
        return self.user_tower(item_vecs[history.item_idx], history.mask, history.timestamps_ms, history.weights)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Training loss of one batch of examples (columns of :mod:`tessera.train.examples`)."""
        hist = history_from_batch(batch)
        target = batch["target"].long()  # (B,)
        B, N = hist.item_idx.shape
        uniq, inv = torch.unique(torch.cat([hist.item_idx.reshape(-1), target]), return_inverse=True)  # (K,)
        vecs = self.item_vectors(uniq)  # (K, D)
        local = HistoryBatch(inv[: B * N].view(B, N), hist.mask, hist.timestamps_ms, hist.weights)
        user = self.user_vectors(local, vecs)  # (B, D)
        loss = sampled_softmax_loss(user, vecs[inv[B * N:]], self.log_q.to(user.device)[target],
                                    temperature=self.cfg.temperature, item_ids=target)
        if len(self.variant.modalities) > 1 and self.cfg.align_weight > 0:
            rows = target.unique()
            feats, masks, _ = self._inputs(rows)
            views = self.item_tower.modality_vectors(feats, masks)
            loss = loss + self.cfg.align_weight * cross_modal_infonce(views, self.cfg.align_temperature, ids=rows)
        return loss

    @torch.no_grad()
    def all_item_vectors(self, chunk: int = 4096) -> torch.Tensor:
        """``(I, out_dim)`` vectors of the whole catalog (call in eval mode)."""
        n = self.catalog.num_items
        device = self.catalog.device
        return torch.cat([self.item_vectors(torch.arange(s, min(s + chunk, n), device=device))
                          for s in range(0, n, chunk)])

    @torch.no_grad()
    def score(self, history: HistoryBatch, item_vecs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U, I)`` full-catalog scores (cosine) and the ``(U, D)`` user vectors (call in eval mode), on
        the catalog's device (the model's: the worker puts both there) wherever ``history`` is: the
        evaluation set stays on the host."""
        vecs = self.all_item_vectors() if item_vecs is None else item_vecs
        history = history.to(vecs.device)
        user = self.user_vectors(history, vecs)
        return user @ vecs.T, user
