"""Item tower: fuses frozen per-modality embeddings (and an optional hashed item id) into one vector.

Each modality's encoder embedding goes through its own MLP into a ``d_model`` token (plus a learned
modality-type vector). A learned CLS token attends over the present tokens through a few transformer
blocks; missing modalities are key-padding masked, so their values never matter, and the CLS token
alone is a learned "empty item" vector when nothing is present. The CLS output plus the mean of
the present tokens' outputs (a direct path that speeds up early training) is projected to
``out_dim`` and L2-normalised. During training whole present modalities are dropped at random
(never all of them), so the tower also works for items with one modality and for single-modality
queries (:meth:`ItemTower.project`).

Example::

    cfg = ItemTowerConfig(modality_dims={"text": 384, "image": 512}, d_model=64, out_dim=64)
    tower = ItemTower(cfg)
    v = tower({"text": torch.randn(8, 384), "image": torch.randn(8, 512)},
              masks={"image": torch.rand(8) > 0.5})             # (8, 64), unit norm
    q = tower.project("text", torch.randn(2, 384))              # (2, 64), same space
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from tessera.config import TesseraConfig
from tessera.models.artifacts import SavableModule
from tessera.models.layers import TransformerBlock, attention_mask, mlp


class ItemTowerConfig(TesseraConfig):
    """Config of :class:`ItemTower`.

    Args:
        modality_dims: encoder embedding width per modality name (order is kept in artifacts).
        d_model: width of the modality tokens and the fusion transformer.
        n_heads: attention heads in the fusion transformer.
        n_layers: fusion transformer blocks.
        proj_hidden: hidden width of each per-modality projection MLP.
        dropout: dropout inside projections and fusion.
        modality_dropout: probability of dropping each present modality while training.
        num_id_buckets: hashed item-id embedding buckets; 0 turns the id token off.
        id_dropout: probability of dropping the id token while training (cold-start robustness).
        out_dim: width of the output vector (the retrieval space).
        input_norm: standardise each modality's embedding with per-dimension statistics held as
            buffers (set them with :meth:`ItemTower.set_input_stats`; saved with the weights).
            Frozen encoder embeddings often share a large common component, and an L2-normalised
            384-d vector has entries of ~0.05, below the projection's bias terms; without
            standardisation the towers sit on a long plateau.
    """

    modality_dims: dict[str, int] = Field(default_factory=lambda: {"text": 384, "image": 512, "audio": 256})
    d_model: int = Field(128, gt=0)
    n_heads: int = Field(4, gt=0)
    n_layers: int = Field(1, ge=0)
    proj_hidden: int = Field(256, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    modality_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_id_buckets: int = Field(0, ge=0)
    id_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    out_dim: int = Field(128, gt=0)
    input_norm: bool = False

    @field_validator("modality_dims")
    @classmethod
    def _check_modalities(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("at least one modality is needed")
        for name, dim in v.items():
            if not name.isidentifier() or dim <= 0:
                raise ValueError(f"modality {name!r}: names must be identifiers and dims positive")
        return v

    @model_validator(mode="after")
    def _check_heads(self) -> ItemTowerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self


def hash_item_ids(item_ids: Sequence[str], num_buckets: int) -> torch.Tensor:
    """Stable bucket per item id string (blake2b, identical across processes and machines).

    Python's ``hash()`` is salted per process, so it cannot be used for embeddings shared between
    Ray workers and serving replicas.

    Example::

        hash_item_ids(["sku-1", "sku-2"], 1000)     # tensor([..., ...]), values in [0, 1000)
    """
    if num_buckets <= 0:
        raise ValueError("num_buckets must be positive")
    digests = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in item_ids]
    return torch.tensor([d % num_buckets for d in digests], dtype=torch.long)


def drop_modalities(present: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop each present modality with probability ``p``, keeping at least one per item that had one.

    Args:
        present: ``(B, M)`` bool.
        p: drop probability.

    Returns:
        ``(B, M)`` bool, a subset of ``present``; rows with any present modality keep at least one.
    """
    r = torch.rand(present.shape, device=present.device, generator=generator)  # (B, M)
    keep = present & (r >= p)
    lost_all = present.any(dim=1) & ~keep.any(dim=1)  # (B,)
    # For a row that lost everything, restore the present modality with the largest draw.
    rescue = torch.where(present, r, torch.full_like(r, -1.0)).argmax(dim=1)  # (B,)
    restore = F.one_hot(rescue, present.shape[1]).bool() & lost_all[:, None]
    return keep | restore


class ItemTower(SavableModule):
    """Fuses per-modality embeddings into one L2-normalised item vector; see the module docstring.

    Args:
        config: an :class:`ItemTowerConfig`.
    """

    config_class = ItemTowerConfig

    def __init__(self, config: ItemTowerConfig):
        super().__init__(config)
        c = config
        self.modalities = list(c.modality_dims)
        self.projections = nn.ModuleDict(
            {m: mlp(dim, [c.proj_hidden], c.d_model, c.dropout) for m, dim in c.modality_dims.items()})
        self.type_embeddings = nn.ParameterDict(
            {m: nn.Parameter(0.02 * torch.randn(c.d_model)) for m in self.modalities})
        self.cls = nn.Parameter(0.02 * torch.randn(c.d_model))
        self.id_embedding = nn.Embedding(c.num_id_buckets, c.d_model) if c.num_id_buckets else None
        self.blocks = nn.ModuleList(TransformerBlock(c.d_model, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.out_dim)
        if c.input_norm:
            for m, dim in c.modality_dims.items():
                self.register_buffer(f"input_mean_{m}", torch.zeros(dim))
                self.register_buffer(f"input_scale_{m}", torch.ones(dim))

    @torch.no_grad()
    def set_input_stats(self, embeddings: Mapping[str, torch.Tensor], present: Mapping[str, torch.Tensor]) -> None:
        """Set the ``input_norm`` statistics from a catalog: per modality, the mean and 1 / std of the
        present rows of ``embeddings[m]`` (``(I, Dm)``; ``present[m]`` is ``(I,)`` bool)."""
        if not self.config.input_norm:
            raise ValueError("this tower was built with input_norm=False")
        for m in self.modalities:
            x = embeddings[m][present[m].bool()]
            if len(x) < 2:
                continue
            getattr(self, f"input_mean_{m}").copy_(x.mean(0))
            getattr(self, f"input_scale_{m}").copy_(1.0 / (x.std(0) + 1e-6))

    def _token(self, modality: str, emb: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        # Zero missing rows first: NaN placeholders must not reach the (masked) attention values.
        x = torch.where(present[:, None], emb, torch.zeros_like(emb))  # (B, Dm)
        if self.config.input_norm:
            mean, scale = getattr(self, f"input_mean_{modality}"), getattr(self, f"input_scale_{modality}")
            x = torch.where(present[:, None], (x - mean) * scale, torch.zeros_like(x))  # (B, Dm)
        return self.projections[modality](x) + self.type_embeddings[modality]  # (B, D)

    def _fuse(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B = tokens.shape[0]
        h = torch.cat([self.cls.expand(B, 1, -1), tokens], dim=1)  # (B, 1 + T, D)
        valid = torch.cat([valid.new_ones(B, 1), valid], dim=1)  # (B, 1 + T)
        allowed = attention_mask(valid)  # (B, 1 + T, 1 + T)
        for block in self.blocks:
            h = block(h, allowed)
        w = valid[:, 1:, None].to(h.dtype)  # (B, T, 1)
        pooled = h[:, 0] + (h[:, 1:] * w).sum(1) / w.sum(1).clamp(min=1.0)  # (B, D)
        return F.normalize(self.head(self.ln(pooled)), dim=-1)  # (B, out_dim)

    def _inputs(self, embeddings: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None,
                ) -> tuple[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        unknown = set(embeddings) - set(self.modalities)
        if unknown:
            raise KeyError(f"unknown modalities {sorted(unknown)}; this tower has {self.modalities}")
        if not embeddings:
            raise ValueError("pass at least one modality tensor (rows may all be masked)")
        ref = next(iter(embeddings.values()))
        B = ref.shape[0]
        out = {}
        for m in self.modalities:
            if m in embeddings:
                x = embeddings[m]
                present = torch.isfinite(x).all(dim=-1)  # (B,) non-finite rows count as missing
                if masks is not None and m in masks:
                    present = present & masks[m].bool()
            else:
                x = ref.new_zeros(B, self.config.modality_dims[m])
                present = torch.zeros(B, dtype=torch.bool, device=ref.device)
            out[m] = (x, present)
        return B, out

    def forward(self, embeddings: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None,
                id_buckets: torch.Tensor | None = None) -> torch.Tensor:
        """Fused item vectors.

        Args:
            embeddings: modality -> ``(B, dim)`` float; a modality left out is missing for all items.
            masks: modality -> ``(B,)`` bool, True where present. Rows that are not finite count as
                missing either way, so NaN placeholders for absent embeddings are fine.
            id_buckets: ``(B,)`` long from :func:`hash_item_ids`, ``-1`` for no id; ignored unless
                ``num_id_buckets > 0``.

        Returns:
            ``(B, out_dim)`` L2-normalised.
        """
        B, inputs = self._inputs(embeddings, masks)
        present = torch.stack([inputs[m][1] for m in self.modalities], dim=1)  # (B, M)
        if self.training and self.config.modality_dropout > 0:
            present = drop_modalities(present, self.config.modality_dropout)
        tokens = torch.stack([self._token(m, inputs[m][0], present[:, i])
                              for i, m in enumerate(self.modalities)], dim=1)  # (B, M, D)
        valid = present
        if self.id_embedding is not None and id_buckets is not None:
            has_id = id_buckets >= 0  # (B,)
            if self.training and self.config.id_dropout > 0:
                has_id = has_id & (torch.rand(B, device=has_id.device) >= self.config.id_dropout)
            id_tok = self.id_embedding(id_buckets.clamp(min=0))  # (B, D)
            tokens = torch.cat([id_tok[:, None], tokens], dim=1)  # (B, 1 + M, D)
            valid = torch.cat([has_id[:, None], present], dim=1)  # (B, 1 + M)
        return self._fuse(tokens, valid)

    def modality_vectors(self, embeddings: Mapping[str, torch.Tensor],
                         masks: Mapping[str, torch.Tensor] | None = None,
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Single-modality vectors of the same items, for the cross-modal alignment loss.

        Returns:
            modality -> (``(B, out_dim)`` unit vectors, ``(B,)`` bool present). Rows of missing
            modalities hold the "empty item" vector and must be ignored via the bool.
        """
        _, inputs = self._inputs(embeddings, masks)
        names = [m for m in self.modalities if m in embeddings]
        tokens = torch.cat([self._token(m, *inputs[m]) for m in names])  # (M' * B, D)
        valid = torch.cat([inputs[m][1] for m in names])  # (M' * B,)
        vecs = self._fuse(tokens[:, None], valid[:, None]).chunk(len(names))  # M' x (B, out_dim)
        return {m: (v, inputs[m][1]) for m, v in zip(names, vecs, strict=True)}

    def project(self, modality: str, emb: torch.Tensor) -> torch.Tensor:
        """L2-normalised vector of a single-modality query in the item space (cross-modal search).

        Args:
            modality: one of the config's modalities.
            emb: ``(B, dim)`` or ``(dim,)`` encoder embedding(s).

        Returns:
            ``(B, out_dim)`` (or ``(out_dim,)``) unit vectors, comparable with :meth:`forward` outputs.
        """
        if modality not in self.config.modality_dims:
            raise KeyError(f"unknown modality {modality!r}; this tower has {self.modalities}")
        single = emb.dim() == 1
        x = emb[None] if single else emb
        if not torch.isfinite(x).all():
            raise ValueError(f"{modality} query embedding is not finite")
        vec, _ = self.modality_vectors({modality: x})[modality]
        return vec[0] if single else vec
