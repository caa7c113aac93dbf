"""A recipe's data: the rows of every source of `data.train` and `data.eval` (read and checked before a model loads),
tokenized into groups, mixed by weight, with `data.eval_fraction` held out; and a finished run's eval set, as the run
drew it (`rmtrain eval` and `rmtrain export` read it from here)."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rmtrain.config import DataConfig, DataSource, sources
from rmtrain.errors import DataError
from rmtrain.groups import Group, Preflight, tokenize_rows
from rmtrain.rows import check_rows
from rmtrain.sources import read_rows
from rmtrain.tokenizer import TokenFormat


@dataclass
class Split:
    """The rows of one source of data.train or data.eval, read and checked."""

    rows: list[dict[str, Any]]
    name: str
    source: DataSource


def read_splits(data: DataConfig) -> dict[str, list[Split]]:
    """The rows of every source of data.train and data.eval, read and checked as far as possible without a
    tokenizer, so that a bad file fails before a model is loaded."""
    splits: dict[str, list[Split]] = {}
    for split in ("train", "eval"):
        for source in sources(data, split):
            rows, name = read_rows(source)
            if not rows:
                raise DataError(f"{split} ({name}): no rows to read; check data.{split}.path, where, skip and limit")
            check_rows(rows, name, source.skip)
            splits.setdefault(split, []).append(Split(rows, name, source))
    return splits


def source_labels(parts: list[Split]) -> list[str]:
    """Short names for a split's sources (file stems; a repeated stem gets its index), as metrics and trackers
    name them: `eval/by_source/hh_harmless_test/accuracy`."""
    stems = [Path(part.source.path).stem or part.name for part in parts]
    return [stem if stems.count(stem) == 1 else f"{stem}.{i}" for i, stem in enumerate(stems)]


def tokenize_split(part: Split, index: int, label: str, tokenizer, fmt: TokenFormat, data: DataConfig) -> tuple[list[Group], Preflight]:
    groups, stats = tokenize_rows(part.rows, part.name, tokenizer, fmt, data.max_length, data.truncation, data.num_proc, part.source.skip)
    for g in groups:
        g.source = index
    stats.name = f"{label} ({part.name})" + (f", weight {part.source.weight:g}" if part.source.weight != 1 else "")
    return groups, stats


def mix(parts: list[list[Group]], weights: list[float], seed: int) -> list[Group]:
    """Every source's groups drawn `weight` times: whole copies for the integer part, a seeded random share of
    them for the rest (0.5: a random half). Each drawn group gets its own uid."""
    rng = random.Random(seed)
    drawn: list[Group] = []
    for groups, weight in zip(parts, weights):
        copies, rest = int(weight), weight - int(weight)
        drawn.extend(g for _ in range(copies) for g in groups)
        drawn.extend(rng.sample(groups, round(rest * len(groups))) if rest else [])
    return [replace(g, uid=i) for i, g in enumerate(drawn)]


def load_groups(
    data: DataConfig, tokenizer, fmt: TokenFormat, seed: int, splits: dict | None = None
) -> tuple[list[Group], list[Group] | None, list[Preflight]]:
    """Train and eval groups for a recipe (rows from read_splits), and their pre-flight statistics, a line per source."""
    assert data.train is not None
    splits = splits if splits is not None else read_splits(data)
    label = lambda split, i: split if len(splits[split]) == 1 else f"{split}[{i}]"  # noqa: E731
    tokenized = [tokenize_split(part, i, label("train", i), tokenizer, fmt, data) for i, part in enumerate(splits["train"])]
    stats = [s for _, s in tokenized]
    for (groups, s), part in zip(tokenized, splits["train"]):
        if not groups:
            raise DataError(_nothing_left(s, data, "train"))
    eval_groups = None
    if data.eval is not None:
        tokenized_eval = [tokenize_split(part, i, label("eval", i), tokenizer, fmt, data) for i, part in enumerate(splits["eval"])]
        for groups, s in tokenized_eval:
            if not groups:
                raise DataError(_nothing_left(s, data, "eval"))
            stats.append(s)
        eval_groups = [replace(g, uid=i) for i, g in enumerate(g for groups, _ in tokenized_eval for g in groups)]
    train_parts = [groups for groups, _ in tokenized]
    if data.eval_fraction:
        held_out = []
        for i, groups in enumerate(train_parts):
            order = list(range(len(groups)))
            random.Random(seed + i).shuffle(order)
            n_eval = max(1, round(len(groups) * data.eval_fraction))
            chosen = set(order[:n_eval])
            held_out.extend(g for j, g in enumerate(groups) if j in chosen)
            train_parts[i] = [g for j, g in enumerate(groups) if j not in chosen]
            stats[i].name += f", {n_eval} held out for eval"
        eval_groups = [replace(g, uid=i) for i, g in enumerate(held_out)]
        if not all(train_parts):
            raise DataError(_nothing_left(stats[0], data, "train"))
    train = mix(train_parts, [part.source.weight for part in splits["train"]], seed)
    return train, eval_groups, stats


def _nothing_left(stats: Preflight, data: DataConfig, split: str) -> str:
    what = "pair" if stats.kind == "pairs" else "completion"
    if stats.too_long and (stats.kind == "lists" and stats.completions_kept == 0 or stats.too_long + stats.identical == stats.read):
        return (
            f"{stats.name}: every {what} is longer than data.max_length={data.max_length} "
            f"(the longest sequence has {stats.longest:,} tokens); set data.truncation: truncate, "
            "or raise data.max_length"
        )
    if stats.kind == "pairs" and stats.identical == stats.read:
        return (
            f"{stats.name}: every pair has chosen identical to rejected ({stats.read} read, all dropped); "
            "such pairs teach nothing: check the chosen/rejected columns"
        )
    if stats.kind == "lists":
        return (
            f"{stats.name}: no list implies a pair ({stats.read} read; {stats.tied} tied pairs, {stats.identical} between "
            f"identical completions, {stats.too_long} completions longer than data.max_length={data.max_length}); "
            "check the scores/ranks columns"
        )
    return (
        f"{stats.name}: no {split} pairs left ({stats.read} read, {stats.identical} dropped as chosen == rejected, "
        f"{stats.too_long} longer than data.max_length={data.max_length})"
    )


# --------------------------------------------------------------------------------------------------
# A finished run's data


@dataclass
class EvalSet:
    """Rows to evaluate and their groups (each group's `row` an index into `rows`; None until tokenized)."""

    name: str
    rows: list[dict[str, Any]]
    groups: list[Group] | None = None
    stats: Preflight | None = None
    """What tokenizing kept and dropped (None for held-out groups, which training's line described)."""


class RunData:
    """A finished run's data, read from its recipe.yaml as `fit` read it: `rmtrain eval` and `rmtrain export` take
    its eval set from here (each `data.eval` source, or the rows `data.eval_fraction` held out, drawn again with the
    run's seed)."""

    def __init__(self, run: Path):
        from rmtrain.config import load_recipe

        recipe_file = run / "recipe.yaml"
        if not recipe_file.is_file():
            raise DataError(f"{run}: not a run folder (no recipe.yaml), so it has no eval set of its own; pass --data PAIRS")
        self.run, self.recipe = run, load_recipe(recipe_file)
        self.data = self.recipe.data
        self.splits = read_splits(self.data)  # a data file that moved or went bad fails before a model loads

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None or bool(self.data.eval_fraction)

    def eval_sets(self, tokenizer, fmt: TokenFormat, max_length: int | None = None, truncation: str | None = None) -> list[EvalSet]:
        """Each eval source tokenized (with the run's max_length and truncation unless given), or the held-out rows;
        [] for a run without an eval set."""
        data = self.data
        if data.eval is not None:
            parts = self.splits["eval"]
            names = source_labels(parts) if len(parts) > 1 else [parts[0].name]
            sets = []
            for name, part in zip(names, parts):
                groups, stats = tokenize_rows(part.rows, part.name, tokenizer, fmt, max_length or data.max_length,
                                              truncation or data.truncation, data.num_proc, part.source.skip)
                sets.append(EvalSet(name, part.rows, _indexing_rows(part, groups), stats))
            return sets
        if not data.eval_fraction:
            return []
        _, held_out, _ = load_groups(data, tokenizer, fmt, self.recipe.train.seed, self.splits)
        train = self.splits["train"]
        name = "held out of " + ", ".join(part.name for part in train)
        if len(train) > 1:  # groups of several files: no one list of rows to index
            return [EvalSet(name, [], held_out)]
        return [EvalSet(name, train[0].rows, _indexing_rows(train[0], held_out))]

    def train_pairs(self, tokenizer, fmt: TokenFormat, limit: int) -> EvalSet:
        """The first `limit` groups of the first training source, tokenized as the run tokenized them."""
        part = self.splits["train"][0]
        rows = part.rows[:limit]  # a pair row gives at most one group: the first `limit` rows hold the first groups
        groups, _ = tokenize_rows(rows, part.name, tokenizer, fmt, self.data.max_length, self.data.truncation, self.data.num_proc,
                                  part.source.skip)
        return EvalSet(part.name, rows, _indexing_rows(part, groups))


def _indexing_rows(part: Split, groups: list[Group]) -> list[Group]:
    """Groups whose `row` (the file's row, `skip` counted, as messages name it) indexes `part.rows` instead."""
    return [replace(g, row=g.row - part.source.skip) for g in groups]
