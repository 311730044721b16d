"""Latent item attributes of the sample corpus and the vocabularies that express them.

Each attribute is carried by exactly one modality, so that no single modality holds all the signal:

- ``category`` is written into the item text (most of the time: a share of texts stay generic);
- ``colour`` and ``shape`` exist only in the image;
- ``pitch``, ``tempo`` and ``timbre`` exist only in the audio.

Users prefer categories, colours and pitches (see :mod:`tessera.corpus.interactions`), so a model
that sees text, image and audio together can recover more of a user's taste than any one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORIES: dict[str, dict[str, list[str]]] = {
    "kitchen": {"nouns": ["saucepan", "skillet", "kettle", "whisk", "cutting board", "colander"],
                "words": ["cooking", "recipes", "the stovetop", "simmering sauces", "baking"]},
    "outdoor": {"nouns": ["tent", "backpack", "lantern", "sleeping bag", "trekking pole", "camp stove"],
                "words": ["hiking", "camping", "the trail", "mountain weekends", "wild places"]},
    "music": {"nouns": ["ukulele", "drum pad", "harmonica", "metronome", "guitar strap", "capo"],
              "words": ["rehearsals", "practice sessions", "live gigs", "songwriting", "the stage"]},
    "office": {"nouns": ["stapler", "desk lamp", "notebook", "monitor stand", "pen set", "file box"],
               "words": ["meetings", "paperwork", "the workday", "focused writing", "the desk"]},
    "garden": {"nouns": ["trowel", "watering can", "pruning shears", "seed tray", "hose reel", "planter"],
               "words": ["planting", "the flower bed", "harvest time", "seedlings", "the vegetable patch"]},
    "fitness": {"nouns": ["kettlebell", "yoga mat", "jump rope", "resistance band", "foam roller", "dumbbell"],
                "words": ["workouts", "stretching", "training days", "the gym", "morning runs"]},
    "toys": {"nouns": ["puzzle", "toy train", "building blocks", "plush bear", "kite", "marble run"],
             "words": ["playtime", "kids", "rainy afternoons", "family games", "imagination"]},
    "bath": {"nouns": ["towel set", "soap dish", "bath mat", "shower caddy", "loofah", "bath robe"],
             "words": ["the bathroom", "relaxing evenings", "spa days", "the shower", "self care"]},
}
CATEGORY_NAMES = list(CATEGORIES)

# name -> RGB; the image's background carries the colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200),
    "yellow": (230, 210, 40), "purple": (130, 40, 170), "orange": (240, 130, 20),
}
COLOUR_NAMES = list(COLOURS)
SHAPES = ["circle", "square", "triangle", "cross"]

PITCHES_HZ = [220.0, 311.0, 440.0, 622.0, 880.0]
TEMPOS_BPS = [2.0, 4.0, 8.0]  # beeps per second
TIMBRES = ["sine", "square", "sawtooth"]

GENERIC_ADJECTIVES = ["sturdy", "compact", "lightweight", "durable", "handy", "classic", "practical",
                      "well made", "versatile", "simple", "reliable", "elegant"]
GENERIC_NOUNS = ["item", "product", "piece", "accessory", "everyday essential", "find"]


@dataclass(frozen=True)
class ItemAttributes:
    """Latent attributes of a block of items, one int per item and attribute (indices into the lists)."""

    category: np.ndarray
    colour: np.ndarray
    shape: np.ndarray
    pitch: np.ndarray
    tempo: np.ndarray
    timbre: np.ndarray

    def __len__(self) -> int:
        return len(self.category)


def sample_attributes(rng: np.random.Generator, n: int) -> ItemAttributes:
    """Draw ``n`` items' attributes uniformly (popularity is drawn separately)."""
    return ItemAttributes(
        category=rng.integers(0, len(CATEGORY_NAMES), n, dtype=np.int16),
        colour=rng.integers(0, len(COLOUR_NAMES), n, dtype=np.int16),
        shape=rng.integers(0, len(SHAPES), n, dtype=np.int16),
        pitch=rng.integers(0, len(PITCHES_HZ), n, dtype=np.int16),
        tempo=rng.integers(0, len(TEMPOS_BPS), n, dtype=np.int16),
        timbre=rng.integers(0, len(TIMBRES), n, dtype=np.int16),
    )
