"""Item descriptions for the sample corpus: the category is in the words, nothing else is."""

from __future__ import annotations

import numpy as np

from tessera.corpus.attributes import CATEGORIES, CATEGORY_NAMES, GENERIC_ADJECTIVES, GENERIC_NOUNS

_TEMPLATES = [
    "A {adj} {noun} made for {word}. {filler}",
    "This {adj} {noun} is a favourite for {word}; {filler}",
    "{Adj} {noun}, ideal for {word}. {filler}",
    "Looking for something for {word}? Try this {adj} {noun}. {filler}",
]
_GENERIC_TEMPLATES = [
    "A {adj} {noun} that does its job. {filler}",
    "{Adj} {noun} with a clean finish. {filler}",
]
_FILLERS = ["Ships in recyclable packaging.", "Backed by a two-year warranty.", "Easy to clean and store.",
            "Customers love the value.", "Available while stocks last.", "Designed in our studio.", ""]


def describe(rng: np.random.Generator, category: int, generic: bool) -> str:
    """One description; ``generic`` texts give no hint of the category."""
    adj = str(rng.choice(GENERIC_ADJECTIVES))
    filler = str(rng.choice(_FILLERS))
    if generic:
        tpl = str(rng.choice(_GENERIC_TEMPLATES))
        noun = str(rng.choice(GENERIC_NOUNS))
        word = ""
    else:
        tpl = str(rng.choice(_TEMPLATES))
        vocab = CATEGORIES[CATEGORY_NAMES[category]]
        noun = str(rng.choice(vocab["nouns"]))
        word = str(rng.choice(vocab["words"]))
    return tpl.format(adj=adj, Adj=adj.capitalize(), noun=noun, word=word, filler=filler).strip()
