"""The ranker stage (plain torch): lists from the fused retrieval model, trained and evaluated.

For each training example the frozen fused towers score the full catalog, the user's history is
masked out (as at serving time), and when the target is in the retrieval top-K, ``num_hard`` hard
negatives drawn uniformly from that top-K, ``num_random`` uniform negatives and the positive form
one list (:meth:`RankerModel.training_lists`, :func:`tessera.models.build_ranker_examples`): the
lists look like the top-K that :meth:`RankerModel.rerank` re-orders. The ranker sees the history
and candidate item-tower vectors plus dense features: the retrieval score, per-modality cosine
between the candidate's raw encoder embedding and the history's mean and its nearest history item,
modality presence and log popularity.

At evaluation the top-K of retrieval is re-ordered by the ranker; items below the top-K keep their
retrieval order after it, so metrics stay full-catalog.

Example::

    rm = RankerModel.build(retrieval_model, counts, ranker_cfg, max_history=20)
    loss = rm(batch, rng)                                  # training
    scores = rm.rerank(eval_set.history, exclude=eval_set.train_items)   # (U, I)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from tessera.models import (
    HistoryBatch,
    Ranker,
    RankerConfig,
    build_ranker_examples,
    dense_feature_names,
    listwise_softmax_loss,
    ranker_bce_loss,
    ranker_dense_features,
)
from tessera.train.config import RankerSection
from tessera.train.examples import history_from_batch
from tessera.train.retrieval import TwoTowerModel


def place_ranked(scores: torch.Tensor, top: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``(U, I)`` scores with the re-ranked top-K (``top``, ``(U, K)`` columns) above every other item, in
    the order of their ranker ``logits`` (``(U, K)``), and the rest after them in retrieval order.

    Each row's retrieval scores are shifted below its lowest logit; the logits keep their own values. (A
    constant offset of 1e4 added to the logits left float32 steps of ~0.001 there: logits closer than that
    tied, and the metrics broke the tie by catalog row, not by the ranker.)"""
    out = scores.clone()
    if top.shape[1] == 0:
        return out

    def finite_or(x: torch.Tensor, fill: float) -> torch.Tensor:  # excluded items score -inf
        return torch.where(torch.isfinite(x), x, torch.full_like(x, fill))

    lowest = finite_or(logits, float("inf")).amin(dim=1, keepdim=True)
    lowest = finite_or(lowest, 0.0)  # a row whose candidates are all excluded
    shift = finite_or(scores, float("-inf")).amax(dim=1, keepdim=True)
    shift = finite_or(shift, 0.0) - lowest + 1.0  # (U, 1)
    out -= shift  # -inf (excluded) stays -inf
    return out.scatter_(1, top, logits.to(out.dtype))


def mask_rows(scores: torch.Tensor, rows: Sequence[np.ndarray] | torch.Tensor, mask: torch.Tensor | None = None,
              ) -> torch.Tensor:
    """``scores`` with each user's ``rows`` set to ``-inf`` (seen items are never candidates)."""
    out = scores.clone()
    if isinstance(rows, torch.Tensor):  # (B, N) padded history, with its mask
        r = rows.masked_fill(~mask, -1) if mask is not None else rows
        b = torch.arange(len(r), device=r.device)[:, None].expand_as(r)
        keep = r >= 0
        out[b[keep], r[keep]] = float("-inf")
        return out
    lengths = [len(seen) for seen in rows]
    if sum(lengths):  # one indexing op for the whole batch
        r = torch.from_numpy(np.concatenate([np.asarray(seen, dtype=np.int64) for seen in rows])).to(out.device)
        b = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths)).to(out.device)
        out[b, r] = float("-inf")
    return out


class RankerModel(nn.Module):
    """A :class:`Ranker` on top of a frozen :class:`TwoTowerModel`; ``forward`` is the training loss."""

    def __init__(self, ranker: Ranker, retrieval: TwoTowerModel, counts: torch.Tensor, cfg: RankerSection):
        super().__init__()
        if cfg.residual:  # start exactly at the retrieval order: the last layer outputs 0
            last = ranker.score_mlp[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.ranker, self.retrieval, self.cfg = ranker, retrieval.eval().requires_grad_(False), cfg
        self.counts = counts  # (I,) training interactions per item: log1p of it is the popularity feature
        self._item_vecs: torch.Tensor | None = None

    @classmethod
    def build(cls, retrieval: TwoTowerModel, counts: np.ndarray, cfg: RankerSection, max_history: int) -> RankerModel:
        mods = retrieval.catalog.modalities
        ranker = Ranker(RankerConfig(item_dim=retrieval.item_tower.config.out_dim,
                                     dense_features=dense_feature_names(mods), attention_hidden=[32],
                                     mlp_hidden=[64, 32], max_history=max_history))
        return cls(ranker, retrieval, torch.as_tensor(counts, dtype=torch.float32), cfg)

    def train(self, mode: bool = True) -> RankerModel:
        super().train(mode)
        self.retrieval.eval()  # frozen: no dropout, no modality dropout
        return self

    @property
    def item_vecs(self) -> torch.Tensor:
        """``(I, D)`` frozen fused item vectors, computed once."""
        if self._item_vecs is None:
            self._item_vecs = self.retrieval.all_item_vectors()
        return self._item_vecs

    @torch.no_grad()
    def retrieve(self, hist: HistoryBatch) -> torch.Tensor:
        """``(B, I)`` retrieval scores with the history's items at ``-inf``."""
        scores, _ = self.retrieval.score(hist, self.item_vecs)
        return mask_rows(scores, hist.item_idx, hist.mask)

    def logits(self, hist: HistoryBatch, candidates: torch.Tensor, scores: torch.Tensor,
               own_event: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C)`` ranker logits of ``candidates`` (catalog rows) given full retrieval ``scores``.

        ``own_event`` (``(B, C)`` bool, training): candidates whose training count includes the example's
        own event (its positive). That event is left out of their popularity: counted in, every positive
        had at least one interaction, and the ranker learned "never interacted with: never the answer",
        which a held-out or future event (not in the counts) contradicts for cold items."""
        cat, vecs = self.retrieval.catalog, self.item_vecs
        cand_modal, cand_present = cat.features(candidates)  # m -> (B, C, Dm), (B, C)
        hist_modal, hist_present = cat.features(hist.item_idx)  # m -> (B, N, Dm), (B, N)
        hist_present = {m: p & hist.mask for m, p in hist_present.items()}
        retrieval = scores.gather(1, candidates)
        retrieval = torch.where(torch.isfinite(retrieval), retrieval, torch.full_like(retrieval, -1.0))
        counts = self.counts.to(candidates.device)[candidates]  # (B, C)
        if own_event is not None:
            counts = (counts - own_event.float()).clamp_min(0.0)
        dense = ranker_dense_features(retrieval, torch.log1p(counts),
                                      cand_modal, cand_present, hist_modal, hist_present, cat.modalities)
        correction = self.ranker(vecs[hist.item_idx], hist.mask, vecs[candidates], dense)  # (B, C)
        if self.cfg.residual:  # the ranker corrects the retrieval logit instead of replacing it
            return retrieval / self.retrieval.cfg.temperature + correction
        return correction

    def training_lists(self, target: torch.Tensor, scores: torch.Tensor, rng: np.random.Generator,
                       excluded: Sequence[np.ndarray] | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Lists drawn like the ones :meth:`rerank` re-orders: ``(keep, candidates, labels)``.

        Only examples whose target is in the retrieval top-K keep a list (``keep``, ``(B,)`` bool):
        re-ranking the top-K cannot move a target outside it, and a list that always holds the
        positive whatever its retrieval rank teaches the ranker that ranks past ``num_hard`` mean
        "positive" (they are never negatives there) and so pushes the top of retrieval down.
        Hard negatives are ``num_hard`` items drawn uniformly from the top-K (all of it when
        ``num_hard >= K - 1``), not its best-ranked ones, for the same reason; ``num_random``
        uniform items follow, none of them in the example's ``excluded`` rows (the items seen before,
        which ``scores`` masks: never a candidate at serving), unless the user has seen too much of the
        catalog to fill a list. ``candidates``/``labels`` are ``(B', 1 + H + R)``, positive first.
        """
        k = min(self.cfg.candidates, scores.shape[1])
        top = scores.topk(k, dim=1).indices  # (B, K)
        keep = (top == target[:, None]).any(dim=1)  # (B,)
        top, target = top[keep], target[keep]
        if not len(target):
            empty = torch.zeros(0, 1 + min(self.cfg.num_hard, k - 1) + self.cfg.num_random, dtype=torch.long)
            return keep, empty.to(target.device), empty.float().to(target.device)
        gen = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
        shuffled = top.gather(1, torch.rand(top.shape, generator=gen).argsort(dim=1).to(top.device))  # (B', K)
        ex = build_ranker_examples(target.cpu().numpy(), shuffled.cpu().numpy(), scores.shape[1],
                                   min(self.cfg.num_hard, k - 1), self.cfg.num_random, rng,
                                   excluded=None if excluded is None else
                                   [excluded[i] for i in torch.nonzero(keep).flatten().tolist()])
        return keep, torch.from_numpy(ex.candidates).to(target.device), torch.from_numpy(ex.labels).to(target.device)

    def forward(self, batch: dict[str, torch.Tensor], rng: np.random.Generator,
                seen: Sequence[np.ndarray] | None = None) -> torch.Tensor:
        """Training loss over the lists of one batch of examples (see :meth:`training_lists`); ``seen``:
        each example's items before its target (:meth:`~tessera.train.examples.UserTimelines.seen_before`), left out
        of its list as evaluation and serving leave out seen items (None: the history's items only)."""
        hist = history_from_batch(batch)
        target = batch["target"].long()
        scores = self.retrieve(hist)  # (B, I)
        if seen is not None:
            scores = mask_rows(scores, seen)
        else:  # the history's items, as retrieve masked them
            idx, mask = hist.item_idx.cpu().numpy(), hist.mask.cpu().numpy()
            seen = [row[m] for row, m in zip(idx, mask, strict=True)]
        keep, candidates, labels = self.training_lists(target, scores, rng, excluded=seen)
        if not keep.any():  # no target in the top-K: a zero loss still reaches every parameter (DDP)
            return sum(p.sum() for p in self.ranker.parameters()) * 0.0
        hist = HistoryBatch(hist.item_idx[keep], hist.mask[keep], hist.timestamps_ms[keep], hist.weights[keep])
        logits = self.logits(hist, candidates, scores[keep], own_event=labels > 0)
        if self.cfg.loss == "bce":
            return ranker_bce_loss(logits, labels)
        return listwise_softmax_loss(logits, labels)

    @torch.no_grad()
    def rerank(self, hist: HistoryBatch, exclude: Sequence[np.ndarray] | None = None,
               chunk: int = 256) -> torch.Tensor:
        """``(U, I)`` full-catalog scores on the host: retrieval top-K re-ordered by the ranker, the rest after
        it. Computed ``chunk`` users at a time on the catalog's device, each chunk copied to the host as it
        is done: on a GPU the whole matrix (users x items x 4 bytes, 40 GB for 100k x 100k) is host RAM's
        to hold, as on a CPU, not the device's."""
        device = self.item_vecs.device
        outs = []
        for s in range(0, len(hist), chunk):
            h = hist.rows(s, s + chunk).to(device)
            scores = self.retrieve(h)
            if exclude is not None:
                scores = mask_rows(scores, exclude[s:s + chunk])
            top = scores.topk(min(self.cfg.candidates, scores.shape[1]), dim=1).indices  # (b, K)
            outs.append(place_ranked(scores, top, self.logits(h, top, scores)).cpu())
        return torch.cat(outs)
