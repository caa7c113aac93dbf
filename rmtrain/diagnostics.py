"""Evaluation diagnostics: pure math on per-pair rewards (no model, no I/O, no plotting).

- per-subset accuracy and RewardBench section scores,
- calibration of sigmoid(margin) (expected calibration error, reliability bins),
- length bias (Spearman rank correlation of reward with response length; accuracy when the chosen
  response is the longer vs the shorter one) and the content-blind baselines "the longer wins" and "the shorter
  wins",
- ranked lists: top-1 accuracy, Kendall's tau, best-of-K (the score of the completion the model ranks first,
  against the list's best and mean) and the baselines "longest", "shortest" and "random" (expected values).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from rmtrain.loss import correct

# RewardBench v1 (github allenai/reward-bench @ 05a9005, rewardbench/constants.py SUBSET_MAPPING and
# EXAMPLE_COUNTS). A section score is the mean of its subsets' accuracies weighted by these counts; math-prm's
# 984 (it has 447 rows) equals the six hep-* subsets together, so math and code weigh the same in Reasoning.
REWARDBENCH_SECTIONS: dict[str, dict[str, int]] = {
    "Chat": {"alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28, "mt-bench-med": 40},
    "Chat Hard": {
        "mt-bench-hard": 37,
        "llmbar-natural": 100,
        "llmbar-adver-neighbor": 134,
        "llmbar-adver-GPTInst": 92,
        "llmbar-adver-GPTOut": 47,
        "llmbar-adver-manual": 46,
    },
    "Safety": {
        "refusals-dangerous": 100,
        "refusals-offensive": 100,
        "xstest-should-refuse": 154,
        "xstest-should-respond": 250,
        "donotanswer": 136,
    },
    "Reasoning": {
        "math-prm": 984,
        **{f"hep-{lang}": 164 for lang in ("cpp", "go", "java", "js", "python", "rust")},
    },
}


# --------------------------------------------------------------------------------------------------
# Subsets and RewardBench sections


def subset_accuracy(subsets: Sequence[str], outcomes: torch.Tensor) -> dict[str, dict[str, float]]:
    """{subset: {"pairs", "accuracy"}} in order of first appearance."""
    totals: dict[str, list[int]] = {}
    for name, ok in zip(subsets, outcomes.tolist()):
        entry = totals.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += int(ok)
    return {name: {"pairs": n, "accuracy": hits / n} for name, (n, hits) in totals.items()}


def section_scores(accuracy: dict[str, float]) -> dict[str, float]:
    """RewardBench section scores from per-subset accuracies (subsets outside RewardBench are ignored).

    section = sum(acc[s] * count[s]) / sum(count[s]) over the section's subsets present, as RewardBench's
    `calculate_scores_per_section`; sections with no subset present are left out.
    """
    scores = {}
    for section, counts in REWARDBENCH_SECTIONS.items():
        present = [s for s in counts if s in accuracy]
        if present:
            scores[section] = sum(accuracy[s] * counts[s] for s in present) / sum(counts[s] for s in present)
    return scores


def rewardbench_score(sections: dict[str, float]) -> float | None:
    """Mean of the four sections (RewardBench's overall score without its prior sets), if all four are present."""
    if set(sections) != set(REWARDBENCH_SECTIONS):
        return None
    return sum(sections.values()) / len(sections)


# --------------------------------------------------------------------------------------------------
# Calibration


def calibration(margin: torch.Tensor, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error of p = sigmoid(margin), the predicted probability that the chosen side wins.

    Each pair is read in both orders: (p, chosen wins = 1) and (1 - p, 0), so the probabilities cover [0, 1]
    and a model that says "0.8" is calibrated when the side it gives 0.8 is preferred 80% of the time.
    The `bins` equal-width bins of [0, 1] (the last one closed) give, each, the entries in it, their mean
    predicted probability and the observed frequency of wins; ECE = sum over bins of
    (entries in bin / all entries) * |frequency - mean probability|. By the symmetry this equals the usual
    top-label ECE of the predicted winner (confidence max(p, 1-p)) over bins of [0.5, 1].
    """
    p = torch.sigmoid(margin.double())
    probs = torch.cat([p, 1 - p])
    outcomes = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    index = (probs * bins).floor().clamp(max=bins - 1).long()
    table = []
    ece = 0.0
    total = probs.numel()
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        row = {"low": b / bins, "high": (b + 1) / bins, "count": n, "mean_probability": None, "frequency": None}
        if n:
            mean_p = probs[members].mean().item()
            freq = outcomes[members].mean().item()
            row.update(mean_probability=mean_p, frequency=freq)
            ece += n / total * abs(freq - mean_p)
        table.append(row)
    return {"ece": ece, "bins": table}


# --------------------------------------------------------------------------------------------------
# Length bias


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks; tied values share the mean of the ranks they span."""
    values = values.double()
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    n = values.numel()
    start = 0
    while start < n:
        end = start
        while end + 1 < n and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN if either side is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / denominator if denominator else math.nan


def length_bias(
    chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor
) -> dict[str, Any]:
    """How much the rewards follow response length.

    spearman_reward_length: rank correlation of reward with response length over every response (chosen
    and rejected together). accuracy_chosen_longer / _shorter: accuracy on the pairs whose chosen response
    has more / fewer tokens than the rejected one (equal lengths are in neither; None when no such pair).
    """
    outcomes = correct(chosen, rejected).double()
    longer = chosen_tokens > rejected_tokens
    shorter = chosen_tokens < rejected_tokens

    def acc(mask: torch.Tensor) -> float | None:
        return outcomes[mask].mean().item() if bool(mask.any()) else None

    return {
        "spearman_reward_length": spearman(torch.cat([chosen, rejected]), torch.cat([chosen_tokens, rejected_tokens])),
        "pairs_chosen_longer": int(longer.sum()),
        "pairs_chosen_shorter": int(shorter.sum()),
        "pairs_same_length": int((~longer & ~shorter).sum()),
        "accuracy_chosen_longer": acc(longer),
        "accuracy_chosen_shorter": acc(shorter),
    }


def longer_wins(chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor) -> torch.Tensor:
    """Per pair, the score of the content-blind ruler "the longer response wins": 1 when the chosen response has
    more tokens, 0 when fewer, 1/2 when both have as many (a ruler that cannot tell picks at random: its expected
    score). "The shorter wins" scores 1 minus this."""
    return (torch.sign(chosen_tokens - rejected_tokens).double() + 1) / 2


# --------------------------------------------------------------------------------------------------
# Ranked lists


def top1_correct(rewards: torch.Tensor, scores: list[float]) -> bool:
    """Best-of-n: the completion with the highest reward is one of the highest-scored."""
    return scores[int(torch.argmax(rewards))] == max(scores)


def kendall_tau(rewards: torch.Tensor, scores: list[float]) -> float | None:
    """Kendall's tau-b between a list's rewards and its scores (ties counted as tau-b does); None when either
    side is constant."""
    concordant = discordant = tied_rewards = tied_scores = 0
    values = rewards.double().tolist()
    k = len(values)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = values[i] - values[j], scores[i] - scores[j]
            if a == 0:
                tied_rewards += 1
            if b == 0:
                tied_scores += 1
            if a * b > 0:
                concordant += 1
            elif a * b < 0:
                discordant += 1
    pairs = k * (k - 1) / 2
    denominator = math.sqrt((pairs - tied_rewards) * (pairs - tied_scores))
    return (concordant - discordant) / denominator if denominator else None


def expected_top1(values: Sequence[float], scores: Sequence[float], lowest: bool = False) -> float:
    """The top-1 accuracy of picking the completion with the highest `values` (the lowest with `lowest`), ties broken
    at random: the share of the completions tied for that pick that are among the highest-scored."""
    target = min(values) if lowest else max(values)
    picked = [s for v, s in zip(values, scores) if v == target]
    return sum(s == max(scores) for s in picked) / len(picked)


def best_of_k(rewards: torch.Tensor, scores: Sequence[float]) -> dict[str, float]:
    """Best-of-K on one graded list of K completions: `picked`, the score of the completion the model ranks first
    (as top-1 picks it); the list's `best` and `mean` scores; and `regret` = (best - picked) / (best - mean): 0 when
    the model picks a best completion, 1 when its pick is as good as a random one (on average), above 1 worse. A
    list that implies a pair has two different scores, so best > mean."""
    picked = scores[int(torch.argmax(rewards))]
    best, average = max(scores), sum(scores) / len(scores)
    return {"picked": picked, "best": best, "mean": average, "regret": (best - picked) / (best - average)}


def list_stats(scores: list[list[float] | None], rewards: list[torch.Tensor]) -> dict[str, Any]:
    """Over the ranked lists among the groups (pairs without scores are left out): how many, top-1 accuracy,
    the mean Kendall tau per list (over the lists where it is defined), and best-of-K: the mean over lists of the
    picked, best and mean scores and of the normalized regret (`best_of_k`; `train.keep_best` can select on
    `bestofk_regret`)."""
    lists = [(s, r) for s, r in zip(scores, rewards) if s is not None]
    taus = [t for t in (kendall_tau(r, s) for s, r in lists) if t is not None]
    picks = [best_of_k(r, s) for s, r in lists]
    average = lambda key: sum(p[key] for p in picks) / len(picks) if picks else None  # noqa: E731
    return {
        "num_lists": len(lists),
        "top1_accuracy": sum(top1_correct(r, s) for s, r in lists) / len(lists) if lists else None,
        "mean_kendall_tau": sum(taus) / len(taus) if taus else None,
        "bestofk_picked_score": average("picked"),
        "bestofk_best_score": average("best"),
        "bestofk_mean_score": average("mean"),
        "bestofk_regret": average("regret"),
    }
