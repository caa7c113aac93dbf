"""How sure an evaluation number is: a seeded cluster bootstrap (a prompt's pairs or list resampled whole, within
its subset), differences between models on the same resamples (paired), and the exact McNemar test.

Every accuracy `rmtrain eval` reports is a ratio of sums over items (pairs, lists, rows), and every item belongs to
one cluster (its prompt: a pair, a list, or several pairs of one prompt). A resample draws, within each stratum (subset), as many clusters as the stratum has, with
replacement; `Bootstrap.counts[r, c]` is how often cluster c was drawn in resample r. A statistic of a resample is
then a matrix product over clusters, `counts @ cluster_sums`, so R resamples cost a few [R, C] products and no
Python loop over resamples or items.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

CONFIDENCE = 0.95


def cluster_numbers(keys: Sequence[Hashable], strata: Sequence[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
    """(each key's cluster number, numbered by first appearance; each cluster's stratum number). A key seen in two
    strata is two clusters: a prompt shared by two subsets is resampled within each."""
    number: dict[tuple, int] = {}
    stratum_number: dict[Hashable, int] = {}
    of_key, stratum = [], []
    for key, s in zip(keys, strata, strict=True):
        if (s, key) not in number:
            number[(s, key)] = len(number)
            stratum.append(stratum_number.setdefault(s, len(stratum_number)))
        of_key.append(number[(s, key)])
    return torch.tensor(of_key, dtype=torch.long), torch.tensor(stratum, dtype=torch.long)


class Bootstrap:
    """`resamples` stratified resamples of clusters, drawn with a seeded generator (the same seed, the same draws):
    in each resample every stratum draws as many of its clusters as it has, with replacement."""

    DRAWS_AT_ONCE = 1 << 22
    """Draws made (and counted) per block of resamples: a large eval set never holds all its draws at once."""

    def __init__(self, stratum: torch.Tensor, resamples: int, seed: int = 0):
        self.resamples, self.seed = resamples, seed
        generator = torch.Generator().manual_seed(seed)
        n = int(stratum.numel())
        members = [torch.nonzero(stratum == s).flatten() for s in range(int(stratum.max()) + 1 if n else 0)]
        block = max(1, self.DRAWS_AT_ONCE // max(n, 1))
        blocks = []
        for first in range(0, resamples, block):
            rows = min(block, resamples - first)
            offsets = (torch.arange(rows) * n)[:, None]
            drawn = [(m[torch.randint(len(m), (rows, len(m)), generator=generator)] + offsets).flatten() for m in members]
            index = torch.cat(drawn) if drawn else torch.zeros(0, dtype=torch.long)
            blocks.append(torch.bincount(index, minlength=rows * n).reshape(rows, n).to(torch.uint8))
        # A prompt is drawn a handful of times at most (about log n / log log n), so a byte per count suffices.
        self.counts = torch.cat(blocks) if blocks else torch.zeros(0, n, dtype=torch.uint8)
        """[resamples, clusters], uint8: how often each cluster is drawn in each resample."""

    def ratio(self, numerator: torch.Tensor, denominator: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
        """Per resample, sum(numerator) / sum(denominator) over the items drawn (given per item, with each item's
        cluster): a cluster drawn twice counts its items twice."""
        n = self.counts.shape[1]
        sums = torch.zeros(n, 2, dtype=torch.float64)
        sums[:, 0].index_add_(0, cluster, numerator.double())
        sums[:, 1].index_add_(0, cluster, denominator.double())
        rows = max(1, self.DRAWS_AT_ONCE // max(n, 1))
        totals = torch.cat([chunk.double() @ sums for chunk in self.counts.split(rows)])
        return totals[:, 0] / totals[:, 1]


@dataclass
class Estimate:
    """A number and, with a bootstrap, its value in every resample (the same resamples for every estimate of one
    evaluation, so differences between estimates are paired)."""

    value: float | None
    samples: torch.Tensor | None = None

    def interval(self, confidence: float = CONFIDENCE) -> list[float] | None:
        """The percentile interval: the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled
        values (resamples where the statistic is undefined, e.g. no item of a rare group drawn, left out)."""
        if self.samples is None or self.value is None:
            return None
        finite = self.samples[torch.isfinite(self.samples)]
        if finite.numel() == 0:
            return None
        tail = (1 - confidence) / 2
        low, high = torch.quantile(finite, torch.tensor([tail, 1 - tail], dtype=finite.dtype)).tolist()
        return [low, high]

    def __sub__(self, other: "Estimate") -> "Estimate":
        return combine(lambda a, b: a - b, self, other)


def combine(function: Callable, *estimates: Estimate) -> Estimate:
    """`function` of the estimates' values, and of their samples resample by resample: it must work on floats and
    on tensors alike (arithmetic; `worst` takes minima)."""
    if any(e.value is None for e in estimates):
        return Estimate(None)
    value = function(*(e.value for e in estimates))
    samples = None
    if all(e.samples is not None for e in estimates):
        samples = function(*(e.samples for e in estimates))
    return Estimate(float(value), samples)


def mean(values: torch.Tensor, cluster: torch.Tensor, bootstrap: Bootstrap | None, where: torch.Tensor | None = None) -> Estimate:
    """The mean of per-item `values` (over the items where `where` is true; each item in cluster `cluster[i]`), with
    its resampled values; no value when no item counts."""
    weights = torch.ones_like(values, dtype=torch.float64) if where is None else where.double()
    values = torch.where(weights > 0, values.double(), 0.0)  # an item left out may hold NaN: it must add nothing
    total = float(weights.sum())
    if total == 0:
        return Estimate(None)
    value = float((values * weights).sum()) / total
    if bootstrap is None:
        return Estimate(value)
    return Estimate(value, bootstrap.ratio(values * weights, weights, cluster))


def weighted_mean(estimates: Sequence[Estimate], weights: Sequence[float]) -> Estimate:
    """sum(w_i * e_i) / sum(w_i), resample by resample."""
    total = sum(weights)
    return combine(lambda *xs: sum(w * x for w, x in zip(weights, xs)) / total, *estimates)


def worst(estimates: Sequence[Estimate], lower_is_better: bool = False) -> tuple[int, Estimate]:
    """The index of the worst estimate (the lowest, or the highest when lower is better), and its estimate: its
    value, and in every resample the worst of all the estimates' values there (the worst group may change)."""
    present = [i for i, e in enumerate(estimates) if e.value is not None]
    pick = max if lower_is_better else min
    index = pick(present, key=lambda i: estimates[i].value)
    samples = None
    if all(estimates[i].samples is not None for i in present):
        stacked = torch.stack([estimates[i].samples for i in present])
        samples = stacked.max(dim=0).values if lower_is_better else stacked.min(dim=0).values
    return index, Estimate(estimates[index].value, samples)


# --------------------------------------------------------------------------------------------------
# Two models on the same items


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: b items only the first model gets right, c only
    the second. Under "equally good" b ~ Binomial(b + c, 1/2), so p = min(1, 2 * P[X <= min(b, c)]); b = c = 0
    gives 1. Integer arithmetic (math.comb) until the one division: exact for any count."""
    n, k = first_only + second_only, min(first_only, second_only)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def discordant(first: torch.Tensor, second: torch.Tensor) -> tuple[int, int]:
    """(items the first gets right and the second wrong, items the second gets right and the first wrong), from
    0/1 outcomes on the same items."""
    first, second = first.bool(), second.bool()
    return int((first & ~second).sum()), int((~first & second).sum())
