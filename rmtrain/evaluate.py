"""`rmtrain eval`: saved models on a preference file, with their diagnostics (rmtrain.diagnostics), every accuracy's
bootstrap interval and baselines (rmtrain.outcomes) and, for several models, their comparison (rmtrain.compare)."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

import torch

from rmtrain import rewardbench2
from rmtrain.aggregate import Aggregate
from rmtrain.compare import compare
from rmtrain.config import DataSource
from rmtrain.diagnostics import (
    REWARDBENCH_SECTIONS,
    calibration,
    kendall_tau,
    length_bias,
    list_stats,
    rewardbench_score,
    section_scores,
    subset_accuracy,
    top1_correct,
)
from rmtrain.errors import DataError, ModelError
from rmtrain.groups import Group, rust_tokenizer, tokenize_rows
from rmtrain.inference import evaluate_pairs, inference_set, prepare_inference
from rmtrain.log import RunLog
from rmtrain.loss import correct
from rmtrain.outcomes import Outcomes, Resampling, Summary, outcomes_of, summarize
from rmtrain.rows import check_single_shape
from rmtrain.saved import SavedText, folder_kind, load_saved, load_saved_text, scoring_max_length
from rmtrain.sources import read_rows
from rmtrain.splits import EvalSet, RunData
from rmtrain.stats import CONFIDENCE
from rmtrain.uncertainty import ensemble_stats


def subset_column(rows: list[dict[str, Any]], name: str, requested: str | None) -> str | None:
    """The column naming each row's subset: `requested` (must exist), else `subset` when the data has one."""
    field = requested or "subset"
    if any(field in row for row in rows):
        return field
    if requested:
        columns = ", ".join(sorted(rows[0])) if rows else "none"
        raise DataError(f"{name}: --subset-field: no column '{requested}' (columns: {columns})")
    return None


def subsets_of_rows(groups: list[Group], rows: list[dict[str, Any]], name: str, subset_field: str | None) -> dict[int, str] | None:
    """Each scored row's subset (None without a subset column); a row without a value is an error."""
    if subset_field is None:
        return None
    subset_of = {}
    for g in groups:
        value = rows[g.row].get(subset_field)
        if value is None:
            raise DataError(f"{name}: row {g.row + 1}: no '{subset_field}' value while other rows have one")
        subset_of[g.row] = str(value)
    return subset_of


def diagnose(
    per_pair: dict[str, Any],
    groups: list[Group],
    rows: list[dict[str, Any]],
    subset_field: str | None,
    subset_of: dict[int, str] | None,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Diagnostics over the scored pairs; one record per pair (sorted by source row, then by the pair's
    completions) for pairs.jsonl, and for ranked lists one record per list for lists.jsonl."""
    lists = [(g, r) for g, r in zip(groups, per_pair["group_rewards"]) if g.scores is not None]
    order = sorted(range(len(per_pair["row"])), key=lambda i: (int(per_pair["row"][i]), int(per_pair["better"][i]), int(per_pair["worse"][i])))
    per_pair = {k: v[order] for k, v in per_pair.items() if isinstance(v, torch.Tensor)}
    row_ids = per_pair["row"].tolist()
    chosen, rejected = per_pair["chosen"], per_pair["rejected"]
    chosen_tokens, rejected_tokens = per_pair["chosen_tokens"], per_pair["rejected_tokens"]
    outcomes = correct(chosen, rejected)
    results: dict[str, Any] = {
        "mean_chosen_reward": chosen.double().mean().item(),
        "mean_rejected_reward": rejected.double().mean().item(),
        "calibration": calibration(chosen.double() - rejected.double()),
        "length_bias": length_bias(chosen.double(), rejected.double(), chosen_tokens, rejected_tokens),
    }
    if subset_of is not None:
        results["subset_field"] = subset_field
        results["subsets"] = subset_accuracy([subset_of[r] for r in row_ids], outcomes)
        for subset, entry in results["subsets"].items():
            if lists:
                members = [(g, r) for g, r in lists if subset_of[g.row] == subset]
                entry |= list_stats([g.scores for g, _ in members], [r for _, r in members])
        sections = section_scores({s: v["accuracy"] for s, v in results["subsets"].items()})
        if sections:
            results["sections"] = sections
            results["rewardbench_score"] = rewardbench_score(sections)
            results["subsets_outside_rewardbench"] = [
                s for s in results["subsets"] if not any(s in counts for counts in REWARDBENCH_SECTIONS.values())
            ]
    records = []
    for i, r in enumerate(row_ids):
        record: dict[str, Any] = {"row": r}
        if lists:
            record.update(better=int(per_pair["better"][i]), worse=int(per_pair["worse"][i]))
        if subset_of is not None:
            record["subset"] = subset_of[r]
        record.update(
            chosen_reward=chosen[i].item(),
            rejected_reward=rejected[i].item(),
            margin=chosen[i].item() - rejected[i].item(),
            correct=bool(outcomes[i]),
            loss=per_pair["loss"][i].item(),
            chosen_tokens=int(chosen_tokens[i]),
            rejected_tokens=int(rejected_tokens[i]),
        )
        records.append(record)
    list_records = []
    for g, r in sorted(lists, key=lambda item: item[0].row):
        record = {"row": g.row} | ({"subset": subset_of[g.row]} if subset_of is not None else {})
        record.update(rewards=r.tolist(), scores=g.scores, top1_correct=top1_correct(r, g.scores), kendall_tau=kendall_tau(r, g.scores))
        list_records.append(record)
    return results, records, list_records


# --------------------------------------------------------------------------------------------------
# Intervals, baselines, worst subset and RewardBench 2 in the results


def add_estimates(results: dict[str, Any], summary: Summary, resampling: Resampling, resamples: int, seed: int,
                  outcomes: Outcomes) -> None:
    """The estimates of `summary` beside the numbers they belong to (existing keys keep their values; intervals are
    [low, high] or null with --bootstrap 0)."""
    e = summary.estimates
    results["accuracy_interval"] = e["accuracy"].interval()
    results["baselines"] = {"longer_wins": e["longer_wins"].value, "shorter_wins": e["shorter_wins"].value}
    if "top1_accuracy" in e:
        results["top1_interval"] = e["top1_accuracy"].interval()
        results["bestofk_regret_interval"] = e["bestofk_regret"].interval()
        results["baselines"] |= {k: e[k].value for k in ("top1_longest", "top1_shortest", "top1_random", "bestofk_longest_regret")}
    for subset, entry in results.get("subsets", {}).items():
        prefix = f"subsets/{subset}/"
        entry |= {"accuracy_interval": e[prefix + "accuracy"].interval(), "longer_wins": e[prefix + "longer_wins"].value,
                  "shorter_wins": e[prefix + "shorter_wins"].value}
        if prefix + "top1_accuracy" in e:
            entry |= {"top1_interval": e[prefix + "top1_accuracy"].interval(), "bestofk_regret_interval": e[prefix + "bestofk_regret"].interval()}
            entry |= {k: e[prefix + k].value for k in ("top1_longest", "top1_shortest", "top1_random", "bestofk_longest_regret")}
    if "subset_mean" in e:
        results["subset_mean"] = {"accuracy": e["subset_mean"].value, "interval": e["subset_mean"].interval()}
        results["worst_subset"] = {"subset": summary.worst["subsets"], "accuracy": e["worst_subset"].value,
                                   "interval": e["worst_subset"].interval()}
    if "sections" in results:
        results["section_intervals"] = {s: e[f"sections/{s}"].interval() for s in results["sections"]}
        if "rewardbench_score" in e:
            results["rewardbench_score_interval"] = e["rewardbench_score"].interval()
    if outcomes.rb2_rows_read:
        results["rewardbench2"] = rewardbench2_results(summary, outcomes)
    results["bootstrap"] = {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "clusters": resampling.clusters,
                            "seconds": resampling.seconds}


def rewardbench2_results(summary: Summary, outcomes: Outcomes) -> dict[str, Any]:
    e = summary.estimates
    subsets = {}
    prefix = "rewardbench2/subsets/"
    for name in dict.fromkeys(k[len(prefix):].split("/")[0] for k in e if k.startswith(prefix)):
        p = f"{prefix}{name}/"
        entry = {"rows": summary.counts[p + "rows"], "score": e[p + "score"].value, "interval": e[p + "score"].interval(),
                 "longest": e[p + "longest"].value, "shortest": e[p + "shortest"].value,
                 "chance": e[p + "chance"].value if p + "chance" in e else None}
        if name in summary.ties_terms:
            entry["ties_terms"] = {k: t.value for k, t in summary.ties_terms[name].items()}
        subsets[name] = entry
    block: dict[str, Any] = {"rows_read": outcomes.rb2_rows_read, "rows": len(outcomes.rb2),
                             "rows_dropped": outcomes.rb2_rows_read - len(outcomes.rb2), "subsets": subsets}
    if "rewardbench2/score" in e:
        block |= {"score": e["rewardbench2/score"].value, "interval": e["rewardbench2/score"].interval(),
                  "subsets_in_score": [n for n, s in subsets.items() if s["score"] is not None],
                  "worst_subset": {"subset": summary.worst["rewardbench2"], "score": e["rewardbench2/worst_subset"].value,
                                   "interval": e["rewardbench2/worst_subset"].interval()}}
    return block


# --------------------------------------------------------------------------------------------------
# Models, eval sets, tokenization


@dataclass
class Part:
    """One eval set: its rows and, per tokenization, its groups."""

    name: str
    rows: list[dict[str, Any]]
    rb2: list[rewardbench2.Row] | None = None
    subset_field: str | None = None
    tokenized: dict[Hashable, EvalSet] = field(default_factory=dict)


def tokenization_key(text: SavedText, max_length: int, truncation: str) -> Hashable:
    """Models whose text becomes the same ids share one tokenization: the same Rust tokenizer (vocabulary, normalizer,
    special tokens, post-processor), chat template, token format, max_length and truncation. A tokenizer without a
    Rust backend is its own."""
    backend = rust_tokenizer(text.tokenizer)
    tokenizer = backend.to_str() if backend is not None else id(text.tokenizer)
    return (tokenizer, text.tokenizer.chat_template, repr(text.fmt), max_length, truncation)


def model_labels(paths: list[str]) -> list[str]:
    """A, B, C, ...: how tables name the models."""
    return [chr(ord("A") + i) if i < 26 else f"M{i + 1}" for i in range(len(paths))]


def check_weights(path: str) -> None:
    """What loading a model's weights needs, checked for every model before the first one is scored, so that a
    comparison does not fail half way: a weights file, and an adapter's base model folder where it names one (as
    `load_saved` will look for it; a Hub id is only looked up then)."""
    folder = Path(path)
    if not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.gguf")):
        raise ModelError(f"{path}: holds no weights (no .safetensors, .bin or .gguf file); give a finished run or a model folder")
    if folder_kind(folder) != "adapter":
        return
    recipe_file = folder / "recipe.yaml"
    if recipe_file.is_file():
        from rmtrain.config import load_recipe

        base, source = load_recipe(recipe_file).model.name_or_path, "recipe.yaml model.name_or_path"
    else:
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        source = "adapter_config.json base_model_name_or_path"
    if not base or (base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir()):
        raise ModelError(f"{path}: its base model {base!r} ({source}) is not there; put it back, or fix that path")


def check_runs_share_eval_set(paths: list[str], runs: list[RunData]) -> None:
    """Runs compared without --data must have drawn the same eval set: the same data.eval sources, or the same
    data.eval_fraction of the same data.train with the same seed."""
    first = runs[0].recipe
    for path, run in zip(paths[1:], runs[1:]):
        data, seed = run.recipe.data, run.recipe.train.seed
        same = data.eval == first.data.eval and data.eval_fraction == first.data.eval_fraction
        if same and data.eval_fraction:
            same = data.train == first.data.train and seed == first.train.seed
        if not same:
            raise DataError(f"{path}: its eval set is not {paths[0]}'s (recipe.yaml data section or seed differ); "
                            "pass --data FILE to compare models on the same rows")


def run_eval(
    model_path: str | list[str],
    data_path: str | None,
    split: str = "train",
    max_length: int | None = None,
    truncation: str | None = None,
    batch_size: int = 16,
    json_out: str | None = None,
    subset_field: str | None = None,
    report_dir: str | None = None,
    log: RunLog | None = None,
    max_tokens_per_forward: int | str | None = "auto",
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    aggregate: Aggregate = Aggregate(),
) -> dict[str, Any]:
    """`rmtrain eval`: load saved models (full or adapter), score a preference file, or each eval source of a run when
    no file is given, print and save the metrics (for several sources: {"sources": {name: metrics}}; for several
    models, per source: {"models": {path: metrics}, "comparison": ...}).

    Every model folder, the data and each model's tokenizer are checked before any weights load; the data is
    tokenized once per distinct tokenization. Batches hold at most 2 * `batch_size` sequences and
    `max_tokens_per_forward` tokens ("auto": as `inference_tokens_per_forward` chooses), built as fit's periodic eval
    builds them. `bootstrap` resamples of prompts (0: none), drawn with `bootstrap_seed`, give every accuracy its
    95% interval. An ensemble's rewards are read with `aggregate`; its members' own numbers join the results
    ("ensemble").
    """
    from accelerate import PartialState

    paths = [model_path] if isinstance(model_path, str) else list(model_path)
    for path in paths:
        if paths.count(path) > 1:
            raise DataError(f"{path}: given twice; compare different models")
        folder_kind(Path(path))
    # The data first, then the tokenizers and tokenizing, then the weights: a mistake in the data or in any model
    # folder is reported before a model takes its time to load.
    parts, runs = read_parts(paths, data_path, split, subset_field)
    texts = [load_saved_text(path) for path in paths]
    if len(paths) > 1:
        for path in paths:
            check_weights(path)
    is_main = PartialState().is_main_process
    log = log or RunLog(enabled=is_main)
    keys = tokenize_parts(parts, runs, texts, max_length, truncation, subset_field, log)
    labels = model_labels(paths)
    per_model: list[list[Evaluated]] = []
    for path, label, text, key in zip(paths, labels, texts, keys):
        rm, _ = load_saved(path, text=text)
        inference = prepare_inference(rm, max_tokens_per_forward, 2 * batch_size, aggregate=aggregate)
        per_model.append([evaluate_part(inference, part, part.tokenized[key], bootstrap, bootstrap_seed) for part in parts])
        inference.accelerator.free_memory()  # the next model loads into the room this one leaves
        del rm, inference
        gc.collect()
    everything: dict[str, Any] = {}
    for index, part in enumerate(parts):
        if len(paths) == 1:
            everything[part.name] = per_model[0][index].results
            continue
        same_tokens = len(set(keys)) == 1
        whole = [evaluated[index].whole_rows for evaluated in per_model]
        everything[part.name] = {
            "models": {path: evaluated[index].results for path, evaluated in zip(paths, per_model)},
            "comparison": compare(paths, [evaluated[index].outcomes for evaluated in per_model], bootstrap, bootstrap_seed, same_tokens, whole),
        }
    results = next(iter(everything.values())) if len(everything) == 1 else {"sources": everything}
    if is_main:
        from rmtrain.report import print_comparison, print_results, strict_json, write_report

        for index, part in enumerate(parts):
            part_folder = None
            if report_dir:
                part_folder = Path(report_dir) if len(parts) == 1 else Path(report_dir) / f"{index}-{Path(part.name).stem}"
            for path, label, evaluated in zip(paths, labels, per_model):
                title = f"eval: {path} on {part.name}" if len(paths) == 1 else f"eval: {label} = {path} on {part.name}"
                print_results(log, title, evaluated[index].results, brief=len(paths) > 1)
                if part_folder:
                    folder = part_folder if len(paths) == 1 else part_folder / f"{label}-{Path(path).name}"
                    write_report(folder, evaluated[index].results, evaluated[index].records, evaluated[index].list_records)
                    extra = ", lists.jsonl" if evaluated[index].list_records else ""
                    log.info(f"report: {folder} (metrics.json, pairs.jsonl{extra}, reward_histogram.png, reliability.png, reward_vs_length.png)")
            if len(paths) > 1:
                comparison = everything[part.name]["comparison"]
                print_comparison(log, f"{' vs '.join(labels)} on {part.name}", labels, comparison)
                if part_folder:
                    (part_folder / "comparison.json").write_text(strict_json(comparison) + "\n", encoding="utf-8")
        if json_out:
            Path(json_out).write_text(strict_json(results) + "\n")
    return results


def read_parts(paths: list[str], data_path: str | None, split: str, subset_field: str | None) -> tuple[list[Part], list[RunData]]:
    """The eval sets: the rows of `data_path`, or the first run's eval sources (every run must share them); rows of
    RewardBench 2's shape become ranked lists. A run's held-out eval set has no rows until tokenized."""
    runs: list[RunData] = []
    if data_path is not None:
        rows, name = read_rows(DataSource(path=data_path, split=split))
        parts = [Part(name, rows)]
    else:
        runs = [RunData(Path(path)) for path in paths]
        if not runs[0].has_eval:
            raise DataError(f"{paths[0]}: the run has no eval set (data.eval or data.eval_fraction); pass --data PAIRS")
        check_runs_share_eval_set(paths, runs)
        parts = [Part(split_part.name, split_part.rows) for split_part in runs[0].splits.get("eval", [])]
    for part in parts:
        part.subset_field = subset_column(part.rows, part.name, subset_field)
        if data_path is not None and rewardbench2.is_rewardbench2(part.rows):
            part.rows, part.rb2 = rewardbench2.as_lists(part.rows, part.name, part.subset_field)
        check_single_shape(part.rows, part.name)
    return parts, runs


def tokenize_parts(parts: list[Part], runs: list[RunData], texts: list[SavedText], max_length: int | None, truncation: str | None,
                   subset_field: str | None, log: RunLog) -> list[Hashable]:
    """Each part's groups per distinct tokenization (its pre-flight line printed once), and each model's key. A part
    left without a pair is an error here, before any weights load."""
    keys = []
    for index, text in enumerate(texts):
        run = runs[index] if runs else None  # each run's eval set cut as that run cut it (its max_length, truncation)
        length = scoring_max_length(max_length or (run.data.max_length if run else None), text.max_length)
        cut = truncation or (run.data.truncation if run else "filter")
        key = tokenization_key(text, length, cut)
        keys.append(key)
        if any(key in part.tokenized for part in parts):
            continue
        if run is not None:
            sets = run.eval_sets(text.tokenizer, text.fmt, max_length, truncation)
            if not parts:  # the held-out rows of data.eval_fraction: known once drawn
                parts.extend(Part(s.name, s.rows, subset_field=subset_column(s.rows, s.name, subset_field)) for s in sets)
            for part, tokenized in zip(parts, sets):
                part.name = tokenized.name  # a source's name as fit logged it (`by_source`)
        else:
            sets = []
            for part in parts:
                groups, stats = tokenize_rows(part.rows, part.name, text.tokenizer, text.fmt, length, cut)
                sets.append(EvalSet(part.name, part.rows, groups, stats))
        for part, tokenized in zip(parts, sets):
            part.tokenized[key] = tokenized
            if tokenized.stats is not None:
                log.info(tokenized.stats.line(cut, length))
            if not tokenized.groups:
                raise DataError(f"{part.name}: no pairs left to evaluate (see the line above); try --truncation truncate")
    return keys


@dataclass
class Evaluated:
    """One model on one eval set."""

    results: dict[str, Any]
    records: list[dict[str, Any]]
    list_records: list[dict[str, Any]]
    outcomes: Outcomes
    whole_rows: set
    """Rows of lists whose every completion was kept (a comparison across tokenizers needs them whole)."""


def evaluate_part(inference, part: Part, tokenized: EvalSet, resamples: int, seed: int) -> Evaluated:
    groups = tokenized.groups
    kind = "lists" if any(g.scores is not None for g in groups) else "pairs"
    read = tokenized.stats.read if tokenized.stats is not None else len(groups)
    start = time.perf_counter()
    metrics, per_pair = evaluate_pairs(inference, inference_set(inference, groups))
    seconds = time.perf_counter() - start
    metrics[f"num_{kind}_read"] = read
    metrics["seconds"] = seconds
    metrics["pairs_per_s"] = metrics["num_pairs"] / max(seconds, 1e-9)
    subset_of = subsets_of_rows(groups, tokenized.rows, part.name, part.subset_field)
    details, records, list_records = diagnose(per_pair, groups, tokenized.rows, part.subset_field, subset_of)
    results = {**metrics, **details}
    if inference.rm.heads > 1:
        results["ensemble"] = ensemble_stats(groups, per_pair["group_heads"], inference.aggregate)
    start = time.perf_counter()
    outcomes = outcomes_of(per_pair, groups, tokenized.rows, subset_of, part.rb2)
    resampling = Resampling.of(outcomes, resamples, seed)
    summary = summarize(outcomes, resampling)
    resampling.seconds = time.perf_counter() - start
    add_estimates(results, summary, resampling, resamples, seed, outcomes)
    whole = {(g.source, g.row) for g in groups if g.scores is not None and tokenized.rows
             and len(g.completions) == len(tokenized.rows[g.row].get("completions", ()))}
    return Evaluated(results, records, list_records, outcomes, whole)
