"""EDA rewrites of captions (Wei & Zou, EMNLP 2019), one of N:N's text augmentation pools:
synonym replacement, random insertion, random swap and random deletion, over a small synonym
table of the world's and common caption words."""

from __future__ import annotations

from vlbench.evaluation.words import STOP_WORDS, join_words, split_words

# -- EDA: easy data augmentation (Wei & Zou, EMNLP 2019, §2) ----------------------------------
#: A small built-in thesaurus (WordNet is not available offline): common caption words and the
#: world's vocabulary, each with near-synonyms that keep the caption's meaning.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "photo": ("picture", "image", "snapshot"), "picture": ("photo", "image"), "image": ("picture", "photo"),
    "small": ("little", "tiny"), "little": ("small",), "large": ("big", "huge"), "big": ("large",),
    "medium": ("mid-sized", "moderate"), "object": ("thing", "item"), "thing": ("object", "item"),
    "shape": ("figure", "form"), "background": ("backdrop", "setting"), "pattern": ("texture", "design"),
    "middle": ("centre", "center"), "centre": ("middle", "center"), "striped": ("stripy", "lined"),
    "checkered": ("chequered", "checked"), "dotted": ("spotted", "dotty"), "wavy": ("undulating", "rippled"),
    "noisy": ("grainy", "speckled"), "plain": ("blank", "uniform"), "man": ("person", "guy"),
    "woman": ("person", "lady"), "people": ("persons", "folks"), "dog": ("puppy", "hound"),
    "walking": ("strolling", "wandering"), "running": ("jogging", "sprinting"), "sitting": ("seated",),
    "street": ("road",), "standing": ("upright",), "looking": ("gazing", "staring"), "near": ("beside", "by"),
}


def _synonym(word: str, rng) -> str | None:
    options = SYNONYMS.get(word)
    return rng.choice(options) if options else None


def eda(text: str, operation: str, rng, alpha: float = 0.1) -> str:
    """One EDA rewrite of ``text``: ``sr`` synonym replacement, ``ri`` random insertion (of a
    synonym), ``rs`` random swap, ``rd`` random deletion; n = max(1, α·words) changes."""
    words = split_words(text)
    if not words:
        return text
    n = max(1, int(alpha * len(words)))
    if operation == "sr":
        replaceable = [i for i, w in enumerate(words) if w in SYNONYMS and w not in STOP_WORDS]
        for i in rng.sample(replaceable, min(n, len(replaceable))):
            words[i] = _synonym(words[i], rng)
    elif operation == "ri":
        for _ in range(n):
            candidates = [w for w in words if w in SYNONYMS]
            if candidates:
                words.insert(rng.randrange(len(words) + 1), _synonym(rng.choice(candidates), rng))
    elif operation == "rs":
        for _ in range(n):
            if len(words) > 1:
                i, j = rng.sample(range(len(words)), 2)
                words[i], words[j] = words[j], words[i]
    elif operation == "rd":
        kept = [w for w in words if rng.random() > alpha]
        words = kept or [rng.choice(words)]
    else:
        raise ValueError(f"unknown EDA operation {operation!r}")
    return join_words(words)
