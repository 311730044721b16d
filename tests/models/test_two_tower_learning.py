"""End-to-end learning check on the synthetic two-modality problem (see ``synthetic.py``).

Held-out items are cold (never seen in training), so only content generalises; the pair a user
likes is only identifiable from both modalities together. Expected on one thread in ~10 s: fused
Recall@10 close to 1, each single-modality tower about 0.3-0.45 (10 of ~35 same-category items),
popularity 0 (cold items have no interactions).
"""

from __future__ import annotations

from .synthetic import make_problem, popularity_recall, train_and_evaluate


def test_fused_towers_beat_single_modality_and_popularity():
    problem = make_problem(seed=0)
    pop = popularity_recall(problem)
    fused = train_and_evaluate(problem, ["a", "b"])
    only_a = train_and_evaluate(problem, ["a"])
    only_b = train_and_evaluate(problem, ["b"])
    report = f"recall@10 fused={fused:.3f} a={only_a:.3f} b={only_b:.3f} popularity={pop:.3f}"
    print(report)
    assert fused >= 0.8, report
    assert fused >= max(only_a, only_b) + 0.3, report
    assert min(only_a, only_b) >= pop + 0.15, report
