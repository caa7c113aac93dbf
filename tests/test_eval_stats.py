"""The numbers beside `rmtrain eval`'s accuracies, by hand on tiny cases: the cluster bootstrap, paired differences
and McNemar, the length baselines, best-of-K regret, and RewardBench 2's best-of-N and Ties formulas (every branch)."""

import math

import pytest
import torch

from rmtrain import rewardbench2
from rmtrain.compare import compare
from rmtrain.diagnostics import best_of_k, expected_top1, list_stats, longer_wins
from rmtrain.errors import DataError
from rmtrain.outcomes import Items, Outcomes, Resampling, summarize
from rmtrain.stats import Bootstrap, Estimate, cluster_numbers, mcnemar_exact, mean


def percentile(values: list[float], q: float) -> float:
    """The linear-interpolation quantile, by hand: position q * (n - 1) in the sorted values."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --------------------------------------------------------------------------------------------------
# The bootstrap


def test_bootstrap_resamples_prompts_whole_as_a_hand_computation():
    # Five pairs from three prompts: p1 has two pairs (one right, one wrong), p3 two (both right).
    prompts = ["p1", "p1", "p2", "p3", "p3"]
    outcomes = [1.0, 0.0, 1.0, 1.0, 1.0]
    cluster, stratum = cluster_numbers(prompts, [None] * 5)
    assert cluster.tolist() == [0, 0, 1, 2, 2] and stratum.tolist() == [0, 0, 0]
    boot = Bootstrap(stratum, resamples=50, seed=7)
    assert boot.counts.shape == (50, 3) and (boot.counts.sum(dim=1) == 3).all()  # three prompts drawn, with replacement
    estimate = mean(torch.tensor(outcomes), cluster, boot)
    assert estimate.value == sum(outcomes) / len(outcomes)
    # Each resample by hand: every drawn prompt brings all its pairs, as often as it was drawn.
    by_hand = []
    for counts in boot.counts.tolist():
        drawn = [o for p, o in zip(prompts, outcomes) for _ in range(int(counts[["p1", "p2", "p3"].index(p)]))]
        by_hand.append(sum(drawn) / len(drawn))
    assert estimate.samples.tolist() == pytest.approx(by_hand)
    low, high = estimate.interval()
    assert low == pytest.approx(percentile(by_hand, 0.025)) and high == pytest.approx(percentile(by_hand, 0.975))
    assert low <= estimate.value <= high
    # The same seed draws the same resamples; another seed other ones.
    again = mean(torch.tensor(outcomes), cluster, Bootstrap(stratum, resamples=50, seed=7))
    assert again.interval() == estimate.interval()
    assert not torch.equal(Bootstrap(stratum, resamples=50, seed=8).counts, boot.counts)


def test_bootstrap_draws_with_replacement_within_each_stratum():
    # Two subsets, 3 and 5 prompts: every resample keeps each subset's number of prompts, and each prompt is drawn
    # once per resample on average.
    _, stratum = cluster_numbers(list(range(8)), ["a"] * 3 + ["b"] * 5)
    boot = Bootstrap(stratum, resamples=4000, seed=0)
    assert (boot.counts[:, :3].sum(dim=1) == 3).all() and (boot.counts[:, 3:].sum(dim=1) == 5).all()
    assert boot.counts.double().mean(dim=0).tolist() == pytest.approx([1.0] * 8, abs=0.05)
    assert boot.counts.max() > 1  # with replacement


def test_large_sets_are_drawn_and_counted_in_blocks(monkeypatch):
    # Blocks of 2 resamples (8 draws over 4 prompts): each resample still draws every prompt's stratum in full, and the
    # blockwise products give what one product over all resamples gives.
    monkeypatch.setattr(Bootstrap, "DRAWS_AT_ONCE", 8)
    cluster, stratum = cluster_numbers(["a", "b", "c", "d"], ["x", "x", "y", "y"])
    boot = Bootstrap(stratum, resamples=9, seed=0)
    assert boot.counts.shape == (9, 4) and (boot.counts[:, :2].sum(dim=1) == 2).all() and (boot.counts[:, 2:].sum(dim=1) == 2).all()
    values = torch.tensor([1.0, 0.0, 1.0, 1.0])
    direct = (boot.counts.double() @ values.double()) / boot.counts.double().sum(dim=1)
    assert boot.ratio(values, torch.ones(4), cluster).tolist() == pytest.approx(direct.tolist())


def test_interval_width_is_the_binomial_one_and_counts_prompts_not_pairs():
    # 400 prompts, 60% right: the 95% interval is about 2 x 1.96 standard errors of a proportion wide.
    n, right = 400, 240
    p = right / n
    expected_width = 2 * 1.96 * math.sqrt(p * (1 - p) / n)
    outcomes = torch.tensor([1.0] * right + [0.0] * (n - right))

    def width(values: torch.Tensor, prompts: list) -> float:
        cluster, stratum = cluster_numbers(prompts, [None] * len(prompts))
        low, high = mean(values, cluster, Bootstrap(stratum, 2000, seed=1)).interval()
        return high - low

    assert width(outcomes, list(range(n))) == pytest.approx(expected_width, rel=0.1)
    # Each prompt's pair twice (two pairs per prompt, as alike as can be): still 400 prompts, the same width...
    doubled = torch.cat([outcomes, outcomes])
    assert width(doubled, list(range(n)) * 2) == pytest.approx(expected_width, rel=0.1)
    # ...while 800 independent prompts would claim an interval narrower by sqrt(2).
    assert width(doubled, list(range(2 * n))) == pytest.approx(expected_width / math.sqrt(2), rel=0.1)


def test_no_bootstrap_gives_values_without_intervals():
    estimate = mean(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 2]), None)
    assert estimate.value == 2 / 3 and estimate.samples is None and estimate.interval() is None
    assert Estimate(None).interval() is None


# --------------------------------------------------------------------------------------------------
# McNemar and paired differences


def test_mcnemar_exact_by_hand():
    # b = 10 pairs only the first model gets right, c = 3 only the second: p = 2 P[X <= 3], X ~ Bin(13, 1/2).
    assert mcnemar_exact(10, 3) == pytest.approx(2 * (1 + 13 + 78 + 286) / 2**13)
    assert mcnemar_exact(3, 10) == mcnemar_exact(10, 3)
    assert mcnemar_exact(12, 0) == pytest.approx(2 / 2**12)
    assert mcnemar_exact(5, 5) == 1.0  # capped: 2 P[X <= 5] > 1
    assert mcnemar_exact(1, 0) == 1.0
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: no evidence either way
    assert 0 < mcnemar_exact(600, 500) < 0.01  # large counts stay exact (integer arithmetic)


def pair_outcomes(correct: list[float], prompts: list[str], subsets: list[str], longer: list[float] | None = None) -> Outcomes:
    """Outcomes of a model on hand-made pairs, one row per pair."""
    rows = [(0, i) for i in range(len(correct))]
    values = {"correct": torch.tensor(correct, dtype=torch.float64),
              "longer": torch.tensor(longer if longer is not None else [0.5] * len(correct), dtype=torch.float64)}
    empty = Items([], [], {n: torch.zeros(0, dtype=torch.float64) for n in ("top1", "regret")})
    return Outcomes(Items(rows, [(0, i, 0, 1) for i in range(len(correct))], values), empty, [],
                    dict(zip(rows, prompts)), dict(zip(rows, subsets)))


def test_paired_difference_and_mcnemar_on_a_hand_made_case():
    prompts = ["p1", "p1", "p2", "p3", "p4", "p4"]
    subsets = ["x", "x", "x", "y", "y", "y"]
    first = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    second = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    result = compare(["A", "B"], [pair_outcomes(first, prompts, subsets), pair_outcomes(second, prompts, subsets)],
                     resamples=300, seed=3, same_tokens=True, whole=[set(), set()])
    accuracy = result["metrics"]["accuracy"]
    assert accuracy["values"] == pytest.approx([3 / 6, 5 / 6])
    assert accuracy["differences"][1] == pytest.approx(5 / 6 - 3 / 6)
    # Discordant pairs: only A right on pair 2; only B right on pairs 1, 3, 5.
    assert accuracy["mcnemar"][1] == {"first_only": 1, "other_only": 3, "p": pytest.approx(2 * (1 + 4) / 2**4)}
    assert result["metrics"]["subsets/y/accuracy"]["mcnemar"][1] == {"first_only": 0, "other_only": 2, "p": pytest.approx(2 * 1 / 2**2)}
    # The difference's resamples are each resample's B accuracy minus its A accuracy, on the same drawn prompts.
    resampling = Resampling.of(pair_outcomes(first, prompts, subsets), 300, 3)
    by_hand = []
    for counts in resampling.bootstrap.counts.tolist():
        weight = [counts[resampling.cluster[(0, i)]] for i in range(6)]
        by_hand.append(sum(w * (b - a) for w, a, b in zip(weight, first, second)) / sum(weight))
    low, high = accuracy["difference_intervals"][1]
    assert low == pytest.approx(percentile(by_hand, 0.025)) and high == pytest.approx(percentile(by_hand, 0.975))
    # The first model's own numbers carry no difference; subsets keep their prompts in every resample.
    assert accuracy["differences"][0] is None and accuracy["mcnemar"][0] is None
    assert result["pairs"] == 6 and result["rows_left_out"] == {"A": 0, "B": 0}


# --------------------------------------------------------------------------------------------------
# Baselines and best-of-K


def test_length_baselines_on_hand_made_pairs():
    chosen_tokens, rejected_tokens = torch.tensor([10, 5, 7, 3]), torch.tensor([5, 10, 7, 2])
    assert longer_wins(chosen_tokens, rejected_tokens).tolist() == [1.0, 0.0, 0.5, 1.0]  # equal lengths: a coin
    outcomes = pair_outcomes([1.0, 1.0, 0.0, 0.0], ["a", "b", "c", "d"], ["s", "s", "t", "t"],
                             longer=longer_wins(chosen_tokens, rejected_tokens).tolist())
    summary = summarize(outcomes, Resampling.of(outcomes, 0, 0))
    assert summary.estimates["longer_wins"].value == (1 + 0 + 0.5 + 1) / 4
    assert summary.estimates["shorter_wins"].value == (0 + 1 + 0.5 + 0) / 4
    assert summary.estimates["subsets/t/longer_wins"].value == (0.5 + 1) / 2
    assert summary.estimates["subset_mean"].value == (1.0 + 0.0) / 2
    assert summary.worst["subsets"] == "t" and summary.estimates["worst_subset"].value == 0.0


def test_list_baselines_by_hand():
    lengths, scores = [5, 9, 9, 2], [3.0, 1.0, 3.0, 0.0]
    # The two longest (9 tokens) score 1 and 3: a random pick among them hits a top score half the time.
    assert expected_top1(lengths, scores) == 1 / 2
    assert expected_top1(lengths, scores, lowest=True) == 0.0  # the shortest scores 0
    assert expected_top1([1, 1, 1, 1], scores) == 2 / 4  # all tied: random


def test_best_of_k_regret_on_a_hand_made_list():
    rewards = torch.tensor([0.1, 0.9, 0.5, 0.3])
    scores = [10.0, 4.0, 7.0, 1.0]
    # The model ranks completion 1 first (reward 0.9): score 4; best 10, mean (10 + 4 + 7 + 1) / 4 = 5.5.
    pick = best_of_k(rewards, scores)
    assert pick == {"picked": 4.0, "best": 10.0, "mean": 5.5, "regret": pytest.approx((10 - 4) / (10 - 5.5))}
    assert best_of_k(torch.tensor([0.9, 0.1, 0.5, 0.3]), scores)["regret"] == 0.0  # picks the best
    # Over lists: the mean of each list's regret (each list normalized by its own spread).
    other = (torch.tensor([0.2, 0.1]), [1.0, 3.0])  # picks 1 of (3, mean 2): regret (3 - 1) / (3 - 2) = 2
    stats = list_stats([scores, other[1]], [rewards, other[0]])
    assert stats["bestofk_regret"] == pytest.approx(((10 - 4) / (10 - 5.5) + 2) / 2)
    assert stats["bestofk_picked_score"] == (4 + 1) / 2 and stats["bestofk_best_score"] == (10 + 3) / 2


# --------------------------------------------------------------------------------------------------
# RewardBench 2


def test_best_of_n_credit_every_branch():
    assert rewardbench2.best_of_n_credit([3.0, 1.0, 2.0, 0.0]) == 1.0  # the chosen completion alone on top
    assert rewardbench2.best_of_n_credit([3.0, 3.0, 2.0, 0.0]) == 1 / 2  # tied with one rejected: shares the credit
    assert rewardbench2.best_of_n_credit([3.0, 3.0, 3.0, 3.0]) == 1 / 4
    assert rewardbench2.best_of_n_credit([1.0, 3.0, 2.0, 0.0]) == 0.0  # below the top
    assert rewardbench2.best_of_n_credit([3.0, 1.0, 1.0, 0.0]) == 1.0  # ties below the chosen one change nothing


def ties_rows(spec: list[tuple[str, int, list[float], int]]) -> tuple[list[rewardbench2.Row], list[list[float]]]:
    """(kind, prompt, rewards with the correct ones first, how many are correct) per row."""
    rows = [rewardbench2.Row(chosen, len(values), (kind, prompt)) for kind, prompt, values, chosen in spec]
    return rows, [values for _, _, values, _ in spec]


def test_ties_formula_every_branch_by_hand():
    rows, values = ties_rows([
        ("ref", 0, [2.0, 0.5, 0.0], 1), ("tied", 0, [2.0, 1.8, 1.9, 0.5, 0.0], 3),  # accurate, gap 1.3 over spread 0.2
        ("ref", 1, [2.0, 1.5, 0.0], 1), ("tied", 1, [3.0, 1.0, 1.5, 0.5], 2),  # tied: spread 2 over a gap of -0.5
        ("ref", 2, [2.0, 1.5], 1), ("tied", 2, [1.0, 1.0, 0.5], 2),  # correct answers equal: spread 0, gap 0.5
        ("ref", 3, [2.0, 2.0], 1), ("tied", 3, [1.0, 1.0, 1.0], 2),  # spread 0 and gap 0 (0 / 0); ties are not accurate
        ("ref", 4, [1.0, 2.0], 1),  # a ref row without its tied row: counts in ref accuracy only
    ])
    outcomes = rewardbench2.row_outcomes(rows, values)
    score, terms = rewardbench2.ties_score(outcomes, torch.tensor([r.ties_id[1] for r in rows]), None)
    ref_gaps = [2.0 - 0.5, 2.0 - 1.5, 2.0 - 1.5, 2.0 - 2.0, 1.0 - 2.0]
    tied_gaps = [1.8 - 0.5, 1.0 - 1.5, 1.0 - 0.5, 1.0 - 1.0]
    spreads = [2.0 - 1.8, 3.0 - 1.0, 0.0, 0.0]
    assert terms["ref_accuracy"].value == sum(g > 0 for g in ref_gaps) / 5 == 3 / 5
    assert terms["tied_accuracy"].value == sum(g > 0 for g in tied_gaps) / 4 == 2 / 4
    hardest = [min(r, t) for r, t in zip(ref_gaps, tied_gaps)]
    assert terms["correctness_preferred"].value == sum(t > s for t, s in zip(tied_gaps, spreads)) / 4 == 2 / 4
    assert terms["correctness_preferred_hard"].value == sum(h > s for h, s in zip(hardest, spreads)) / 4 == 2 / 4
    # tanh(gap / spread - 1); gap / 0 is +inf (tanh 1) for prompt 2 and NaN, set to 0, for prompt 3.
    margins = [math.tanh(hardest[0] / spreads[0] - 1), math.tanh(hardest[1] / spreads[1] - 1), 1.0, 0.0]
    assert terms["correctness_margin_score"].value == pytest.approx(sum(margins) / 4)
    expected = 0.30 * 2 / 4 + 0.30 * 3 / 5 + 0.20 * 2 / 4 + 0.20 * 2 / 4 + 0.01 * sum(margins) / 4
    assert score.value == pytest.approx(expected)
    assert rewardbench2.margin_term(-0.5, 0.0) == -1.0  # a negative gap over a zero spread: -inf, tanh -1


def test_ties_perfect_model_scores_one_point_zero_one_and_no_pair_of_rows_is_undefined():
    rows, values = ties_rows([("ref", 0, [2.0, 0.5, 0.0], 1), ("tied", 0, [2.0, 2.0, 2.0, 0.5, 0.0], 3)])
    score, _ = rewardbench2.ties_score(rewardbench2.row_outcomes(rows, values), torch.tensor([0, 0]), None)
    assert score.value == pytest.approx(0.30 + 0.30 + 0.20 + 0.20 + 0.01)  # equal correct answers: margin term 1
    rows, values = ties_rows([("ref", 0, [2.0, 0.5], 1), ("ref", 1, [2.0, 0.5], 1)])
    score, terms = rewardbench2.ties_score(rewardbench2.row_outcomes(rows, values), torch.tensor([0, 1]), None)
    assert score.value is None and terms["ref_accuracy"].value == 1.0  # the reference code gives NaN here


def test_rewardbench2_rows_become_lists_and_bad_rows_are_one_line():
    rows = [{"prompt": "Q", "chosen": ["good"], "rejected": ["bad", "worse", "awful"], "subset": "Focus", "id": "7"},
            {"prompt": "Colour?", "chosen": ["red", "blue"], "rejected": ["dog"], "subset": "Ties", "id": "tied:3"}]
    assert rewardbench2.is_rewardbench2(rows)
    assert not rewardbench2.is_rewardbench2([{"chosen": [{"role": "assistant", "content": "hi"}], "rejected": "x"}])
    lists, info = rewardbench2.as_lists(rows, "rb2.jsonl", "subset")
    assert lists[0]["completions"] == ["good", "bad", "worse", "awful"] and lists[0]["scores"] == [1.0, 0.0, 0.0, 0.0]
    assert info[1] == rewardbench2.Row(chosen=2, completions=3, ties_id=("tied", 3))
    bad = [
        ({**rows[0], "rejected": []}, "row 1: 'rejected' must be a non-empty list of completions"),
        ({**rows[1], "id": "tied-3"}, "row 1: a Ties row needs an 'id' of the form ref:N or tied:N"),
        ({**rows[1], "chosen": ["red"]}, "row 1: a 'tied' Ties row needs at least 2 chosen completions"),
    ]
    for row, message in bad:
        with pytest.raises(DataError, match=message):
            rewardbench2.as_lists([row], "rb2.jsonl", "subset")
    with pytest.raises(DataError, match="row 2: Ties id 'tied:3' is also row 1's"):
        rewardbench2.as_lists([rows[1], rows[1]], "rb2.jsonl", "subset")
