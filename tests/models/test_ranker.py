from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tessera.models import Ranker, RankerConfig, dense_feature_names, ranker_bce_loss


def tiny(**kw) -> Ranker:
    cfg = dict(item_dim=8, dense_features=["retrieval_score", "log_popularity"], attention_hidden=[12],
               mlp_hidden=[16], dropout=0.0, max_history=5)
    cfg.update(kw)
    return Ranker(RankerConfig(**cfg)).eval()


def inputs(B: int = 3, N: int = 5, C: int = 4):
    hist = F.normalize(torch.randn(B, N, 8), dim=-1)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :3] = False
    mask[2] = False  # empty history
    cands = F.normalize(torch.randn(B, C, 8), dim=-1)
    dense = torch.randn(B, C, 2)
    return hist, mask, cands, dense


def test_dense_feature_names():
    assert dense_feature_names(["text", "audio"]) == [
        "retrieval_score", "sim_text", "sim_audio", "max_sim_text", "max_sim_audio", "has_text", "has_audio",
        "log_popularity"]
    assert len(RankerConfig().dense_features) == 11


def test_shapes_masking_and_empty_history():
    ranker = tiny()
    hist, mask, cands, dense = inputs()
    logits = ranker(hist, mask, cands, dense)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    garbage = hist.masked_fill(~mask[..., None], float("nan"))
    torch.testing.assert_close(ranker(garbage, mask, cands, dense), logits)
    w = ranker.attention_weights(hist, mask, cands)
    assert w.shape == (3, 4, 5)
    assert (w[1, :, :3] == 0).all() and (w[2] == 0).all()


def _concatenated_attention(ranker: Ranker, hist, mask, cands):
    """DIN's activation unit applied to ``[h, c, h - c, h * c]`` as written in the paper (the reference)."""
    B, N, D = hist.shape
    C = cands.shape[1]
    h, c = hist[:, None].expand(B, C, N, D), cands[:, :, None].expand(B, C, N, D)
    w = ranker.attention_unit(torch.cat([h, c, h - c, h * c], dim=-1)).squeeze(-1)
    return torch.where(mask[:, None, :], w, torch.zeros_like(w))


@pytest.mark.parametrize("hidden", [[12], [12, 6], []])
def test_factored_attention_equals_the_concatenated_unit(hidden):
    """attention_weights applies the first layer in parts; values and gradients match the concatenation."""
    torch.manual_seed(1)
    ranker = tiny(attention_hidden=hidden)
    for p in ranker.parameters():  # non-trivial weights everywhere (PReLU slopes, biases)
        torch.nn.init.normal_(p, std=0.5)
    hist, mask, cands, _ = inputs(B=3, N=5, C=7)
    fast = ranker.attention_weights(hist, mask, cands)
    ref = _concatenated_attention(ranker, hist, mask, cands)
    assert fast.shape == (3, 7, 5) and ref.abs().max() > 0.1
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(f.square().sum(), list(ranker.attention_unit.parameters()))
             for f in (fast, ref)]
    for g_fast, g_ref in zip(*grads, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_dense_features_are_used_and_checked():
    ranker = tiny()
    hist, mask, cands, dense = inputs()
    assert not torch.allclose(ranker(hist, mask, cands, dense), ranker(hist, mask, cands, dense + 1))
    with pytest.raises(ValueError, match="columns"):
        ranker(hist, mask, cands, dense[..., :1])
    with pytest.raises(ValueError, match="dense features"):
        ranker(hist, mask, cands)
    assert tiny(dense_features=[])(hist, mask, cands).shape == (3, 4)


def test_learns_target_attention():
    """Positive = the candidate close to one of the history items; needs attention, not a mean."""
    torch.manual_seed(0)
    ranker = tiny(dense_features=[], max_history=5).train()
    opt = torch.optim.Adam(ranker.parameters(), lr=1e-2)

    def make(B: int):
        hist = F.normalize(torch.randn(B, 5, 8), dim=-1)
        pos = F.normalize(hist[torch.arange(B), torch.randint(0, 5, (B,))] + 0.2 * torch.randn(B, 8), dim=-1)
        cands = torch.stack([pos, F.normalize(torch.randn(B, 8), dim=-1)], dim=1)  # (B, 2, 8)
        return hist, torch.ones(B, 5, dtype=torch.bool), cands, torch.tensor([[1.0, 0.0]]).expand(B, 2)

    for _ in range(150):
        hist, mask, cands, labels = make(64)
        loss = ranker_bce_loss(ranker(hist, mask, cands), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ranker.eval()
    hist, mask, cands, _ = make(500)
    with torch.no_grad():
        logits = ranker(hist, mask, cands)
    assert (logits[:, 0] > logits[:, 1]).float().mean() > 0.9


def test_save_load_round_trip(tmp_path):
    ranker = tiny(attention_hidden=[6, 4])
    hist, mask, cands, dense = inputs()
    ranker.save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["config"]["dense_features"] == ["retrieval_score", "log_popularity"]
    loaded = Ranker.load(tmp_path)
    torch.testing.assert_close(loaded(hist, mask, cands, dense), ranker(hist, mask, cands, dense),
                               rtol=1e-5, atol=1e-6)
