"""Config of the training job (``configs/train.yaml``).

One :class:`TrainConfig` names the inputs (interaction log, embedding run), the output (model
bundle ``<models_uri>/<version>/``), the Ray Train resources (``scaling``), where checkpoints go
(``checkpoint_uri``, on object storage so any node can resume) and the optimisation settings of the
retrieval towers and the ranker. On the 2-core embedded stack the defaults use 2 workers x 0.5 CPU;
on a real cluster raise ``scaling.num_workers`` and set ``scaling.use_gpu`` (DDP then uses NCCL).

Example::

    cfg = load_config(TrainConfig, "configs/train.yaml")
    cfg.scaling.num_workers = 4
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from tessera.config import TesseraConfig
from tessera.storage import StorageConfig

VARIANT_NAMES = ("fused", "text", "image", "audio", "id_only")


class ScalingSection(TesseraConfig):
    """Ray Train ``ScalingConfig``: ``num_workers`` DDP workers, each with ``cpus_per_worker`` CPUs
    (and one GPU when ``use_gpu``); ``torch_threads`` caps intra-op threads per worker."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)
    torch_threads: int = Field(1, ge=1)


class TowerSection(TesseraConfig):
    """Sizes and optimisation of the retrieval towers (item tower + user tower).

    Args:
        d_model / out_dim / n_heads / proj_hidden: tower widths (see :class:`tessera.models.ItemTowerConfig`).
        user_layers: transformer blocks of the user tower.
        epochs: passes over the training examples, per variant.
        batch_size: examples per step per worker (in-batch negatives come from the same batch).
        lr / weight_decay: AdamW settings.
        temperature: softmax temperature of the sampled-softmax retrieval loss.
        align_weight / align_temperature: weight and temperature of the cross-modal InfoNCE term.
        modality_dropout / dropout: regularisation of the item tower.
        num_id_buckets: hashed item-id buckets (used by ``id_only`` and, when ``fused_ids``, by the
            content variants too); 0 means ``2 * catalog size`` rounded up to a power of two.
        fused_ids: give the content variants (fused and single modalities) the id token as well.
        input_norm: standardise encoder embeddings inside the item tower (catalog statistics, saved
            with the tower; see :class:`tessera.models.ItemTowerConfig`).
    """

    d_model: int = Field(64, gt=0)
    out_dim: int = Field(64, gt=0)
    n_heads: int = Field(4, gt=0)
    proj_hidden: int = Field(128, gt=0)
    user_layers: int = Field(1, ge=0)
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    temperature: float = Field(0.1, gt=0)
    align_weight: float = Field(0.2, ge=0)
    align_temperature: float = Field(0.1, gt=0)
    modality_dropout: float = Field(0.2, ge=0, lt=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    num_id_buckets: int = Field(0, ge=0)
    fused_ids: bool = False
    input_norm: bool = True


class RankerSection(TesseraConfig):
    """The ranker, trained on the fused retrieval model's candidates.

    Args:
        enabled: train (and evaluate) a ranker; a bundle always holds one, untrained when disabled.
        epochs / batch_size / lr: optimisation.
        candidates: K, retrieval top-K re-ranked at evaluation (and serving).
        num_hard / num_random: negatives per training list, drawn uniformly from the retrieval
            top-K (``K - 1`` or more: the whole top-K) and from the catalog. A list is built only
            for an example whose target is in the top-K, as at evaluation (see
            :meth:`tessera.train.ranking.RankerModel.training_lists`).
        loss: ``listwise`` softmax over each list or pointwise ``bce``.
        tail: each user's last ``tail`` training examples are kept from the retrieval towers, so
            part of the ranker's lists carry retrieval scores of unseen data. The ranker trains on
            every example (the tail alone, ~2 lists a user, is too few to learn from).
        residual: the final score is ``retrieval_score / towers.temperature + ranker logit``, with
            the ranker's last layer initialised to 0, so training starts from the retrieval order
            and learns a correction (serving must add the same term: the manifest says so).
    """

    enabled: bool = True
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    candidates: int = Field(50, ge=2)
    num_hard: int = Field(49, ge=0)
    num_random: int = Field(16, ge=0)
    loss: Literal["listwise", "bce"] = "listwise"
    tail: int = Field(2, ge=1)
    residual: bool = True


class TrainConfig(TesseraConfig):
    """The training job.

    Args:
        interactions_uri: ``<root>/corpus/interactions`` (Parquet: user_id, item_id, ts, event, weight).
        embeddings_uri: one embedding run, ``<root>/embeddings/<run_id>`` (its ``_MANIFEST.json`` names
            the encoders, copied into the bundle).
        models_uri / version: the bundle goes to ``<models_uri>/<version>/`` (a version is letters, digits and
            ``._-``, up to 64, as an embedding run id and an index version are).
        checkpoint_uri: Ray Train ``storage_path`` (object storage, so a restarted worker on any node
            resumes); the run's folder is ``<checkpoint_uri>/<version>``.
        max_failures: Ray Train ``FailureConfig.max_failures`` (worker-group restarts from the last checkpoint).
        lease_ttl_s: an attempt holds its version through ``<models_uri>/_LEASE-<version>.json``,
            renewed every quarter of this; a second attempt started meanwhile is refused (exit 5), and
            one not renewed for this long (its driver was killed) is taken over (:mod:`tessera.lease`).
        holdout: each user's last ``holdout`` interactions are held out for the test, evaluated once
            a stage is trained (``results`` in the bundle's metrics; the quality checks use them).
        validation: the ``validation`` interactions before those are validation targets, evaluated
            after every epoch (Ray Train's reported metrics, ``<stage>/val_<metric>``): tune epochs and
            settings on them, not on the test. Neither is ever a training target. 0: no validation
            split (no per-epoch evaluation).
        keep_epoch: ``best``: each stage keeps its epoch of the highest validation NDCG@10 (the earliest
            of equals): the model later stages build on, the test evaluates and the bundle ships, so
            a variant that over-fits is compared at its best, not at the shared epoch count. ``last``:
            the final epoch (the default: every variant compared at the same training budget). ``best``
            needs ``validation >= 1``.
        max_history: N, the most recent items a user tower / ranker reads.
        max_examples_per_user: a user's training examples are its last this many training positions (a
            bot's or a power user's thousands of events would outweigh everyone else's in the loss and
            fill the examples). Must exceed ``ranker.tail``. The ranker's popularity statistic (and the
            served popularity fallback) counts each user's last this many events alone, for the same reason.
        variants: retrieval variants trained in the same run; ``fused`` is the one shipped, the
            others (single modalities, ``id_only``) are baselines. Popularity is always evaluated.
        ks: cut-offs of Recall@K / NDCG@K / coverage@K.
        group_partitions: hash partitions of the per-user groupby (Ray Data's default, 200, is far
            too many for a small log; raise it with the number of users).
        seed: seeds torch and numpy on every worker.
        fail_at_epoch: test hook: the rank-1 worker (rank 0 with one worker) kills its own process
            once, after the first step of this global epoch (0-based), when ``fail_marker_uri`` does not exist yet
            (it writes the marker first). None in production.
    """

    interactions_uri: str = "s3://tessera-demo/corpus/interactions"
    embeddings_uri: str = "s3://tessera-demo/embeddings/demo"
    models_uri: str = "s3://tessera-demo/models"
    version: str = Field("v1", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    checkpoint_uri: str = "s3://tessera-demo/checkpoints/train"
    overwrite: bool = False
    max_failures: int = Field(2, ge=0)
    lease_ttl_s: float = Field(150.0, ge=5)
    num_to_keep: int = Field(2, ge=1)
    holdout: int = Field(1, ge=1)
    validation: int = Field(1, ge=0)
    keep_epoch: Literal["best", "last"] = "last"
    max_history: int = Field(20, ge=1)
    max_examples_per_user: int = Field(500, ge=1)
    variants: list[str] = Field(default_factory=lambda: list(VARIANT_NAMES))
    ks: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [10, 50], min_length=1)
    group_partitions: int = Field(8, ge=1)
    seed: int = 0
    scaling: ScalingSection = ScalingSection()
    towers: TowerSection = TowerSection()
    ranker: RankerSection = RankerSection()
    storage: StorageConfig = StorageConfig()
    fail_at_epoch: int | None = None
    fail_marker_uri: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        unknown = set(self.variants) - set(VARIANT_NAMES)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANT_NAMES)}")
        if "fused" not in self.variants:
            raise ValueError("variants must include 'fused' (the model the bundle ships)")
        repeated = sorted({v for v in self.variants if self.variants.count(v) > 1})
        if repeated:  # each would be trained again, for the same result
            raise ValueError(f"variants lists {repeated} more than once")
        if 10 not in self.ks:
            raise ValueError("ks must include 10 (NDCG@10 is the headline metric)")
        if self.keep_epoch == "best" and not self.validation:
            raise ValueError("keep_epoch 'best' chooses by the validation targets: it needs validation >= 1 "
                             "(or set keep_epoch: last)")
        if self.ranker.enabled and self.max_examples_per_user <= self.ranker.tail:
            raise ValueError(f"max_examples_per_user ({self.max_examples_per_user}) must exceed ranker.tail "
                             f"({self.ranker.tail}): a user's last ranker.tail examples are the ranker's alone, "
                             "the towers train on the ones before")
        if (self.fail_at_epoch is None) != (self.fail_marker_uri is None):
            raise ValueError("fail_at_epoch and fail_marker_uri go together")
        if self.towers.d_model % self.towers.n_heads:
            raise ValueError("towers.d_model must be divisible by towers.n_heads")
        return self

    @property
    def bundle_uri(self) -> str:
        return f"{self.models_uri.rstrip('/')}/{self.version}"
