"""What one model got right on one eval set, item by item (pairs, ranked lists, RewardBench 2 rows), and every
accuracy `rmtrain eval` reports as an estimate with its bootstrap interval (`summarize`): one model's on the rows it
kept, and each of several models' on the rows they all kept (rmtrain.compare), with the same resamples.

Items are clustered by prompt, the unit the bootstrap resamples: a row's explicit `prompt`, else its completions'
shared token prefix (the conversation before the responses, for implicit-prompt pairs such as Anthropic HH); a
RewardBench 2 Ties row by its prompt number, so its ref and tied rows move together. Every pair of a prompt, and a
ranked list as a whole, are then drawn or left out together. Strata are subsets: every resample keeps each subset's
number of prompts, so the per-subset scores, their mean and the worst are defined in every resample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Hashable

import torch

from rmtrain import rewardbench2
from rmtrain.diagnostics import REWARDBENCH_SECTIONS, best_of_k, expected_top1, longer_wins, top1_correct
from rmtrain.groups import Group
from rmtrain.loss import correct
from rmtrain.stats import Bootstrap, Estimate, cluster_numbers, mean, weighted_mean, worst

RowKey = tuple[int, int]
"""(source, row): a row of an eval set, the same for every model."""


@dataclass
class Items:
    """Items of one kind (pairs or lists), each with its row and its identity across models, and per-item values."""

    rows: list[RowKey]
    keys: list[tuple]
    values: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.keys)

    def only(self, keys: set[tuple]) -> "Items":
        """The items whose key is in `keys`, in key order (so that several models' items line up)."""
        order = sorted((k, i) for i, k in enumerate(self.keys) if k in keys)
        index = torch.tensor([i for _, i in order], dtype=torch.long)
        return Items([self.rows[i] for _, i in order], [k for k, _ in order], {n: v[index] for n, v in self.values.items()})


@dataclass
class Outcomes:
    """One model on one eval set."""

    pairs: Items
    """correct (0/1), longer (what "the longer wins" scores, `longer_wins`)."""
    lists: Items
    """Ranked lists with scores: top1, top1_longest, top1_shortest, top1_random, picked, best, mean, regret,
    longest_regret."""
    rb2: list[tuple[RowKey, rewardbench2.Row, list[float], list[int]]]
    """RewardBench 2 rows every completion of which was kept: (row, row info, rewards, response tokens)."""
    cluster_of: dict[RowKey, Hashable]
    subset_of: dict[RowKey, str] | None
    rb2_rows_read: int = 0

    def rows(self) -> set[RowKey]:
        """Every row with an item: a pair, a list or a RewardBench 2 row."""
        return set(self.pairs.rows) | set(self.lists.rows) | {item[0] for item in self.rb2}

    def only_rows(self, rows: set[RowKey], pair_keys: set[tuple]) -> "Outcomes":
        """The items of `rows` (pairs: of `pair_keys`), in the same order for every model."""
        lists = self.lists.only({k for k in self.lists.keys if k in rows})
        rb2 = sorted((item for item in self.rb2 if item[0] in rows), key=lambda item: item[0])
        return replace(self, pairs=self.pairs.only(pair_keys), lists=lists, rb2=rb2)


def prompt_key(group: Group, row: dict[str, Any] | None, info: rewardbench2.Row | None) -> Hashable:
    """What clusters a row's items: its Ties prompt number, its explicit prompt, or its completions' shared prefix."""
    if info is not None and info.ties_id is not None:
        return ("ties", info.ties_id[1])
    if row is not None and row.get("prompt") is not None:
        return ("prompt", json.dumps(row["prompt"], sort_keys=True, ensure_ascii=False))
    return ("prefix", tuple(group.prefix))


def outcomes_of(per_pair: dict[str, Any], groups: list[Group], rows: list[dict[str, Any]], subset_of: dict[int, str] | None,
                rb2_rows: list[rewardbench2.Row] | None = None) -> Outcomes:
    """Item tables from `evaluate_pairs`' per-pair values and per-group rewards (`subset_of`: each row's subset)."""
    row_of = [(int(s), int(r)) for s, r in zip(per_pair["source"].tolist(), per_pair["row"].tolist())]
    pairs = Items(
        rows=row_of,
        keys=[(s, r, int(b), int(w)) for (s, r), b, w in zip(row_of, per_pair["better"].tolist(), per_pair["worse"].tolist())],
        values={"correct": correct(per_pair["chosen"], per_pair["rejected"]).double(),
                "longer": longer_wins(per_pair["chosen_tokens"], per_pair["rejected_tokens"])},
    )
    list_rows, list_values = [], []
    rb2 = []
    for g, rewards in zip(groups, per_pair["group_rewards"]):
        key = (g.source, g.row)
        info = rb2_rows[g.row] if rb2_rows is not None else None
        lengths = [len(c) for c in g.completions]
        if info is not None and len(g.completions) == info.completions:
            rb2.append((key, info, rewards.tolist(), lengths))
        if g.scores is None:
            continue
        pick = best_of_k(rewards, g.scores)
        longest = [s for n, s in zip(lengths, g.scores) if n == max(lengths)]
        list_rows.append(key)
        list_values.append([
            float(top1_correct(rewards, g.scores)), expected_top1(lengths, g.scores), expected_top1(lengths, g.scores, lowest=True),
            sum(s == pick["best"] for s in g.scores) / len(g.scores), pick["picked"], pick["best"], pick["mean"], pick["regret"],
            (pick["best"] - sum(longest) / len(longest)) / (pick["best"] - pick["mean"]),
        ])
    names = ["top1", "top1_longest", "top1_shortest", "top1_random", "picked", "best", "mean", "regret", "longest_regret"]
    table = torch.tensor(list_values, dtype=torch.float64).reshape(len(list_values), len(names))
    lists = Items(list_rows, list(list_rows), {n: table[:, i] for i, n in enumerate(names)})
    cluster_of = {(g.source, g.row): prompt_key(g, rows[g.row] if rows else None, rb2_rows[g.row] if rb2_rows else None) for g in groups}
    subsets = {(g.source, g.row): subset_of[g.row] for g in groups} if subset_of is not None else None
    return Outcomes(pairs, lists, rb2, cluster_of, subsets, len(rb2_rows) if rb2_rows is not None else 0)


# --------------------------------------------------------------------------------------------------
# Estimates


@dataclass
class Resampling:
    """The clusters of a set of rows and their bootstrap (None: --bootstrap 0)."""

    cluster: dict[RowKey, int]
    bootstrap: Bootstrap | None
    clusters: int = 0
    seconds: float = 0.0

    @classmethod
    def of(cls, outcomes: Outcomes, resamples: int, seed: int) -> "Resampling":
        """Clusters of every row the outcomes hold (in row order), stratified by subset."""
        rows = sorted(outcomes.rows())
        subset = outcomes.subset_of or {}
        numbers, stratum = cluster_numbers([outcomes.cluster_of[r] for r in rows], [subset.get(r) for r in rows])
        bootstrap = Bootstrap(stratum, resamples, seed) if resamples else None
        return cls(dict(zip(rows, numbers.tolist())), bootstrap, int(stratum.numel()))

    def of_rows(self, rows: list[RowKey]) -> torch.Tensor:
        return torch.tensor([self.cluster[r] for r in rows], dtype=torch.long)


@dataclass
class Summary:
    """Every estimate of one model on one set of rows, flat: "accuracy", "subsets/NAME/accuracy", "top1_accuracy",
    "rewardbench2/subsets/NAME/score", ...; `counts` the items behind them, `worst` which subset is the worst."""

    estimates: dict[str, Estimate] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    worst: dict[str, str] = field(default_factory=dict)
    ties_terms: dict[str, dict[str, Estimate]] = field(default_factory=dict)


PAIR_VALUES = {"accuracy": "correct", "longer_wins": "longer"}
LIST_VALUES = {"top1_accuracy": "top1", "top1_longest": "top1_longest", "top1_shortest": "top1_shortest", "top1_random": "top1_random",
               "bestofk_picked_score": "picked", "bestofk_best_score": "best", "bestofk_mean_score": "mean",
               "bestofk_regret": "regret", "bestofk_longest_regret": "longest_regret"}


def summarize(outcomes: Outcomes, resampling: Resampling) -> Summary:
    """Every reported number as an estimate: over all items and per subset, pairs (accuracy and the length
    baselines), lists (top-1 and its baselines, best-of-K) and RewardBench 2 rows; the mean of the subsets, the worst
    subset, RewardBench v1 sections."""
    summary = Summary()
    boot = resampling.bootstrap
    subset_names = list(dict.fromkeys(outcomes.subset_of.values())) if outcomes.subset_of is not None else []
    scopes = [("", None)] + [(f"subsets/{name}/", name) for name in subset_names]
    for table, values, count in ((outcomes.pairs, PAIR_VALUES, "pairs"), (outcomes.lists, LIST_VALUES, "lists")):
        if not len(table):
            continue
        cluster = resampling.of_rows(table.rows)
        for prefix, name in scopes:
            where = None if name is None else torch.tensor([outcomes.subset_of[r] == name for r in table.rows])
            if where is not None and not bool(where.any()):
                continue
            summary.counts[prefix + count] = len(table) if where is None else int(where.sum())
            for metric, column in values.items():
                summary.estimates[prefix + metric] = mean(table.values[column], cluster, boot, where)
            if count == "pairs":
                summary.estimates[prefix + "shorter_wins"] = mean(1 - table.values["longer"], cluster, boot, where)
    accuracy = {name: summary.estimates[f"subsets/{name}/accuracy"] for name in subset_names if f"subsets/{name}/accuracy" in summary.estimates}
    if accuracy:
        names = list(accuracy)
        summary.estimates["subset_mean"] = weighted_mean([accuracy[n] for n in names], [1.0] * len(names))
        index, summary.estimates["worst_subset"] = worst([accuracy[n] for n in names])
        summary.worst["subsets"] = names[index]
        sections = {}
        for section, weights in REWARDBENCH_SECTIONS.items():
            present = [s for s in weights if s in accuracy]
            if present:
                sections[section] = weighted_mean([accuracy[s] for s in present], [weights[s] for s in present])
                summary.estimates[f"sections/{section}"] = sections[section]
        if set(sections) == set(REWARDBENCH_SECTIONS):
            summary.estimates["rewardbench_score"] = weighted_mean(list(sections.values()), [1.0] * len(sections))
    if outcomes.rb2_rows_read:
        summarize_rewardbench2(outcomes, resampling, summary)
    return summary


def summarize_rewardbench2(outcomes: Outcomes, resampling: Resampling, summary: Summary) -> None:
    """Per subset, the RewardBench 2 score of the model and of the rulers "the longest wins" and "the shortest wins"
    (the same formula with token counts in place of rewards), and chance (the mean of 1/n, best-of-N subsets only);
    the overall score (the mean of the subsets' scores) and the worst subset."""
    subset_of = outcomes.subset_of or {}
    by_subset: dict[str | None, list] = {}
    for item in outcomes.rb2:
        by_subset.setdefault(subset_of.get(item[0]), []).append(item)
    scores = {}
    for name, items in by_subset.items():
        label = name if name is not None else "all"
        prefix = f"rewardbench2/subsets/{label}/"
        rows = [info for _, info, _, _ in items]
        cluster = resampling.of_rows([key for key, _, _, _ in items])
        is_ties = name is not None and name.lower() == rewardbench2.TIES
        summary.counts[prefix + "rows"] = len(items)
        for metric, values in (("score", [r for _, _, r, _ in items]), ("longest", [n for _, _, _, n in items]),
                               ("shortest", [[-x for x in n] for _, _, _, n in items])):
            row_outcomes = rewardbench2.row_outcomes(rows, values)
            if is_ties:
                estimate, terms = rewardbench2.ties_score(row_outcomes, cluster, resampling.bootstrap)
                if metric == "score":
                    summary.ties_terms[label] = terms
            else:
                estimate = mean(row_outcomes.credit, cluster, resampling.bootstrap)
            summary.estimates[prefix + metric] = estimate
        if not is_ties:
            summary.estimates[prefix + "chance"] = Estimate(sum(1 / info.completions for info in rows) / len(rows))
        scores[label] = summary.estimates[prefix + "score"]
    defined = [label for label, e in scores.items() if e.value is not None]
    if defined:
        summary.estimates["rewardbench2/score"] = weighted_mean([scores[n] for n in defined], [1.0] * len(defined))
        index, summary.estimates["rewardbench2/worst_subset"] = worst([scores[n] for n in defined])
        summary.worst["rewardbench2"] = defined[index]
    summary.counts["rewardbench2/rows"] = len(outcomes.rb2)
