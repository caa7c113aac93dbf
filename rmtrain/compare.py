"""Several models on the same rows: each model's estimates, its difference to the first with a paired bootstrap
interval (the same resamples for every model), and the exact McNemar p-value where outcomes are right or wrong.

Models compare on the rows every model kept: a pair or list one model's max_length filter dropped is left out for
all (and counted). Models with different tokenizers may keep different completions of a list: a list is then
compared only if every model kept all of its completions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from rmtrain.outcomes import Outcomes, Resampling, summarize
from rmtrain.stats import discordant, mcnemar_exact

BASELINES = {"longer_wins", "shorter_wins", "top1_longest", "top1_shortest", "top1_random", "bestofk_best_score", "bestofk_mean_score",
             "bestofk_longest_regret", "longest", "shortest", "chance"}
"""Estimates that do not depend on the model's rewards (only on the rows and, for lengths, the tokenizer)."""

BINARY = {"accuracy": ("pairs", "correct"), "top1_accuracy": ("lists", "top1")}
"""Estimates that are means of right-or-wrong outcomes (McNemar applies): the table and column holding them."""


def compared_rows(outcomes: list[Outcomes], same_tokens: bool, whole: list[set]) -> tuple[set, set]:
    """(rows every model kept, pair keys every model has among them). Without one shared tokenization, a list row
    counts only where every model kept all its completions (`whole`: per model, its rows kept whole)."""
    rows = None
    for o, kept_whole in zip(outcomes, whole):
        mine = o.rows()
        if not same_tokens:
            mine -= set(o.lists.rows) - kept_whole  # lists this model kept only in part (their pairs too)
        rows = mine if rows is None else rows & mine
    pair_keys = None
    for o in outcomes:
        keys = {k for k, r in zip(o.pairs.keys, o.pairs.rows) if r in rows}
        pair_keys = keys if pair_keys is None else pair_keys & keys
    return rows or set(), pair_keys or set()


def compare(names: list[str], outcomes: list[Outcomes], resamples: int, seed: int, same_tokens: bool, whole: list[set]) -> dict[str, Any]:
    """The comparison of `outcomes` (one per model, on one eval set) on their common rows, as JSON-ready values."""
    rows, pair_keys = compared_rows(outcomes, same_tokens, whole)
    first = outcomes[0]
    # Every model's items are clustered and grouped by subset as the first model's are: the same resamples for all.
    common = [replace(o.only_rows(rows, pair_keys), cluster_of=first.cluster_of, subset_of=first.subset_of) for o in outcomes]
    resampling = Resampling.of(common[0], resamples, seed)
    summaries = [summarize(o, resampling) for o in common]
    metrics: dict[str, Any] = {}
    for name, estimate in summaries[0].estimates.items():
        if name.rsplit("/", 1)[-1] in BASELINES:
            continue
        entry: dict[str, Any] = {
            "values": [s.estimates[name].value if name in s.estimates else None for s in summaries],
            "intervals": [s.estimates[name].interval() if name in s.estimates else None for s in summaries],
            "differences": [None], "difference_intervals": [None],
        }
        for s in summaries[1:]:
            difference = s.estimates[name] - estimate if name in s.estimates else None
            entry["differences"].append(difference.value if difference else None)
            entry["difference_intervals"].append(difference.interval() if difference else None)
        binary = BINARY.get(name.rsplit("/", 1)[-1])
        if binary is not None:
            entry["mcnemar"] = [None] + [mcnemar_entry(common[0], o, *binary, subset_of(name)) for o in common[1:]]
        metrics[name] = entry
    baselines = {name: e.value for name, e in summaries[0].estimates.items() if name.rsplit("/", 1)[-1] in BASELINES}
    kept = [len(o.rows()) for o in outcomes]
    return {
        "models": names,
        "rows": len(rows),
        "pairs": len(pair_keys),
        "lists": len(common[0].lists),
        "rewardbench2_rows": len(common[0].rb2),
        "rows_left_out": {n: k - len(rows) for n, k in zip(names, kept)},
        "counts": summaries[0].counts,
        "worst": [s.worst for s in summaries],
        "baselines": baselines,
        "metrics": metrics,
        "bootstrap": {"resamples": resamples, "seed": seed, "clusters": resampling.clusters} if resamples else None,
    }


def subset_of(name: str) -> str | None:
    return name.split("/")[1] if name.startswith("subsets/") else None


def mcnemar_entry(first: Outcomes, other: Outcomes, table: str, column: str, subset: str | None) -> dict[str, Any]:
    """b (only the first model right), c (only the other) and the exact two-sided p-value, on the items of `subset`."""
    a, b = getattr(first, table), getattr(other, table)
    mask = torch.tensor([subset is None or first.subset_of[r] == subset for r in a.rows], dtype=torch.bool)
    first_only, other_only = discordant(a.values[column][mask], b.values[column][mask])
    return {"first_only": first_only, "other_only": other_only, "p": mcnemar_exact(first_only, other_only)}
