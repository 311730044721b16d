"""A training worker killed mid-run (SIGKILL) is restarted by Ray Train and resumes from the last
checkpoint on S3, not from scratch."""

from __future__ import annotations

import pytest

from tessera.models.bundle import MANIFEST, ModelBundle
from tessera.storage import join_uri

from .conftest import kept_validation_ndcg, read_final_state, tiny_train_config


@pytest.mark.slow
def test_killed_worker_resumes_from_last_checkpoint(sample_embeddings, storage, train_root):
    from tessera.train.job import run_training

    marker = join_uri(train_root, "fail-marker")
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], train_root, variants=["fused"],
                            towers={"epochs": 3}, ranker={"epochs": 1}, fail_at_epoch=2, fail_marker_uri=marker)
    manifest = run_training(cfg, storage)

    assert storage.read_bytes(marker).startswith(b"killed pid")  # the worker really killed itself
    state = read_final_state(storage, manifest)
    # Restarted once, from a checkpoint of the fused stage taken before the kill (the last one the
    # controller had registered: epoch 2, or epoch 1 when the kill raced the report).
    assert len(state.resumes) == 1, state.resumes
    assert state.resumes[0]["stage"] == 0 and state.resumes[0]["epoch"] in (1, 2)
    # Each epoch is in the history once, in order: 3 fused + 1 ranker.
    assert [h["global_epoch"] for h in state.history] == [1, 2, 3, 4]
    # the best epoch so far travels in the checkpoint: the one kept is the best of all three, not of
    # the epochs after the restart
    scores = [h["fused/val_ndcg@10"] for h in state.history if h["stage"] == "fused"]
    assert state.kept_epochs["fused"] == 1 + scores.index(max(scores)), (state.kept_epochs, scores)
    again = kept_validation_ndcg(cfg, storage, state, ["fused"])["fused"]
    assert again == pytest.approx(scores[state.kept_epochs["fused"] - 1], abs=1e-6), (again, scores)
    assert set(state.results) == {"popularity", "fused", "fused_ranked"}
    assert ModelBundle.load(storage, cfg.bundle_uri).version == cfg.version


@pytest.mark.slow
def test_a_run_whose_workers_fail_past_max_failures_raises_training_failed(sample_embeddings, storage, train_root):
    """Ray Train V2 raises from fit() (it does not return a result holding the error): the job turns that
    into its TrainingFailedError, which `jobs.train` exits 4 on, and the bundle it was to replace stays until
    a run succeeds."""
    from tessera.train.job import TrainingFailedError, run_training

    marker = join_uri(train_root, "fail-marker-no-retry")
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], train_root, variants=["fused"], version="no-retry",
                            towers={"epochs": 2}, ranker={"epochs": 1}, fail_at_epoch=1, fail_marker_uri=marker,
                            max_failures=0, overwrite=True)
    earlier = join_uri(cfg.bundle_uri, MANIFEST)
    storage.write_json(earlier, {"version": "no-retry", "stands_for": "a bundle trained before"})
    with pytest.raises(TrainingFailedError, match="training run no-retry failed"):
        run_training(cfg, storage)
    assert storage.read_bytes(marker).startswith(b"killed pid")
    # overwrite replaces the bundle only once a new one is trained: the earlier one is still there
    assert storage.read_json(earlier)["stands_for"] == "a bundle trained before"
    # the same again (the marker is there: no kill) trains and replaces it, metrics and popularity included
    manifest = run_training(cfg, storage)
    assert storage.read_json(earlier)["version"] == "no-retry" and "stands_for" not in storage.read_json(earlier)
    for name in (manifest["metrics"]["file"], "item_popularity.parquet"):
        assert storage.exists(join_uri(cfg.bundle_uri, name)), name
    assert ModelBundle.load(storage, cfg.bundle_uri).version == "no-retry"


@pytest.mark.slow
def test_a_run_taken_over_mid_fit_stops_at_its_next_checkpoint(sample_embeddings, storage, train_root):
    """An attempt whose lease another takes over while Ray Train runs (its driver hung past the ttl, or
    ``--break-lease``) used to train to the end, writing every checkpoint meanwhile into the run the other
    attempt resumes from. Now rank 0 checks the lease before each checkpoint: the run stops, Ray Train's
    restart stops at start-up, and the driver raises LeaseLostError with no bundle written."""
    import threading
    import time

    from tessera.lease import LeaseLostError, RunLease
    from tessera.train.job import lease_uri, run_training

    # ttl 600 s: the driver's renewals (every 150 s) never see the takeover; only the workers' check can stop it.
    # Every checkpoint kept (num_to_keep): the ones written after the takeover are counted.
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], train_root, variants=["fused", "text"],
                            towers={"epochs": 4}, ranker={"epochs": 1}, lease_ttl_s=600, max_failures=1,
                            num_to_keep=20)
    run_dir = join_uri(cfg.checkpoint_uri, cfg.version)

    def checkpoints() -> set[str]:
        return {f.split("/checkpoint_")[1].split("/")[0] for f in storage.list_files(run_dir) if "/checkpoint_" in f}

    outcome: dict = {}

    def train() -> None:
        try:
            outcome["manifest"] = run_training(cfg, storage)
        except Exception as err:  # noqa: BLE001 (asserted below)
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while not checkpoints() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoints(), outcome
    taker = RunLease(storage, lease_uri(cfg), ttl_s=600, what="the second attempt", break_lease=True)
    taker.acquire()
    at_takeover = checkpoints()
    try:
        thread.join(timeout=300)
        assert not thread.is_alive()
        err = outcome.get("error")
        assert isinstance(err, LeaseLostError), outcome
        assert f"training run {cfg.version}" in str(err) and "taken over by" in str(err), err
        # at most the checkpoint under way when the lease changed hands, of the 9 epochs the run had to report
        assert len(checkpoints() - at_takeover) <= 1, (at_takeover, checkpoints())
        assert not storage.exists(join_uri(cfg.bundle_uri, MANIFEST))
        assert storage.read_json(lease_uri(cfg))["token"] == taker.token  # the stopped attempt left it alone
    finally:
        taker.release()
