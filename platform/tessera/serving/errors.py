"""Per-request failures that travel back through a batch as values, never as exceptions.

A batched call answers every request of the batch: a bad request becomes a :class:`RequestError` in
its slot (the others are unaffected), and the ingress turns it into the HTTP status it names.

Example::

    out = core.encode_users(queries)
    if isinstance(out[0], RequestError):
        raise HTTPException(out[0].status, out[0].detail)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestError:
    """An error answer, 4xx (or 503 when the replica cannot serve the query now): ``status`` (HTTP), ``kind``
    (machine-readable) and ``detail`` (what is wrong)."""

    status: int
    kind: str
    detail: str

    @classmethod
    def unknown_items(cls, ids: list[str]) -> RequestError:
        shown = ", ".join(repr(i[:80]) for i in ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
        return cls(422, "unknown_items", f"unknown item ids: {shown}")
