"""`rmtrain eval`: a saved model on a preference file, with its diagnostics (rmtrain.diagnostics)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

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
from rmtrain.errors import DataError
from rmtrain.groups import Group, tokenize_rows
from rmtrain.inference import evaluate_pairs, inference_set, prepare_inference
from rmtrain.log import RunLog
from rmtrain.loss import correct
from rmtrain.rows import check_single_shape
from rmtrain.saved import folder_kind, load_saved, load_saved_text, scoring_max_length
from rmtrain.sources import read_rows
from rmtrain.splits import EvalSet, RunData


def subset_column(rows: list[dict[str, Any]], name: str, requested: str | None) -> str | None:
    """The column naming each row's subset: `requested` (must exist), else `subset` when the data has one."""
    field = requested or "subset"
    if any(field in row for row in rows):
        return field
    if requested:
        columns = ", ".join(sorted(rows[0])) if rows else "none"
        raise DataError(f"{name}: --subset-field: no column '{requested}' (columns: {columns})")
    return None


def diagnose(
    per_pair: dict[str, Any],
    groups: list[Group],
    rows: list[dict[str, Any]],
    name: str,
    subset_field: str | None,
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
    subset_of = None
    if subset_field is not None:
        subset_of = {}
        for g in groups:
            value = rows[g.row].get(subset_field)
            if value is None:
                raise DataError(f"{name}: row {g.row + 1}: no '{subset_field}' value while other rows have one")
            subset_of[g.row] = str(value)
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


def run_eval(
    model_path: str,
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
) -> dict[str, Any]:
    """`rmtrain eval`: load a saved model (full or adapter), score a preference file, or each eval source of a
    run when no file is given, print and save the metrics (for several sources: {"sources": {name: metrics}}).

    Batches hold at most 2 * `batch_size` sequences and `max_tokens_per_forward` tokens ("auto": as
    `inference_tokens_per_forward` chooses), built as fit's periodic eval builds them.
    """
    folder_kind(Path(model_path))
    # The data first, then the tokenizer and tokenizing, then the weights: a mistake in the data is reported before
    # the model takes its time to load.
    run = None
    if data_path is not None:
        rows, name = read_rows(DataSource(path=data_path, split=split))
        sets = [EvalSet(name, rows)]
    else:
        run = RunData(Path(model_path))
        if not run.has_eval:
            raise DataError(f"{model_path}: the run has no eval set (data.eval or data.eval_fraction); pass --data PAIRS")
        sets = [EvalSet(part.name, part.rows) for part in run.splits.get("eval", [])]
    for part in sets:
        check_single_shape(part.rows, part.name)
    text = load_saved_text(model_path)
    if run is not None:
        sets = run.eval_sets(text.tokenizer, text.fmt, max_length, truncation)
        max_length, truncation = max_length or run.data.max_length, truncation or run.data.truncation
    max_length, truncation = scoring_max_length(max_length, text.max_length), truncation or "filter"
    subsets_from = [subset_column(part.rows, part.name, subset_field) for part in sets]
    for part in sets:
        if part.groups is None:
            part.groups, part.stats = tokenize_rows(part.rows, part.name, text.tokenizer, text.fmt, max_length, truncation)
    rm, _ = load_saved(model_path, text=text)
    inference = prepare_inference(rm, max_tokens_per_forward, 2 * batch_size)
    is_main = inference.accelerator.is_main_process
    log = log or RunLog(enabled=is_main)
    everything = {}
    for index, part in enumerate(sets):
        groups = part.groups
        if part.stats is not None:
            log.info(part.stats.line(truncation, max_length))
        kind = "lists" if any(g.scores is not None for g in groups) else "pairs"
        read = part.stats.read if part.stats is not None else len(groups)
        if not groups:
            raise DataError(f"{part.name}: no pairs left to evaluate (see the line above); try --truncation truncate")
        start = time.perf_counter()
        metrics, per_pair = evaluate_pairs(inference, inference_set(inference, groups))
        seconds = time.perf_counter() - start
        metrics[f"num_{kind}_read"] = read
        metrics["seconds"] = seconds
        metrics["pairs_per_s"] = metrics["num_pairs"] / max(seconds, 1e-9)
        details, records, list_records = diagnose(per_pair, groups, part.rows, part.name, subsets_from[index])
        results = {**metrics, **details}
        everything[part.name] = results
        if is_main:
            from rmtrain.report import print_results, write_report

            print_results(log, f"eval: {model_path} on {part.name}", results)
            if report_dir:
                folder = Path(report_dir) if len(sets) == 1 else Path(report_dir) / f"{index}-{Path(part.name).stem}"
                write_report(folder, results, records, list_records)
                extra = ", lists.jsonl" if list_records else ""
                log.info(f"report: {folder} (metrics.json, pairs.jsonl{extra}, reward_histogram.png, reliability.png, reward_vs_length.png)")
    results = next(iter(everything.values())) if len(everything) == 1 else {"sources": everything}
    if is_main and json_out:
        from rmtrain.report import strict_json

        Path(json_out).write_text(strict_json(results) + "\n")
    return results
