"""Config of the sample corpus generator (``configs/corpus.yaml``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from tessera.config import TesseraConfig
from tessera.storage import StorageConfig


class BadItemShares(TesseraConfig):
    """Share of items (0-1) made deliberately broken, by kind; the rest are good or miss a modality."""

    corrupt_image: float = Field(0.01, ge=0, le=1)
    truncated_audio: float = Field(0.01, ge=0, le=1)
    empty_text: float = Field(0.005, ge=0, le=1)
    non_utf8_text: float = Field(0.005, ge=0, le=1)
    missing_object: float = Field(0.01, ge=0, le=1)
    oversized_image: float = Field(0.002, ge=0, le=1)
    wrong_format: float = Field(0.005, ge=0, le=1)

    def total(self) -> float:
        return sum(self.model_dump().values())


class MissingShares(TesseraConfig):
    """Share of (otherwise good) items with one or two of their three modalities absent (null URI/text)."""

    one_modality: float = Field(0.08, ge=0, le=1)
    two_modalities: float = Field(0.03, ge=0, le=1)


class RealMediaConfig(TesseraConfig):
    """Mix in real media from ``../shared/data``: grocery photos with their product descriptions, and
    spoken-digit recordings. Real items carry no latent attributes; users reach them through noise."""

    enabled: bool = False
    data_dir: str = "../shared/data"
    share: float = Field(0.05, ge=0, le=1)


class CorpusConfig(TesseraConfig):
    """What to generate and where.

    Args:
        root: storage root; the corpus goes to ``<root>/corpus/`` and the ground truth (never in the
            items table) to ``<root>/truth/``.
        num_items / num_users: catalog and user counts; interactions average
            ``mean_interactions_per_user`` per user with a long-tailed spread.
        items_per_part / users_per_part: rows per Parquet part, and the unit of work of one Ray task.
        max_parts_in_flight: parts generated at once (bounds memory: one part per task).
    """

    root: str = "s3://tessera-demo"
    seed: int = 7
    num_items: int = Field(1000, ge=1)
    num_users: int = Field(300, ge=1)
    mean_interactions_per_user: float = Field(20.0, ge=1)
    items_per_part: int = Field(500, ge=1)
    users_per_part: int = Field(1000, ge=1)
    image_size: int = Field(96, ge=16, le=1024)
    audio_sample_rate: int = Field(16000, ge=4000)
    audio_seconds: float = Field(1.0, gt=0, le=30)
    generic_text_share: float = Field(0.15, ge=0, le=1)
    popularity_alpha: float = Field(1.2, gt=0, description="Pareto shape of item popularity (smaller = heavier tail)")
    noise_share: float = Field(0.1, ge=0, le=1, description="interactions drawn by popularity alone")
    bad: BadItemShares = BadItemShares()
    missing: MissingShares = MissingShares()
    real_media: RealMediaConfig = RealMediaConfig()
    upload_threads: int = Field(8, ge=1, le=256)
    max_parts_in_flight: int = Field(4, ge=1)
    task_num_cpus: float = Field(1.0, gt=0)
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _shares_fit(self) -> "CorpusConfig":
        total = self.bad.total() + self.missing.one_modality + self.missing.two_modalities
        if total > 0.9:
            raise ValueError(f"bad + missing shares add up to {total:.2f}; keep them under 0.9")
        return self

    @property
    def num_item_parts(self) -> int:
        return -(-self.num_items // self.items_per_part)

    @property
    def num_user_parts(self) -> int:
        return -(-self.num_users // self.users_per_part)

    def identity(self) -> dict:
        """The settings that determine the corpus content (for rerun checks in the manifest); where the
        real media folder sits on this machine is not one of them."""
        out = self.model_dump(exclude={"upload_threads", "max_parts_in_flight", "task_num_cpus", "storage"})
        out["real_media"].pop("data_dir")
        return out
