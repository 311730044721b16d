"""One part of the items table: rows, media objects and ground truth, all from ``(seed, part)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from tessera.corpus import media
from tessera.corpus.attributes import CATEGORY_NAMES, COLOUR_NAMES, SHAPES, TIMBRES
from tessera.corpus.catalog import BAD_KINDS, STREAM_MEDIA, item_id, part_latents
from tessera.corpus.config import CorpusConfig
from tessera.corpus.real_media import load_real_media
from tessera.corpus.text import describe
from tessera.storage import join_uri

# A description in Windows-1252: bytes that are not valid UTF-8 (é = 0xE9, ’ = 0x92).
_NON_UTF8 = "Caf\u00e9 cr\u00e8me set \u2019limited\u2019 \u00e9dition".encode("cp1252")

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("text", pa.string()), ("image_uri", pa.string()),
    ("audio_uri", pa.string()), ("price", pa.float32()),
])


@dataclass
class ItemPart:
    """Rows of one part; ``objects`` maps URI -> bytes to upload before the rows are written."""

    rows: dict[str, list] = field(default_factory=dict)
    truth: dict[str, list] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)

    def items_table(self) -> pa.Table:
        # Texts are built as bytes: a deliberately invalid UTF-8 text must reach Parquet unchanged,
        # as it does in real data lakes, so the string column is assembled from raw buffers.
        raw = pa.array(self.rows["text"], pa.binary())
        text = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), null_count=raw.null_count)
        cols = {k: pa.array(v, ITEMS_SCHEMA.field(k).type) for k, v in self.rows.items() if k != "text"}
        cols["text"] = text
        return pa.table({f.name: cols[f.name] for f in ITEMS_SCHEMA}, schema=ITEMS_SCHEMA)

    def truth_table(self) -> pa.Table:
        return pa.table(self.truth)


def build_item_part(cfg: CorpusConfig, part: int) -> ItemPart:
    lat = part_latents(cfg, part)
    rng = np.random.default_rng([cfg.seed, STREAM_MEDIA, part])
    media_root = join_uri(cfg.root, "corpus", "media")
    real = load_real_media(cfg.real_media.data_dir) if lat.real.any() else None
    out = ItemPart()
    rows = {k: [] for k in ("item_id", "text", "image_uri", "audio_uri", "price")}
    truth = {k: [] for k in ("item_id", "category", "colour", "shape", "pitch", "tempo", "timbre",
                             "popularity", "bad_kind", "has_text", "has_image", "has_audio", "real_media",
                             "generic_text")}
    a = lat.attrs
    for j in range(len(a)):
        iid = item_id(lat.start + j)
        bad = BAD_KINDS[lat.bad_kind[j]] if lat.bad_kind[j] >= 0 else ""
        has_text, has_image, has_audio = (bool(x) for x in lat.present[j])
        image_uri = join_uri(media_root, "images", f"{iid}.jpg") if has_image else None
        audio_uri = join_uri(media_root, "audio", f"{iid}.wav") if has_audio else None
        if lat.real[j]:
            photo, cls = real.photos[int(rng.integers(len(real.photos)))]
            text = real.descriptions[cls].encode()
            image = Path(photo).read_bytes()
            audio = Path(real.recordings[int(rng.integers(len(real.recordings)))]).read_bytes()
        else:
            text = describe(rng, int(a.category[j]), bool(lat.generic_text[j])).encode()
            image = media.render_image(rng, int(a.colour[j]), int(a.shape[j]), cfg.image_size)
            audio = media.render_audio(rng, int(a.pitch[j]), int(a.tempo[j]), int(a.timbre[j]),
                                       cfg.audio_sample_rate, cfg.audio_seconds)
        if bad == "corrupt_image":
            image = media.corrupt_jpeg(rng, image)
        elif bad == "truncated_audio":
            audio = media.truncate_wav(audio)
        elif bad == "empty_text":
            text = b""
        elif bad == "non_utf8_text":
            text = _NON_UTF8
        elif bad == "oversized_image":
            image = media.oversized_jpeg()
        elif bad == "wrong_format":
            image = audio  # WAV bytes behind a .jpg URI
        if not has_text:
            text = None
        # bad items always have all three modalities (see part_latents): the image URI dangles here
        if image_uri and bad != "missing_object":
            out.objects[image_uri] = image
        if audio_uri:
            out.objects[audio_uri] = audio
        rows["item_id"].append(iid)
        rows["text"].append(text)
        rows["image_uri"].append(image_uri)
        rows["audio_uri"].append(audio_uri)
        rows["price"].append(round(float(rng.lognormal(3.0, 0.8)), 2))
        synthetic = not lat.real[j]
        truth["item_id"].append(iid)
        truth["category"].append(CATEGORY_NAMES[a.category[j]] if synthetic else None)
        truth["colour"].append(COLOUR_NAMES[a.colour[j]] if synthetic else None)
        truth["shape"].append(SHAPES[a.shape[j]] if synthetic else None)
        truth["pitch"].append(int(a.pitch[j]) if synthetic else None)
        truth["tempo"].append(int(a.tempo[j]) if synthetic else None)
        truth["timbre"].append(TIMBRES[a.timbre[j]] if synthetic else None)
        truth["popularity"].append(float(lat.popularity[j]))
        truth["bad_kind"].append(bad or None)
        truth["has_text"].append(text is not None)
        truth["has_image"].append(image_uri is not None)
        truth["has_audio"].append(audio_uri is not None)
        truth["real_media"].append(bool(lat.real[j]))
        truth["generic_text"].append(bool(lat.generic_text[j]) and synthetic)
    out.rows, out.truth = rows, truth
    return out
