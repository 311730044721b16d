from __future__ import annotations

import pytest
import torch

from tessera.models import UserTower, UserTowerConfig, pad_histories
from tessera.models.user_tower import log_gap_buckets

DAY = 86_400_000


def tiny(**kw) -> UserTower:
    cfg = dict(item_dim=8, d_model=16, n_layers=2, n_heads=2, dropout=0.0, max_history=6)
    cfg.update(kw)
    return UserTower(UserTowerConfig(**cfg)).eval()


def histories(lengths: list[int], N: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    items = [list(range(n)) for n in lengths]
    ts = [[1_000 * DAY + i * DAY for i in range(n)] for n in lengths]
    h = pad_histories(items, N, timestamps=ts)
    vecs = torch.nn.functional.normalize(torch.randn(len(lengths), N, 8, generator=g), dim=-1)
    return vecs, h


def test_shapes_and_unit_norm():
    tower = tiny()
    vecs, h = histories([6, 3, 1])
    out = tower(vecs, h.mask, h.timestamps_ms, h.weights)
    assert out.shape == (3, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("causal", [False, True])
def test_empty_and_short_histories_are_finite_with_finite_gradients(causal):
    tower = tiny(causal=causal).train()
    vecs, h = histories([0, 1, 0, 6])
    vecs = vecs.masked_fill(~h.mask[..., None], float("nan"))  # padded slots hold garbage
    out = tower(vecs, h.mask, h.timestamps_ms, h.weights)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    out.sum().backward()
    for name, p in tower.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_empty_history_gives_one_learned_default():
    tower = tiny(causal=True)
    vecs, h = histories([0, 0])
    out = tower(vecs, h.mask, h.timestamps_ms)
    torch.testing.assert_close(out[0], out[1])  # nothing user-specific: the learned default


def test_padded_values_do_not_matter_and_padding_length_does_not_matter():
    tower = tiny(causal=True)
    vecs, h = histories([3, 2])
    ref = tower(vecs, h.mask, h.timestamps_ms, h.weights)
    noisy = torch.where(h.mask[..., None], vecs, torch.full_like(vecs, 1e4))
    torch.testing.assert_close(tower(noisy, h.mask, h.timestamps_ms, h.weights), ref)
    # The same histories padded to 4 instead of 6 (recency counts from the right).
    short = pad_histories([list(range(3)), list(range(2))], 4,
                          timestamps=[h.timestamps_ms[0, -3:].tolist(), h.timestamps_ms[1, -2:].tolist()])
    torch.testing.assert_close(tower(vecs[:, -4:], short.mask, short.timestamps_ms, short.weights), ref,
                               rtol=1e-5, atol=1e-6)


def test_longer_input_is_cut_to_max_history():
    tower = tiny(max_history=4)
    vecs, h = histories([6, 5], N=6)
    full = tower(vecs, h.mask, h.timestamps_ms)
    cut = tower(vecs[:, -4:], h.mask[:, -4:], h.timestamps_ms[:, -4:])
    torch.testing.assert_close(full, cut)


def test_time_gaps_and_weights_change_the_vector_but_the_clock_does_not():
    tower = tiny()
    vecs, h = histories([4])
    base = tower(vecs, h.mask, h.timestamps_ms, h.weights)
    spread = h.timestamps_ms.clone()
    spread[0, -4] -= 300 * DAY  # the oldest event much older: its gap to the latest changes
    assert not torch.allclose(base, tower(vecs, h.mask, spread, h.weights))
    assert not torch.allclose(base, tower(vecs, h.mask, h.timestamps_ms, h.weights * 5))
    # only gaps to the history's latest event count: the same history a year later is the same user
    later = torch.where(h.mask, h.timestamps_ms + 365 * DAY, h.timestamps_ms)
    torch.testing.assert_close(tower(vecs, h.mask, later, h.weights), base)
    untimed = tiny(time_encoding="none", use_event_weight=False)
    torch.testing.assert_close(untimed(vecs, h.mask), untimed(vecs, h.mask, h.timestamps_ms))


def test_the_tower_takes_no_request_time():
    """Training placed the request at the next event's time and serving at the last history event's, so
    the newest item had a gap bucket at serving that training never gave it. The gaps' origin is now the
    history's own latest event: there is no time argument for a caller to set differently."""
    import inspect

    assert list(inspect.signature(UserTower.forward).parameters) == ["self", "item_vecs", "mask", "timestamps_ms",
                                                                     "weights"]


def test_log_gap_buckets_by_hand():
    ts = torch.tensor([[0, 3_000, 4_000, 5_000, 0]])
    out = log_gap_buckets(ts, torch.tensor([4_000]), num_buckets=40)
    # gaps 4 s, 1 s, 0 s, -1 s (future: clamped to 0) -> floor(log2(1 + gap)) = 2, 1, 0, 0
    assert out.tolist() == [[2, 1, 0, 0, 2]]
    assert log_gap_buckets(torch.tensor([[0]]), torch.tensor([10**15]), num_buckets=8).item() == 7


def test_save_load_round_trip(tmp_path):
    tower = tiny(causal=True, num_time_buckets=12, time_unit_ms=60_000.0)
    vecs, h = histories([5, 0, 2])
    tower.save(tmp_path)
    loaded = UserTower.load(tmp_path)
    assert loaded.config == tower.config
    torch.testing.assert_close(loaded(vecs, h.mask, h.timestamps_ms, h.weights),
                               tower(vecs, h.mask, h.timestamps_ms, h.weights), rtol=1e-5, atol=1e-6)
