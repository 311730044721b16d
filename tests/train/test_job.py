"""The training job end to end on the real Ray (2 DDP workers) and the real S3 store."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch

from tessera.models.bundle import MANIFEST, ModelBundle
from tessera.storage import join_uri

from .conftest import kept_validation_ndcg, read_final_state


@pytest.mark.slow
def test_trains_every_variant_and_writes_a_loadable_bundle(sample_embeddings, storage, trained_bundle):
    from tessera.train.job import BundleExistsError, run_training

    run_uri = sample_embeddings["output"]["uri"]
    cfg, manifest = trained_bundle  # the session's one training run (serving tests use it too)

    results = manifest["metrics"]["results"]
    assert set(results) == {"popularity", "fused", "fused_ranked", "text", "image", "audio", "id_only"}
    for name, r in results.items():
        for key in ("recall@10", "ndcg@10", "coverage@10", "recall@20", "mrr"):
            assert math.isfinite(r[key]) and 0.0 <= r[key] <= 1.0, (name, key, r[key])
        assert r["num_users"] > 0
    assert manifest["embedding_run"] == run_uri
    assert manifest["encoders"] == sample_embeddings["encoders"]
    assert sorted(manifest["modalities"]) == sorted(sample_embeddings["encoders"])
    assert manifest["training"]["data"]["unknown_items"] == 0
    first, last = manifest["training"]["data"]["ts_range_ms"]  # the corpus' times: milliseconds of 2024-2025
    assert 1_700_000_000_000 < first < last < 1_800_000_000_000 and manifest["training"]["data"]["ts_warning"] is None
    # every epoch of every stage was reported (fused 2 + ranker 1 + 4 baselines x 2), with its validation
    # metrics; the test's are in the results only, never a per-epoch signal
    history = storage.read_json(join_uri(cfg.bundle_uri, "metrics.json"))["history"]
    assert len(history) == 11
    for h in history:
        assert 0.0 <= h[f"{h['stage']}/val_ndcg@10"] <= 1.0 and f"{h['stage']}/ndcg@10" not in h, h
    # each stage kept its epoch of the best validation NDCG@10, the earliest of equals (keep_epoch: best)
    kept = manifest["metrics"]["kept_epochs"]
    assert set(kept) == set(results) - {"popularity"}
    for stage, epoch in kept.items():
        scores = [h[f"{stage}/val_ndcg@10"] for h in history if h["stage"] == stage]
        assert epoch == 1 + scores.index(max(scores)), (stage, epoch, scores)
    # and the models the run kept are those epochs' (not the last one's, where they differ): evaluated
    # again here, each scores what the history reported for its kept epoch
    retrieval = [s for s in kept if s != "fused_ranked"]
    again = kept_validation_ndcg(cfg, storage, read_final_state(storage, manifest), retrieval)
    print(f"kept epochs {kept}")
    for stage in retrieval:
        reported = next(h[f"{stage}/val_ndcg@10"] for h in history if h["stage"] == stage and h["epoch"] == kept[stage])
        assert again[stage] == pytest.approx(reported, abs=1e-6), (stage, again[stage], reported)

    assert storage.exists(join_uri(cfg.bundle_uri, "item_popularity.parquet"))
    assert read_final_state(storage, manifest).resumes == []  # no worker restarted in a clean run

    bundle = ModelBundle.load(storage, cfg.bundle_uri)
    assert bundle.version == cfg.version and bundle.manifest["files"]
    dims = bundle.item_tower.config.modality_dims
    with torch.no_grad():
        items = bundle.item_tower({m: torch.randn(3, d) for m, d in dims.items()})
        user = bundle.user_tower(items[None], torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.long))
    assert items.shape == (3, 16) and torch.isfinite(user).all()

    with pytest.raises(BundleExistsError):
        run_training(cfg, storage)


def test_a_rerun_resumes_only_checkpoints_of_the_same_settings_and_data(storage, train_root):
    """Ray Train resumes any run of the same name: checkpoints of an attempt with other settings or another
    embedding run are refused naming what differs (or dropped with overwrite), never resumed."""
    from tessera.train.job import RUN_FILE, RunConflictError, _claim_run

    from .conftest import tiny_train_config

    embed = {"encoders": {"text": {"name": "minilm", "weights_checksum": "aa"}}, "counts": {"text": {"ok": 9}}}
    cfg = tiny_train_config("s3://tessera-test/emb/run-a", train_root)
    run_dir = join_uri(cfg.checkpoint_uri, cfg.version)
    _claim_run(cfg, storage, embed)
    assert storage.exists(join_uri(run_dir, RUN_FILE))
    tuned = cfg.model_copy(update={"towers": cfg.towers.model_copy(update={"lr": 0.25})})
    _claim_run(tuned, storage, embed)  # no checkpoint yet (the attempt failed before one): takes the new settings
    assert storage.read_json(join_uri(run_dir, RUN_FILE))["config"]["towers"]["lr"] == 0.25
    _claim_run(cfg, storage, embed)
    storage.write_bytes(join_uri(run_dir, "checkpoint_1", "state.pt"), b"x")
    _claim_run(cfg, storage, embed)  # the same attempt again: resumes
    faster = cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update={"num_workers": 1}),
                                    "max_failures": 5})
    _claim_run(faster, storage, embed)  # where and how it runs may change
    other = cfg.model_copy(update={"towers": cfg.towers.model_copy(update={"lr": 0.5})})
    with pytest.raises(RunConflictError, match=r"config\.towers\.lr"):
        _claim_run(other, storage, embed)
    reembedded = {**embed, "encoders": {"text": {"name": "minilm", "weights_checksum": "bb"}}}
    with pytest.raises(RunConflictError, match=r"embedding_run\.encoders"):
        _claim_run(cfg, storage, reembedded)
    assert storage.exists(join_uri(run_dir, "checkpoint_1", "state.pt"))
    # a log rewritten in place under the same URI (events dropped): its checkpoints' split no longer holds
    log = join_uri(train_root, f"log-{cfg.version}")
    events = pa.table({"user_id": ["u1", "u1", "u2"], "item_id": ["a", "b", "a"], "ts": [1, 2, 3]})
    storage.write_parquet(join_uri(log, "part-0.parquet"), events)
    on_log = cfg.model_copy(update={"interactions_uri": log, "version": cfg.version + "-log"})
    log_run = join_uri(cfg.checkpoint_uri, on_log.version)
    _claim_run(on_log, storage, embed)
    assert storage.read_json(join_uri(log_run, RUN_FILE))["interactions"]["files"] == 1
    storage.write_bytes(join_uri(log_run, "checkpoint_1", "state.pt"), b"x")
    _claim_run(on_log, storage, embed)  # the same log: resumes
    storage.write_parquet(join_uri(log, "part-0.parquet"), events)  # the same bytes written again: the same log
    _claim_run(on_log, storage, embed)
    storage.write_parquet(join_uri(log, "part-0.parquet"), events.slice(0, 2))
    with pytest.raises(RunConflictError, match=r"interactions\.bytes, interactions\.sha256"):
        _claim_run(on_log, storage, embed)
    swapped = events.set_column(1, "item_id", pa.array(["b", "a", "a"]))  # as many bytes, other events
    storage.write_parquet(join_uri(log, "part-0.parquet"), swapped)
    with pytest.raises(RunConflictError, match=r"\(interactions\.sha256\)"):
        _claim_run(on_log, storage, embed)
    storage.write_parquet(join_uri(log, "part-1.parquet"), events)  # a file added
    with pytest.raises(RunConflictError, match=r"interactions\.files"):
        _claim_run(on_log, storage, embed)
    _claim_run(other.model_copy(update={"overwrite": True}), storage, embed)  # starts the run again
    assert storage.list_files(run_dir) == [join_uri(run_dir, RUN_FILE)]
    _claim_run(other, storage, embed)
    fs, path = storage.filesystem(join_uri(run_dir, RUN_FILE))
    fs.delete_file(path)
    storage.write_bytes(join_uri(run_dir, "checkpoint_1", "state.pt"), b"x")
    with pytest.raises(RunConflictError, match="without _RUN.json"):
        _claim_run(other, storage, embed)


def test_a_variant_of_a_modality_the_embedding_run_lacks_fails_before_any_work(storage, train_root, ray_session,
                                                                               tmp_path, capsys):
    """The default variants name every modality; an embedding run without audio used to train the other
    variants for hours, fail in every worker and exit 4 with the run claimed. Now: exit 2 at once,
    naming the file, the key and the modalities, and nothing claimed."""
    import yaml

    from jobs.train import main

    from .conftest import tiny_train_config

    emb = join_uri(train_root, "emb-text-only")
    storage.write_json(join_uri(emb, "_MANIFEST.json"),
                       {"encoders": {"text": {"name": "minilm", "dim": 4}}, "counts": {"text": {"ok": 3}}})
    cfg = tiny_train_config(emb, train_root, variants=["fused", "text", "audio", "image"])
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage"})))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "variants" in err and "['audio', 'image']" in err and "['text']" in err, err
    assert not storage.list_files(join_uri(cfg.checkpoint_uri, cfg.version))
    assert not storage.exists(join_uri(cfg.bundle_uri, MANIFEST))


def test_a_log_without_an_event_of_a_catalog_item_exits_2_naming_the_key(sample_embeddings, storage, train_root,
                                                                        ray_session, tmp_path, capsys):
    """Every event names an item the embedding run lacks: no user to train on. Exit 2 naming the key and
    the counts, before any worker starts (they would each fail on the user data)."""
    import pyarrow as pa
    import yaml

    from jobs.train import main

    from .conftest import tiny_train_config

    log = join_uri(train_root, "log-of-unknown-items")
    storage.write_parquet(join_uri(log, "part-0.parquet"), pa.table({
        "user_id": ["u1", "u1", "u2"], "item_id": ["nope-1", "nope-2", "nope-1"],
        "ts": pa.array([1, 2, 3], pa.timestamp("ms")), "weight": pa.array([1.0, 1.0, 1.0], pa.float32())}))
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], train_root, interactions_uri=log)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage"})))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "interactions_uri" in err and "3 events, 3 of items it lacks" in err and str(path) in err, err
    assert not storage.exists(join_uri(cfg.bundle_uri, MANIFEST))


def test_ranker_lists_longer_than_the_catalog_exit_2_naming_the_keys_before_training(sample_embeddings, storage,
                                                                                     train_root, ray_session,
                                                                                     tmp_path, capsys):
    """They failed the first ranker step in every worker, after the towers had trained: exit 4 naming no key."""
    import yaml

    from jobs.train import main

    from .conftest import tiny_train_config

    items = sample_embeddings["input"]["items"]
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], train_root, ranker={"num_random": items})
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage"})))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "ranker.num_random" in err and f"{items} items of the embedding run" in err, err
    assert not storage.list_files(join_uri(cfg.checkpoint_uri, cfg.version), "state.pt")  # nothing trained
    assert not storage.exists(join_uri(cfg.bundle_uri, MANIFEST))


def test_a_second_attempt_of_a_version_is_refused_while_the_first_holds_it(storage, train_root, ray_session,
                                                                           tmp_path, capsys):
    """A retried ``ray job submit`` used to train into the same checkpoints and bundle as the attempt still
    running (the two uploads interleave under one manifest). Now the second exits 5 naming the holder,
    before any work; once the holder is gone (released here) the version is free again."""
    import yaml

    from jobs.train import main
    from tessera.lease import RunLease
    from tessera.train.job import lease_uri

    from .conftest import tiny_train_config

    emb = join_uri(train_root, "emb-held")
    storage.write_json(join_uri(emb, "_MANIFEST.json"),
                       {"encoders": {"text": {"name": "minilm", "dim": 4}}, "counts": {"text": {"ok": 3}}})
    cfg = tiny_train_config(emb, train_root, variants=["fused", "text", "audio"])
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage"})))
    first = RunLease(storage, lease_uri(cfg), ttl_s=60, what="the first attempt")
    first.acquire()
    try:
        assert main(["--config", str(path)]) == 5
        err = capsys.readouterr().err
        assert f"training run {cfg.version} is being written by another attempt" in err and "--break-lease" in err, err
        assert not storage.list_files(join_uri(cfg.checkpoint_uri, cfg.version))  # nothing claimed
    finally:
        first.release()
    assert main(["--config", str(path)]) == 2  # free again: on to the next check (the missing modality)
    assert "variants" in capsys.readouterr().err
    assert not storage.exists(lease_uri(cfg))  # released by the attempt that exited 2


@pytest.mark.slow
def test_one_seed_trains_one_model(sample_embeddings, storage, train_root):
    """Two runs of one config over one embedding run train the same weights and report the same metrics.

    They did not: the groupby and ``random_shuffle`` ordered the examples as their tasks finished, and
    ``streaming_split`` gave blocks to whichever worker asked first (the demo's NDCG moved by +-0.015
    between runs of one config). Now the order is seeded (seeded_order), each worker a fixed row range
    (row_ranges) in seeded batches (seeded_batches), and the users sorted."""
    from tessera.train.job import run_training

    from .conftest import tiny_train_config

    states = []
    for run in ("a", "b"):
        cfg = tiny_train_config(sample_embeddings["output"]["uri"], join_uri(train_root, run), variants=["fused"])
        states.append(read_final_state(storage, run_training(cfg, storage)))
    a, b = states
    assert set(a.models) == set(b.models) == {"fused", "fused_ranked"}
    for stage in a.models:
        for name, tensor in a.models[stage].items():
            assert torch.equal(tensor, b.models[stage][name]), (stage, name)
    timing = {"samples_per_s", "train_s"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in a.history] == \
        [{k: v for k, v in h.items() if k not in timing} for h in b.history]
    assert a.results == b.results and a.kept_epochs == b.kept_epochs


def test_the_datasets_cap_each_users_examples_at_max_examples_per_user(sample_embeddings, storage, train_root,
                                                                       ray_session):
    """``build_datasets`` hands ``max_examples_per_user`` to the examples: each user gives its last that many
    training positions (the towers' rows leaving out the ranker's tail), fewer than uncapped on this corpus."""
    from tessera.train.datasets import build_datasets
    from tessera.train.examples import user_keys

    from .conftest import tiny_train_config

    cap, tail = 4, 2
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], train_root, max_examples_per_user=cap,
                            ranker={"tail": tail})
    ds = build_datasets(cfg, storage)
    users = ds.users.to_pandas()
    lengths = dict(zip(user_keys(users["user_id"].to_numpy()).tolist(), users["train_items"].map(len), strict=True))
    expected = {key: min(n - 1, cap) for key, n in lengths.items() if n > 1}
    assert sum(n - 1 for n in lengths.values() if n > 1) > sum(expected.values())  # the cap binds here
    assert ds.examples == sum(expected.values())
    train = ds.train.to_pandas()
    per_user = train.groupby("user_key")["from_end"].agg(["count", "max", "min"])
    assert per_user["max"].max() == cap - 1 and per_user["min"].min() == tail
    assert len(train) == sum(max(0, n - tail) for n in expected.values())
    assert len(ds.ranker.to_pandas()) == ds.examples


@pytest.mark.slow
def test_the_popularity_the_bundle_ships_counts_each_users_last_events_up_to_the_cap(sample_embeddings, storage,
                                                                                    train_root):
    """With ``max_examples_per_user`` 3 (below most users' events here), the bundle's popularity file (what
    serving's ranker feature and cold-start answers read) and the popularity baseline count each user's last 3
    events (the baseline's with the validation event), not every event as before."""
    import pyarrow.parquet as pq

    from tessera.train.catalog import ItemCatalog
    from tessera.train.datasets import build_datasets
    from tessera.train.evaluate import evaluate_popularity
    from tessera.train.examples import EvalSet, item_counts
    from tessera.train.job import run_training

    from .conftest import tiny_train_config

    cap = 3
    cfg = tiny_train_config(sample_embeddings["output"]["uri"], join_uri(train_root, "capped"), variants=["fused"],
                            max_examples_per_user=cap, ranker={"tail": 2}, towers={"epochs": 1})
    manifest = run_training(cfg, storage)
    fs, path = storage.filesystem(join_uri(cfg.bundle_uri, "item_popularity.parquet"))
    shipped = pq.read_table(path, filesystem=fs)
    catalog = ItemCatalog.load(storage, cfg.embeddings_uri)
    assert shipped.column("item_id").to_pylist() == catalog.item_ids.tolist()
    users = build_datasets(cfg, storage).users.to_pandas()
    records = {c: users[c].to_numpy() for c in users.columns}
    capped = item_counts(records, catalog.num_items, max_per_user=cap)
    assert (capped != item_counts(records, catalog.num_items)).any()  # the cap binds on this corpus
    assert shipped.column("train_interactions").to_pylist() == capped.tolist()
    baseline = evaluate_popularity(item_counts(records, catalog.num_items, with_validation=True, max_per_user=cap),
                                   EvalSet.from_records(records, cfg.max_history, "test"), cfg.ks)
    assert manifest["metrics"]["results"]["popularity"] == pytest.approx(baseline)


def test_keep_existing_wins_over_overwrite_in_the_config_or_environment(tmp_path, monkeypatch, capsys):
    """With `overwrite: true` in the file (or TESSERA__OVERWRITE), an existing bundle was not refused, so
    `--keep-existing` never saw one to keep: the bundle was retrained and replaced."""
    import argparse

    from jobs.train import job_config, main

    path = tmp_path / "train.yaml"
    path.write_text("overwrite: true\n")
    flags = {"config": str(path), "version": None, "overwrite": False, "keep_existing": False}
    assert job_config(argparse.Namespace(**flags)).overwrite is True
    assert job_config(argparse.Namespace(**{**flags, "keep_existing": True})).overwrite is False
    monkeypatch.setenv("TESSERA__OVERWRITE", "true")
    assert job_config(argparse.Namespace(**{**flags, "keep_existing": True})).overwrite is False
    assert main(["--config", str(path), "--keep-existing", "--overwrite"]) == 2  # before Ray starts
    assert "--keep-existing and --overwrite contradict" in capsys.readouterr().err
