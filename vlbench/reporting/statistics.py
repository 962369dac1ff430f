"""How far to trust a number: per-sample outcomes read back from result cells, seeded
bootstrap intervals, and paired tests between two rows evaluated on the same samples.

- Each cell records its per-sample outcomes (``samples``: correct or not per sample for
  classification, the rank of the first positive per query for retrieval). A headline
  metric is the mean of one 0/1 outcome per query (:func:`outcomes`).
- A 95 % interval is the percentile interval of 1,000 bootstrap resamples of the queries
  (Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, §13), seeded by what is
  resampled, so a table prints the same interval every time. A mean over several datasets
  resamples each dataset apart (a stratified bootstrap) and averages.
- Two rows are compared on the same samples only (the same dataset ids). One accuracy
  against another: the exact McNemar test, a two-sided binomial test on the discordant
  pairs (McNemar, Psychometrika 1947; Dietterich, Neural Computation 1998, for classifier
  comparison). Recall, and means over datasets: a paired bootstrap of the difference
  (Koehn, EMNLP 2004), two-sided, against the resampled differences shifted to mean zero.
- A row trained with several seeds (``training_seeds``) is a sample of trainings as well as
  of test queries: two trainings of one defense differ by more than the per-sample interval
  of either allows. Its number is the mean over seeds, and its interval and tests come from
  a hierarchical bootstrap (Davison & Hinkley, "Bootstrap Methods and their Application",
  1997, §3.8; Saravanan et al., "Application of the hierarchical bootstrap to multi-level
  data in neuroscience", NBDC 2020): each resample draws the seeds with replacement, then the
  test queries with replacement, one draw of queries shared by every seed and by both rows
  of a comparison (they were evaluated on the same queries), so the pairing on queries is
  kept while the seeds vary. It needs no normality and no equal variances, and with one seed
  it is the per-sample bootstrap above. With three seeds the seed level has only ten distinct
  resamples and its spread is ~(S−1)/S of the seeds' variance: the interval is a floor on
  the uncertainty, not a generous one; more seeds tighten both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vlbench.store.files import stable_hash

RESAMPLES = 1000
LEVEL = 0.95
#: below this p-value a difference counts as significant
ALPHA = 0.05


def outcomes(result: dict, metric: str) -> np.ndarray | None:
    """A cell's per-query 0/1 outcomes behind ``metric`` (``top1``, ``clean_top1``,
    ``i2t_R@K``, ``t2i_R@K`` and their ``clean_`` forms), or None if it did not record them."""
    samples = result.get("samples") or {}
    if metric in ("top1", "clean_top1"):
        bits = samples.get(metric)
        return None if bits is None else np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")
    prefix = "clean_" if metric.startswith("clean_") else ""
    direction, _, k = metric[len(prefix):].partition("_R@")
    ranks = samples.get(f"{prefix}{direction}_rank")
    if ranks is None or not k.isdigit():
        return None
    return (np.asarray(ranks) <= int(k)).astype(np.uint8)


def query_ids(result: dict, metric: str) -> tuple:
    """What names the queries of ``metric``'s outcomes: two cells can be paired only when
    these are equal."""
    samples = result.get("samples") or {}
    ids = tuple(samples.get("ids", ()))
    if "t2i" in metric:
        return ids, tuple(samples.get("text_images", ()))
    return (ids,)


def _generator(*what) -> np.random.Generator:
    return np.random.default_rng(int(stable_hash(list(map(str, what)), 15), 16))


def _resample_means(groups: list[np.ndarray], rng: np.random.Generator,
                    paired_with: list[np.ndarray] | None = None) -> np.ndarray:
    """Bootstrap means of the mean over ``groups`` (each resampled apart); with
    ``paired_with``, of the mean difference ``groups − paired_with`` on the same draws."""
    total = np.zeros(RESAMPLES)
    for g, group in enumerate(groups):
        values = group.astype(float) if paired_with is None else group.astype(float) - paired_with[g]
        # a resample of n queries is how many of each distinct value it draws: a multinomial
        # over the values' shares (the outcomes take two or three values, so this is exact
        # and costs nothing against drawing n indices per resample)
        distinct, counts = np.unique(values, return_counts=True)
        drawn = rng.multinomial(len(values), counts / len(values), size=RESAMPLES)
        total += drawn @ distinct / len(values)
    return 100.0 * total / len(groups)


def interval(groups: list[np.ndarray], *seed) -> tuple[float, float]:
    """The 95 % bootstrap interval (percent) of the mean over ``groups`` of their means."""
    return _percentiles(_resample_means(groups, _generator("interval", *seed)))


def _percentiles(draws: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def _query_weights(sizes: list[int], rng: np.random.Generator) -> list[np.ndarray]:
    """[RESAMPLES, n] counts of each query in each resample, per dataset of ``sizes``."""
    return [rng.multinomial(n, np.full(n, 1.0 / n), size=RESAMPLES) for n in sizes]


def _seeded_means(runs: list[list[np.ndarray]], weights: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Hierarchical bootstrap means (see the module docstring): per resample, the mean over
    seeds drawn with replacement of each seed's mean over datasets, its queries reweighted
    by ``weights``."""
    per_seed = np.stack([sum(w @ group.astype(float) / len(group) for w, group in zip(weights, groups)) / len(groups)
                         for groups in runs])  # [seeds, RESAMPLES]
    drawn = rng.integers(len(runs), size=(RESAMPLES, len(runs)))
    return 100.0 * per_seed[drawn, np.arange(RESAMPLES)[:, None]].mean(axis=1)


def seeded_interval(runs: list[list[np.ndarray]], *seed) -> tuple[float, float]:
    """The 95 % interval (percent) of the mean over training seeds (``runs``: per seed, one
    outcome array per dataset): the per-sample bootstrap for one seed, else hierarchical."""
    if len(runs) == 1:
        return interval(runs[0], *seed)
    rng = _generator("seeded interval", *seed)
    return _percentiles(_seeded_means(runs, _query_weights([len(g) for g in runs[0]], rng), rng))


def mcnemar_exact(first: np.ndarray, second: np.ndarray) -> float:
    """Two-sided p-value of the exact McNemar test: under equal accuracy, the samples one
    gets right and the other wrong split as a fair coin."""
    b = int(((first == 1) & (second == 0)).sum())
    c = int(((first == 0) & (second == 1)).sum())
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass
class Difference:
    """``first − second`` in points, its 95 % interval and a two-sided p-value."""

    value: float
    low: float
    high: float
    p: float
    test: str


def seeded_difference(first: list[list[np.ndarray]], second: list[list[np.ndarray]], *seed, exact: bool) -> Difference:
    """Compare two rows on the same queries, each given per training seed (one array per
    dataset, aligned across seeds and rows). One seed each: :func:`paired_difference`;
    otherwise a hierarchical bootstrap of the difference of the means over seeds."""
    if len(first) == 1 and len(second) == 1:
        return paired_difference(first[0], second[0], *seed, exact=exact)
    value = float(np.mean([100.0 * np.mean([g.mean() for g in groups]) for groups in first])
                  - np.mean([100.0 * np.mean([g.mean() for g in groups]) for groups in second]))
    rng = _generator("seeded paired", *seed)
    weights = _query_weights([len(g) for g in first[0]], rng)
    draws = _seeded_means(first, weights, rng) - _seeded_means(second, weights, rng)
    low, high = _percentiles(draws)
    p = float((np.abs(draws - value) >= abs(value) - 1e-9).mean())
    return Difference(value, low, high, p, "hierarchical bootstrap (seeds, then samples)")


def paired_difference(first: list[np.ndarray], second: list[np.ndarray], *seed, exact: bool) -> Difference:
    """Compare two rows on the same queries (one array per dataset, aligned). ``exact``: one
    dataset's accuracy, tested by exact McNemar; otherwise a paired bootstrap."""
    value = 100.0 * float(np.mean([f.mean() - s.mean() for f, s in zip(first, second)]))
    draws = _resample_means(first, _generator("paired", *seed), paired_with=second)
    low, high = _percentiles(draws)
    if exact and len(first) == 1:
        return Difference(value, low, high, mcnemar_exact(first[0], second[0]), "exact McNemar")
    # the null distribution is the resampled one shifted to mean zero (Efron & Tibshirani
    # 1993, §16.4): how often does it stray at least as far as what was observed
    p = float((np.abs(draws - value) >= abs(value) - 1e-9).mean())
    return Difference(value, low, high, p, "paired bootstrap")
