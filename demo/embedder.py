"""The demo's offline embedder: feature hashing of words and character trigrams into a fixed number
of dimensions, L2-normalised. Deterministic, no model, no download. It captures shared words and
spellings, not meaning: "lamp" finds lamps, "light for reading" finds what says so."""

import hashlib
import math
import re

DIMS = 256
WORD_WEIGHT = 1.0
TRIGRAM_WEIGHT = 0.35
DESCRIPTION = f"words and character trigrams hashed into {DIMS} dimensions"

_WORD = re.compile(r"[a-z0-9]+")


def features(text):
    """(feature, weight) pairs: each word, and the trigrams of each word padded with spaces."""
    for word in _WORD.findall(text.lower()):
        yield "w:" + word, WORD_WEIGHT
        padded = f" {word} "
        for i in range(len(padded) - 2):
            yield "t:" + padded[i:i + 3], TRIGRAM_WEIGHT


def embed(text):
    """One text's vector: every feature adds its weight, with a sign, to the dimension it hashes to."""
    vector = [0.0] * DIMS
    for feature, weight in features(text):
        digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
        sign = 1.0 if digest >> 63 else -1.0
        vector[digest % DIMS] += sign * weight
    return normalised(vector)


def mean(vectors):
    """The normalised mean of several texts' vectors (a product's vector from its chunks)."""
    total = [sum(column) for column in zip(*vectors)] if vectors else [0.0] * DIMS
    return normalised(total)


def normalised(vector):
    norm = math.sqrt(sum(x * x for x in vector))
    if norm == 0.0:
        return vector
    return [round(x / norm, 6) for x in vector]
