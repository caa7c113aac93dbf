"""What an ensemble's members say beyond their aggregate, for `rmtrain eval`: each member's accuracy, whether their
disagreement on a pair flags the pairs the ensemble gets wrong, how calibrated their mean is, and on graded lists the
grade of the completion each aggregate picks."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rmtrain.aggregate import Aggregate, spread
from rmtrain.diagnostics import average_ranks, best_of_k, calibration
from rmtrain.groups import Group
from rmtrain.loss import correct

# Read beside the one the user asked for: the paper's three (Coste et al. 2023, arXiv 2310.02743).
COMPARED = (Aggregate("mean"), Aggregate("min"), Aggregate("mean-std", 1.0))


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """The area under the ROC curve of `scores` for telling `positive` items from the others: the chance that a random
    positive scores above a random negative, ties counting 1/2 (Mann-Whitney U from average ranks). None when either
    class is empty."""
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if not positives or not negatives:
        return None
    ranks = average_ranks(scores.double())
    u = ranks[positive].sum().item() - positives * (positives + 1) / 2
    return u / (positives * negatives)


def member_margins(groups: Sequence[Group], heads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Every pair's margin r_better - r_worse for each member: [pairs, members], in `pair_values`' order."""
    margins = [h[better] - h[worse] for g, h in zip(groups, heads) for better, worse in g.pairs]
    return torch.stack(margins) if margins else torch.zeros(0, heads[0].shape[-1] if heads else 1)


def ensemble_stats(groups: Sequence[Group], heads: Sequence[torch.Tensor], chosen: Aggregate) -> dict[str, Any]:
    """For an ensemble (each group's rewards [completions, members], members > 1): `member_accuracy` (each member
    alone) and their mean; per aggregate (mean, min, mean-std:1 and `chosen`) its accuracy and, on graded lists, the
    mean score of the completion it ranks first; `spread_auroc`: how well the members' spread on a pair (the standard
    deviation of their margins) tells the pairs the ensemble's mean gets wrong from the others (0.5: not at all);
    `mean_ece`: the expected calibration error of sigmoid(mean margin)."""
    margins = member_margins(groups, heads)
    members = margins.shape[-1]
    zero = torch.zeros(())
    member_accuracy = [correct(margins[:, k], zero).double().mean().item() for k in range(members)]
    lists = [(g.scores, h) for g, h in zip(groups, heads) if g.scores is not None]
    aggregates: dict[str, dict[str, float]] = {}
    for aggregate in dict.fromkeys((*COMPARED, chosen)):
        # A pair's aggregate margin is the aggregate's reward of the better minus that of the worse.
        entry = {"accuracy": _pair_accuracy(groups, heads, aggregate)}
        if lists:
            entry["bestofk_picked_score"] = sum(best_of_k(aggregate(h), s)["picked"] for s, h in lists) / len(lists)
        aggregates[str(aggregate)] = entry
    mean_margin = margins.mean(-1)
    return {
        "members": members,
        "member_accuracy": member_accuracy,
        "mean_member_accuracy": sum(member_accuracy) / members,
        "aggregates": aggregates,
        "spread_auroc": auroc(spread(margins), ~correct(mean_margin, zero)),
        "mean_ece": calibration(mean_margin)["ece"],
    }


def _pair_accuracy(groups: Sequence[Group], heads: Sequence[torch.Tensor], aggregate: Aggregate) -> float | None:
    margins = member_margins(groups, [aggregate(h)[:, None] for h in heads])[:, 0]
    return correct(margins, torch.zeros(())).double().mean().item() if margins.numel() else None
