"""Vectors parts with random unit vectors, shaped as the index job's vector stage writes them: for
tests and benchmarks of the shard split and builds, which move vectors and never look at them.

Example::

    rng = np.random.default_rng(0)
    storage.write_parquet(uri, random_vectors_table([f"item-{i}" for i in range(1000)], 64, rng))
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

from tessera.index_job.vectors import FUSED, STATUS_NO_MODALITY, STATUS_OK, matrix_column


def random_vectors_table(ids: Sequence[str], dim: int, rng: np.random.Generator,
                         modalities: Sequence[str] = ("text", "image"), share: float = 0.7) -> pa.Table:
    """``item_id``, ``status``, ``modalities``, ``fused`` and one column per modality.

    Each item has each modality with probability ``share``; an item with none is ``no_modality`` (out of
    the fused index, with a fused vector all the same), as the vector stage marks it.
    """
    n = len(ids)
    has = {m: rng.random(n) < share for m in modalities}
    ok = np.zeros(n, bool)
    for present in has.values():
        ok |= present

    def unit(count: int) -> np.ndarray:
        x = rng.standard_normal((count, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return pa.table({
        "item_id": pa.array(list(ids), pa.string()),
        "status": np.where(ok, STATUS_OK, STATUS_NO_MODALITY).tolist(),
        "modalities": [",".join(m for m in modalities if has[m][i]) for i in range(n)],
        FUSED: matrix_column(unit(n), np.ones(n, bool)),
        **{m: matrix_column(unit(n), has[m]) for m in modalities},
    })
