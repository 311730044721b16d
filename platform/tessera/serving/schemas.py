"""Request and response models of the recommender API (pydantic; FastAPI turns them into OpenAPI).

Limits that depend on the deployment (the largest ``k``, the largest payload) are checked by the
ingress against its config; the models carry the static rules.

Example::

    RecommendRequest(user_id="user-00000004", recent_item_ids=["item-00000010"], k=10)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_K = 1000  # hard ceiling; the deployment's ``max_k`` is usually lower
MAX_RECENT = 200
MAX_ID_LENGTH = 1024  # characters of an item id in a request (longer ones are refused, not looked up)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    """``POST /v1/recommend``: a known user, recent items, or both; neither gives a cold-start answer."""

    user_id: str | None = Field(None, min_length=1, max_length=256,
                                description="a user of the interaction-log snapshot (unknown users are cold)")
    recent_item_ids: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_RECENT,
                                       description="items the user interacted with since the snapshot, oldest first")
    # strict: JSON true, "5" and 5.0 are not a count, nor "yes" a boolean (lax mode took them)
    k: int = Field(10, ge=1, le=MAX_K, strict=True, description="items to return")
    exclude_seen: bool = Field(True, strict=True, description="leave out items in the user's history (the snapshot's "
                                "events that have a time: an event without one is no event to training, "
                                "the index self-check or serving) and recent items")


class SearchRequest(_Strict):
    """``POST /v1/search``: exactly one of ``text``, ``image`` (base64), ``audio`` (base64 WAV)."""

    text: str | None = Field(None, min_length=1, max_length=10_000)
    image: str | None = Field(None, min_length=1, description="base64 of JPEG / PNG bytes")
    audio: str | None = Field(None, min_length=1, description="base64 of WAV bytes")
    k: int = Field(10, ge=1, le=MAX_K, strict=True)
    index: Literal["fused", "text", "image", "audio"] = Field(
        "fused", description="search the fused item vectors, or one modality's vectors only")

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchRequest:
        given = [name for name in ("text", "image", "audio") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, audio (got {given or 'none'})")
        return self

    @property
    def modality(self) -> str:
        return next(name for name in ("text", "image", "audio") if getattr(self, name) is not None)


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(description="the final score: the ranker's when it ran, else the retrieval cosine; for a "
                                     "cold-start answer, the item's popularity in the training log (each user's last "
                                     "max_examples_per_user events counted)")
    retrieval_score: float | None = Field(None, description="cosine of query and item vectors")


class Timings(BaseModel):
    queue_ms: float = Field(0.0, description="in the Ingress before the request's batch ran: the batching window "
                                             "and the batches ahead of it")
    encode_ms: float = 0.0
    retrieve_ms: float = 0.0
    rank_ms: float = 0.0
    total_ms: float = Field(0.0, description="in the Ingress, from the request's arrival to its answer")


TIMED_STAGES = tuple(name.removesuffix("_ms") for name in Timings.model_fields)  # queue, encode, ..., total


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    cold_start: bool = Field(description="no usable history: these are the most popular items")
    cold_start_reason: str | None = None
    ranked: bool = Field(description="whether the ranker re-scored the candidates")
    model_version: str
    index_version: str
    timings: Timings


class SearchResponse(BaseModel):
    items: list[ScoredItem]
    modality: str
    index: str
    model_version: str
    index_version: str
    timings: Timings


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model_version: str
    index_version: str
    timings: Timings


class RolloutStatus(BaseModel):
    """A version being rolled out (``loading``: the stages load it while the current one answers) or one
    whose rollout failed (``failed``, with the error: the current version keeps answering)."""

    index_uri: str
    state: Literal["loading", "failed"]
    since: float = Field(description="when the rollout started (Unix time)")
    error: str | None = Field(None, description="why the last try failed (kept while the next one loads)")
    attempts: int = Field(0, description="tries that failed so far")
    retry_at: float | None = Field(None, description="when a failed rollout is tried again (Unix time)")


class VersionResponse(BaseModel):
    index_version: str
    index_uri: str
    model_version: str
    model_uri: str
    embedding_run: str
    num_items: int
    num_shards: int
    created_at: str
    recall_check: dict | None = None
    placeholder_model: bool = False
    rollout: RolloutStatus | None = Field(None, description="a newer version being rolled out, or whose rollout "
                                                            "failed; absent when none is pending")


class ErrorResponse(BaseModel):
    detail: str | list
    kind: Literal["bad_request", "unknown_items", "not_found", "too_large", "bad_media", "unavailable",
                  "timeout"] | None = None
