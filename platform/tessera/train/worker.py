"""The Ray Train loop run by every DDP worker (``train_loop_per_worker`` of the TorchTrainer).

One run trains, in order, stages of a fixed plan (:func:`stage_plan`): the fused retrieval towers,
the ranker on top of them, then each baseline variant (single modalities, ids alone). Every epoch
of every stage ends with one ``ray.train.report``: rank 0 evaluates on the validation targets
(``<stage>/val_<metric>``; the test targets once the stage's last epoch is done, into ``results``) and
attaches a checkpoint (all models trained so far, the current optimiser and the results), so a
killed worker resumes from the last finished epoch: ``ray.train.get_checkpoint()`` at start-up
gives the stage and epoch to continue from. Rank 0 checks the run's lease (``config["lease"]``, a
:class:`~tessera.lease.LeaseRef`) at start-up and before each checkpoint: once another attempt of
the version holds it, this one writes no further checkpoint and fails (restarts fail at start-up).

Data: the ``train`` (retrieval) and ``ranker`` datasets (next-item examples; the towers' leave out
each user's most recent ``ranker.tail``, the ranker's are all of them) are split across workers, each
a range of rows of their seeded order (:func:`~tessera.train.job.row_ranges`), read in seeded
batches (:func:`seeded_batches`): one seed, one model;
what the user records give (every user's training events for the examples' histories, the logQ
counts of the towers' targets, the ranker's popularity and, on rank 0, the evaluation sets) and the
item feature table are built once a run by two tasks and read from Ray's object store
(``config["shared"]``, :class:`~tessera.train.shared.SharedRefs`): one shared copy a node, not one a worker.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch

from tessera.lease import LeaseRef
from tessera.storage import Storage
from tessera.train.catalog import ItemCatalog
from tessera.train.config import TrainConfig
from tessera.train.evaluate import evaluate_popularity, evaluate_ranked, evaluate_retrieval
from tessera.train.ranking import RankerModel
from tessera.train.retrieval import TwoTowerModel, variant
from tessera.train.shared import EvalData, SharedRefs, UserData
from tessera.train.state import RANKED, STATE_FILE, TrainState, load_state, save_state


@dataclass(frozen=True)
class Stage:
    kind: str  # "retrieval" | "ranker"
    name: str  # variant name, or "fused_ranked"
    epochs: int


def stage_plan(cfg: TrainConfig) -> list[Stage]:
    """fused, then its ranker (when enabled), then the baselines in config order."""
    plan = [Stage("retrieval", "fused", cfg.towers.epochs)]
    if cfg.ranker.enabled:
        plan.append(Stage("ranker", RANKED, cfg.ranker.epochs))
    plan += [Stage("retrieval", v, cfg.towers.epochs) for v in cfg.variants if v != "fused"]
    return plan


class EpochGauges:
    """Ray metrics for dashboards, set on rank 0 after every epoch (the same numbers ``ray.train.report`` gets).

    Exported to Prometheus by Ray as ``ray_tessera_train_loss`` and ``ray_tessera_train_samples_per_second``,
    tagged ``stage`` and ``version``. Created inside the worker process (Ray metrics are per process).
    """

    def __init__(self, version: str):
        from ray.util import metrics

        self.version = version
        tags = ("stage", "version")
        self.loss = metrics.Gauge("tessera_train_loss", "Mean training loss of the last epoch (rank 0's shard)",
                                  tag_keys=tags)
        self.throughput = metrics.Gauge("tessera_train_samples_per_second",
                                        "Training examples per second over all workers in the last epoch",
                                        tag_keys=tags)

    def record(self, stage: str, loss: float, samples_per_s: float) -> None:
        tags = {"stage": stage, "version": self.version}
        self.loss.set(float(loss), tags=tags)
        self.throughput.set(float(samples_per_s), tags=tags)


def seeded_batches(shard, batch_size: int, window: int, seed: int, drop_last: bool, device):
    """Batches of ``batch_size`` rows of the shard, its rows permuted within consecutive windows of
    ``window`` batches by a generator seeded with ``seed``; ``drop_last``: no short batch at the end.

    Ray Data's local shuffle buffer permutes whatever the buffer holds when it fills, so its batches
    depend on how the rows were cut into blocks, which differs between runs of one dataset. The windows
    here are cut by row count (``iter_torch_batches`` of ``window * batch_size`` rows), so the same rows and
    seed give the same batches."""
    gen = torch.Generator().manual_seed(seed)
    for chunk in shard.iter_torch_batches(batch_size=window * batch_size, device=device):
        n = len(next(iter(chunk.values())))  # window * batch_size, but for the last window
        perm = torch.randperm(n, generator=gen).to(device)
        chunk = {k: v[perm] for k, v in chunk.items()}
        for start in range(0, n if not drop_last else n - n % batch_size, batch_size):
            yield {k: v[start:start + batch_size] for k, v in chunk.items()}


def _maybe_fail(cfg: TrainConfig, storage: Storage, global_epoch: int, rank: int, world: int) -> None:
    """Test hook: kill this worker process once during ``cfg.fail_at_epoch`` (see TrainConfig)."""
    if cfg.fail_at_epoch is None or global_epoch != cfg.fail_at_epoch or rank != min(1, world - 1):
        return
    if storage.exists(cfg.fail_marker_uri):
        return
    storage.write_bytes(cfg.fail_marker_uri, f"killed pid {os.getpid()} at epoch {global_epoch}".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def _build(stage: Stage, cfg: TrainConfig, catalog: ItemCatalog, counts: np.ndarray, state: TrainState,
           q_counts: np.ndarray):
    if stage.kind == "retrieval":  # logQ over the towers' targets
        return TwoTowerModel.build(variant(stage.name, catalog.modalities, cfg.towers.fused_ids), catalog,
                                   cfg.towers, q_counts, cfg.max_history)
    fused = TwoTowerModel.build(variant("fused", catalog.modalities, cfg.towers.fused_ids), catalog, cfg.towers,
                                counts, cfg.max_history)
    fused.load_state_dict(state.models["fused"])
    return RankerModel.build(fused, counts, cfg.ranker, cfg.max_history)


def stage_model(stage: Stage, cfg: TrainConfig, catalog: ItemCatalog, counts: np.ndarray, state: TrainState,
                resume: bool, prepare, q_counts: np.ndarray
                ) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer]:
    """The stage's model (``prepare``d: on the worker's device, DDP-wrapped), its unwrapped module, and its
    optimizer; ``resume``: both restored from ``state.current``. ``counts``: training events per item (the
    ranker's popularity); ``q_counts``: targets of the towers' examples per item (their logQ).

    The model is on its device before the optimizer loads its state: ``load_state_dict`` puts Adam's
    moments on the parameters' device, and moments left on the CPU failed the first GPU step of a resume."""
    model = _build(stage, cfg, catalog, counts, state, q_counts)
    if resume:
        model.load_state_dict(state.current["model"])
    model = prepare(model)
    inner = model.module if hasattr(model, "module") else model
    trainable = inner.ranker if stage.kind == "ranker" else inner
    opt = torch.optim.AdamW(trainable.parameters(), lr=cfg.ranker.lr if stage.kind == "ranker" else cfg.towers.lr,
                            weight_decay=cfg.towers.weight_decay)
    if resume:
        opt.load_state_dict(state.current["optim"])
    return model, inner, opt


def train_loop_per_worker(config: dict) -> None:
    """Entry point on each worker; ``config = {"train": TrainConfig.model_dump(), "lease": LeaseRef | None,
    "shared": SharedRefs}``."""
    cfg = TrainConfig.model_validate(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.scaling.torch_threads)
    device = ray.train.torch.get_device()
    storage = Storage(cfg.storage)
    lease: LeaseRef | None = config.get("lease") if rank == 0 else None
    if lease is not None:  # a restart after the lease was lost stops here, not an epoch later
        lease.verify(storage)
    shared: SharedRefs = config["shared"]
    catalog = ItemCatalog.from_arrays(ray.get(shared.catalog.arrays)).to(device)  # on the CPU, the node's one copy
    refs = shared.users
    users: UserData = ray.get(refs.shared)  # read-only views of the node's one copy
    counts, q_counts = np.array(users.counts), np.array(users.q_counts)  # (I,) each: copies of our own
    timelines = users.timelines  # the examples' histories: an example names only its user and place
    evaluation: EvalData | None = ray.get(refs.evaluation) if rank == 0 else None
    test_set = evaluation.test if evaluation is not None else None
    val_set = evaluation.validation if evaluation is not None else None
    shards = {"retrieval": ray.train.get_dataset_shard(f"train.{rank}"),
              "ranker": ray.train.get_dataset_shard(f"ranker.{rank}")}
    gauges = EpochGauges(cfg.version) if rank == 0 else None

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE))
        state.resumes.append({"stage": state.stage, "epoch": state.epoch, "world_size": world})
    if rank == 0 and "popularity" not in state.results:
        state.results["popularity"] = evaluate_popularity(np.array(users.counts_with_val), test_set, cfg.ks)

    plan = stage_plan(cfg)
    global_epoch = sum(s.epochs for s in plan[:state.stage]) + state.epoch
    for stage_idx in range(state.stage, len(plan)):
        stage = plan[stage_idx]
        torch.manual_seed(cfg.seed + stage_idx)
        resume = state.stage == stage_idx and state.current is not None
        model, inner, opt = stage_model(stage, cfg, catalog, counts, state, resume, ray.train.torch.prepare_model,
                                        q_counts)
        start_epoch = state.epoch if resume else 0
        batch_size = cfg.ranker.batch_size if stage.kind == "ranker" else cfg.towers.batch_size
        for epoch in range(start_epoch, stage.epochs):
            rng = np.random.default_rng([cfg.seed, stage_idx, epoch, rank])
            # dropout draws seeded per epoch: a run resumed at epoch e draws what it would have, not epoch 0's
            torch.manual_seed(int(rng.integers(1 << 62)))
            model.train()
            t0, total, steps, samples = time.perf_counter(), 0.0, 0, 0
            batches = seeded_batches(shards[stage.kind], batch_size, 4, int(rng.integers(1 << 62)),
                                     drop_last=stage.kind == "retrieval", device=device)
            for batch in batches:
                batch = timelines.with_histories(batch, cfg.max_history)
                loss = (model(batch, rng, timelines.seen_before(batch["user_key"], batch["from_end"]))
                        if stage.kind == "ranker" else model(batch))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
                if steps == 1:
                    _maybe_fail(cfg, storage, global_epoch, rank, world)  # mid-epoch, after a DDP step
                samples += len(batch["target"])
            train_s = time.perf_counter() - t0
            global_epoch += 1
            total, steps, samples = _summed([total, steps, samples], device)  # over every worker
            metrics = {"stage": stage.name, "epoch": epoch + 1, "global_epoch": global_epoch,
                       "loss": total / max(steps, 1), "samples_global": int(samples),
                       "samples_per_s": samples / max(train_s, 1e-9),
                       "train_s": train_s}
            if gauges is not None:
                gauges.record(stage.name, metrics["loss"], metrics["samples_per_s"])
            done = epoch + 1 == stage.epochs
            state.stage, state.epoch = (stage_idx + 1, 0) if done else (stage_idx, epoch + 1)
            evaluate = evaluate_ranked if stage.kind == "ranker" else evaluate_retrieval
            score = float("nan")
            if val_set is not None and val_set.num_users:  # rank 0 (the others hold no evaluation set)
                validated = evaluate(inner, val_set, cfg.ks)
                metrics.update({f"{stage.name}/val_{k}": v for k, v in validated.items()
                                if k not in ("num_users", "repeat_targets")})
                score = validated["ndcg@10"]
            if cfg.keep_epoch == "best":  # every rank keeps the same best (DDP keeps replicas equal)
                offer_epoch(state, inner, stage, epoch + 1, _from_rank0(score, device))
            # Every rank keeps finished models: later stages build on them.
            if done:
                metrics["kept_epoch"] = finish_stage(state, inner, stage, epoch + 1)
            if rank != 0:
                ray.train.report(metrics)
                continue
            if done:  # the test, of the epoch kept: once a stage, never a per-epoch signal to tune on
                state.results[stage.name] = evaluate(inner, test_set, cfg.ks)
            state.history.append(dict(metrics))
            state.current = None if done else {"model": inner.state_dict(), "optim": opt.state_dict()}
            if lease is not None:  # a run taken over mid-fit (its driver hung, or --break-lease) stops here
                lease.verify(storage)
            with tempfile.TemporaryDirectory(prefix="tessera-ckpt-") as d:
                save_state(state, os.path.join(d, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        state.current = None


def _summed(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over the workers (an all-reduce every worker makes at the same point; as they
    are with one worker or no process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every worker (a broadcast every worker makes at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _model_state(model, stage: Stage) -> dict:
    """What the bundle and later stages need: the towers of a retrieval variant, the ranker alone."""
    return model.ranker.state_dict() if stage.kind == "ranker" else model.state_dict()


def _load_stage_state(model, stage: Stage, weights: dict) -> None:
    """Put back what :func:`_model_state` took."""
    (model.ranker if stage.kind == "ranker" else model).load_state_dict(weights)


def offer_epoch(state: TrainState, model, stage: Stage, epoch: int, score: float) -> None:
    """Keep a copy of ``model``'s stage weights as ``state.best`` when ``epoch`` (1-based) scored better
    than the best so far (:func:`improves`)."""
    if improves(score, None if state.best is None else state.best["score"]):
        state.best = {"epoch": epoch, "score": score, "model": _copy(_model_state(model, stage))}


def finish_stage(state: TrainState, model, stage: Stage, epoch: int) -> int:
    """After a stage's last epoch (``epoch``, 1-based): put the best epoch's weights back into ``model``
    when one was kept, record the stage's model (``state.models``) and the epoch kept; returns that epoch."""
    if state.best is not None:
        _load_stage_state(model, stage, state.best["model"])
        epoch = state.best["epoch"]
    state.kept_epochs[stage.name] = epoch
    state.models[stage.name] = _model_state(model, stage)
    state.best = None
    return epoch


def improves(score: float, best: float | None) -> bool:
    """Whether an epoch scoring ``score`` replaces the best so far (``best``; None: none yet). Equal
    scores keep the earlier epoch. NaN (no user has a validation target) beats nothing real, and a NaN
    best is always replaced: with no validation at all the last epoch is kept."""
    if best is None or math.isnan(best):
        return True
    return not math.isnan(score) and score > best


def _copy(weights: dict) -> dict:
    """A state dict's tensors copied to the CPU (training goes on updating the originals in place; a copy
    on the GPU would hold a second model there)."""
    return {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in weights.items()}
