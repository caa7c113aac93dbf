"""RewardBench 2 (allenai/reward-bench-2): its rows, and its scores as the reference code computes them
(allenai/reward-bench @ a0096928, rewardbench/utils.py; scripts/run_v2.py @ 0016644; docs/eval.md cites them line by
line).

A row holds `chosen` and `rejected` as lists of completions (one chosen and three rejected outside Ties), a `subset`
and, in Ties, an `id` "ref:N" or "tied:N". Every subset but Ties is scored best-of-N: a row scores 1/k when its first
chosen completion has the highest reward and k completions share that reward, else 0 (ties at the top share the
credit); the subset's score is the mean over its rows. Ties is scored by its own formula over prompts (`ties_score`).
The overall score is the unweighted mean of the subsets' scores, as the leaderboard averages its six subsets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rmtrain.errors import DataError
from rmtrain.stats import Bootstrap, Estimate, combine, mean

TIES = "ties"
"""The subset scored by its own formula; matched without case, as run_v2.py's `subset.lower() == "ties"`."""

TIES_WEIGHTS = {"tied_accuracy": 0.30, "ref_accuracy": 0.30, "correctness_preferred": 0.20, "correctness_preferred_hard": 0.20,
                "correctness_margin_score": 0.01}
"""`process_single_model`'s weights; they add up to 1.01 (a perfect model scores about 1.01 on Ties)."""


def is_rewardbench2(rows: list[dict[str, Any]]) -> bool:
    """The file's first row with a non-empty `chosen` list holds completions (strings or message lists), not messages:
    RewardBench 2's shape. A conversational pair's `chosen` is a list of message objects."""
    for row in rows:
        chosen = row.get("chosen")
        if isinstance(chosen, list) and chosen:
            return not isinstance(chosen[0], dict)
    return False


@dataclass
class Row:
    """What scoring needs of a RewardBench 2 row besides its rewards."""

    chosen: int
    """How many of its completions are chosen (they come first, as `load_bon_dataset_v2` unrolls them)."""
    completions: int
    ties_id: tuple[str, int] | None = None
    """In Ties: ("ref" or "tied", the prompt number)."""


def as_lists(rows: list[dict[str, Any]], name: str, subset_field: str | None) -> tuple[list[dict[str, Any]], list[Row]]:
    """RewardBench 2 rows as ranked lists (completions = chosen + rejected, scores 1 for chosen and 0 for rejected, so
    the pairs they imply are every chosen over every rejected) and what scoring needs of each. A row of another shape,
    an empty side, or a Ties row without a usable id is a one-line error naming the row."""
    lists, info, seen = [], [], {}
    for index, row in enumerate(rows):
        where = f"{name}: row {index + 1}"
        chosen, rejected = row.get("chosen"), row.get("rejected")
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, list) or not value or any(isinstance(v, dict) for v in value):
                got = "an empty list" if value == [] else type(value).__name__ if not isinstance(value, list) else "a message list"
                raise DataError(f"{where}: '{key}' must be a non-empty list of completions, as in every row of a RewardBench 2 "
                                f"file, got {got}")
        ties_id = None
        if subset_field is not None and str(row.get(subset_field, "")).lower() == TIES:
            ties_id = _ties_id(row.get("id"), where)
            if ties_id in seen:
                raise DataError(f"{where}: Ties id '{row['id']}' is also row {seen[ties_id] + 1}'s; each ref:N and tied:N once")
            seen[ties_id] = index
            if ties_id[0] == "tied" and len(chosen) < 2:
                raise DataError(f"{where}: a 'tied' Ties row needs at least 2 chosen completions (the spread between "
                                f"correct answers), got {len(chosen)}")
        converted = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
        converted |= {"completions": chosen + rejected, "scores": [1.0] * len(chosen) + [0.0] * len(rejected)}
        lists.append(converted)
        info.append(Row(len(chosen), len(chosen) + len(rejected), ties_id))
    return lists, info


def _ties_id(value: Any, where: str) -> tuple[str, int]:
    """`process_single_model` reads `sample["id"].split(":")`: "ref:N" (one correct answer) or "tied:N" (several)."""
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 2 or parts[0] not in ("ref", "tied") or not parts[1].strip().lstrip("-").isdigit():
        raise DataError(f"{where}: a Ties row needs an 'id' of the form ref:N or tied:N (RewardBench 2), got {value!r}")
    return parts[0], int(parts[1])


# --------------------------------------------------------------------------------------------------
# Scores of one row


def best_of_n_credit(values: Sequence[float]) -> float:
    """`reroll_and_score_dataset`: `1 / np.sum(scores == max_val)` if `scores[0] == max_val` else 0, with `scores` the
    row's rewards, chosen first."""
    top = max(values)
    return 1 / sum(v == top for v in values) if values[0] == top else 0.0


def prompt_stats(values: Sequence[float], chosen: int) -> tuple[bool, float | None, float]:
    """`_compute_prompt_stats`: (accurate: every correct answer outscores the best wrong one, strictly; the spread
    between the best and worst correct answers, None with one correct answer; the gap between the worst correct
    and the best wrong answer)."""
    correct, incorrect = values[:chosen], values[chosen:]
    gap = min(correct) - max(incorrect)
    spread = max(correct) - min(correct) if len(correct) > 1 else None
    return gap > 0, spread, gap


def margin_term(gap: float, spread: float) -> float:
    """`np.nan_to_num(np.tanh(gap / spread - 1), nan=0.0)` for one prompt, with numpy's division by zero: a zero
    spread gives +-inf (tanh +-1) for a nonzero gap and NaN (then 0) for a zero gap."""
    if spread == 0:
        return 0.0 if gap == 0 else math.copysign(1.0, gap)
    return math.tanh(gap / spread - 1)


# --------------------------------------------------------------------------------------------------
# Scores of a subset and of the whole


@dataclass
class Outcomes:
    """Per row of one subset: its best-of-N credit and, in Ties, its prompt statistics."""

    credit: torch.Tensor
    kind: list[str | None]
    """"ref" or "tied" in Ties, else None."""
    prompt: list[int | None]
    accurate: torch.Tensor
    spread: torch.Tensor
    """NaN where undefined (one correct answer)."""
    gap: torch.Tensor


def row_outcomes(rows: list[Row], values: list[Sequence[float]]) -> Outcomes:
    """Each row's outcomes from its completions' values (rewards; or token counts, for the length baselines)."""
    stats = [prompt_stats(v, r.chosen) for r, v in zip(rows, values)]
    return Outcomes(
        credit=torch.tensor([best_of_n_credit(v) for v in values], dtype=torch.float64),
        kind=[r.ties_id[0] if r.ties_id else None for r in rows],
        prompt=[r.ties_id[1] if r.ties_id else None for r in rows],
        accurate=torch.tensor([float(a) for a, _, _ in stats], dtype=torch.float64),
        spread=torch.tensor([math.nan if s is None else s for _, s, _ in stats], dtype=torch.float64),
        gap=torch.tensor([g for _, _, g in stats], dtype=torch.float64),
    )


def ties_score(outcomes: Outcomes, cluster: torch.Tensor, bootstrap: Bootstrap | None) -> tuple[Estimate, dict[str, Estimate]]:
    """`process_single_model`, over the rows given (their clusters are their prompt numbers, so a prompt's ref and tied
    rows are resampled together):

        ref_accuracy   mean over ref prompts of `accurate`;    tied_accuracy  the same over tied prompts
        over the prompts P with both a ref and a tied row (`all_prompts = set(ref_stats) & set(tied_stats)`):
        correctness_preferred       mean of [gap_tied > spread_tied]
        correctness_preferred_hard  mean of [min(gap_ref, gap_tied) > spread_tied]
        correctness_margin_score    mean of tanh(min(gap_ref, gap_tied) / spread_tied - 1), NaN set to 0
        score = 0.30 tied_accuracy + 0.30 ref_accuracy + 0.20 preferred + 0.20 preferred_hard + 0.01 margin_score

    The reference returns NaN when P is empty (np.mean of an empty array); here the score is then undefined (None).
    Each term is an item mean, carried by the tied row of each prompt in P."""
    ref = torch.tensor([k == "ref" for k in outcomes.kind])
    tied = torch.tensor([k == "tied" for k in outcomes.kind])
    ref_gap = {p: float(g) for k, p, g in zip(outcomes.kind, outcomes.prompt, outcomes.gap) if k == "ref"}
    in_both = torch.tensor([k == "tied" and p in ref_gap for k, p in zip(outcomes.kind, outcomes.prompt)])
    preferred, hard, margin = (torch.zeros(len(outcomes.kind), dtype=torch.float64) for _ in range(3))
    for i in torch.nonzero(in_both).flatten().tolist():
        gap, spread = float(outcomes.gap[i]), float(outcomes.spread[i])
        hardest = min(ref_gap[outcomes.prompt[i]], gap)
        preferred[i], hard[i], margin[i] = float(gap > spread), float(hardest > spread), margin_term(hardest, spread)
    terms = {
        "tied_accuracy": mean(outcomes.accurate, cluster, bootstrap, tied),
        "ref_accuracy": mean(outcomes.accurate, cluster, bootstrap, ref),
        "correctness_preferred": mean(preferred, cluster, bootstrap, in_both),
        "correctness_preferred_hard": mean(hard, cluster, bootstrap, in_both),
        "correctness_margin_score": mean(margin, cluster, bootstrap, in_both),
    }
    names = list(TIES_WEIGHTS)
    score = combine(lambda *xs: sum(TIES_WEIGHTS[n] * x for n, x in zip(names, xs)), *(terms[n] for n in names))
    return score, terms

