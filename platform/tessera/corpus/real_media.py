"""Listing of the real media in ``../shared/data`` (grocery photos + descriptions, spoken digits)."""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealMedia:
    photos: tuple[tuple[str, int], ...]       # (path, class id)
    descriptions: dict[int, str]               # class id -> product description
    class_names: dict[int, str]
    recordings: tuple[str, ...]                # WAV paths


def _read_description(path: Path) -> str:
    text = path.read_text(errors="replace")
    # *_Description.txt holds the plain description; strip the "Title:/Description:" framing if present.
    for line in text.splitlines():
        if line.startswith("Description:"):
            return line[len("Description:"):].strip()
    return " ".join(text.split())


@functools.lru_cache(maxsize=4)
def load_real_media(data_dir: str) -> RealMedia:
    """Index the shared data folder; raises FileNotFoundError naming what is missing."""
    root = Path(data_dir).resolve()
    grocery = root / "grocery" / "dataset"
    classes_csv = grocery / "classes.csv"
    if not classes_csv.exists():
        raise FileNotFoundError(f"real media enabled but {classes_csv} is missing (real_media.data_dir={data_dir})")
    descriptions, names = {}, {}
    with classes_csv.open() as f:
        for row in csv.DictReader(f):
            cid = int(row["Class ID (int)"])
            names[cid] = row["Class Name (str)"]
            descriptions[cid] = _read_description(grocery / row["Product Description Path (str)"].lstrip("/"))
    photos = []
    for listing in ("val.txt", "test.txt"):
        for line in (grocery / listing).read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0]:
                photos.append((str(grocery / parts[0]), int(parts[1])))
    recordings = tuple(sorted(str(p) for p in (root / "fsdd" / "recordings").glob("*.wav")))
    if not photos or not recordings:
        raise FileNotFoundError(f"no grocery photos or FSDD recordings under {root}")
    return RealMedia(tuple(photos), descriptions, names, recordings)
