"""`rmtrain eval` results: Rich tables on the console, and the --report folder (JSON, JSON lines, PNG plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from rmtrain.log import RunLog, _fmt

PLOTS = ("reward_histogram.png", "reliability.png", "reward_vs_length.png")


def _value(value: Any) -> str:
    return "-" if value is None else _fmt(value)


def summary_values(results: dict[str, Any]) -> dict[str, Any]:
    """The scalar metrics of the main table, with the headline diagnostics; accuracies with their 95% interval and
    beside them what the content-blind rulers score."""
    values = {k: v for k, v in results.items() if not isinstance(v, (dict, list, str)) and k != "rewardbench_score"}
    for key, interval in (("accuracy", "accuracy_interval"), ("top1_accuracy", "top1_interval"), ("bestofk_regret", "bestofk_regret_interval")):
        if results.get(interval) is not None and values.get(key) is not None:
            values[key] = with_interval(values[key], results[interval])
    baselines = results.get("baselines", {})
    for key, label in (("longer_wins", "baseline: longer wins"), ("shorter_wins", "baseline: shorter wins"),
                       ("top1_longest", "baseline: top-1 of longest"), ("top1_random", "baseline: top-1 of random")):
        if key in baselines:
            values[label] = baselines[key]
    values["ece"] = results["calibration"]["ece"]
    values["spearman_reward_length"] = results["length_bias"]["spearman_reward_length"]
    return values


def with_interval(value: Any, interval: list[float] | None, digits: int | None = None) -> str:
    """"0.6365 [0.5946, 0.6767]": a number and its 95% interval (the number alone without one); `digits`: that many
    decimals (a table of several models, narrower)."""
    if value is None:
        return "-"
    show = _fmt if digits is None else (lambda x: f"{x:.{digits}f}")  # noqa: E731
    return show(value) if interval is None else f"{show(value)} [{show(interval[0])}, {show(interval[1])}]"


def print_results(log: RunLog, title: str, results: dict[str, Any], brief: bool = False) -> None:
    """The results as tables; `brief`: the main table only (one model of several, whose comparison follows)."""
    if not log.enabled:
        return
    log.table(title, summary_values(results))
    if brief:
        return
    console = log.console

    if "subsets" in results:
        section_of = {}
        from rmtrain.diagnostics import REWARDBENCH_SECTIONS

        for section, counts in REWARDBENCH_SECTIONS.items():
            section_of.update({s: section for s in counts})
        lists = "num_lists" in results
        table = Table(title=f"accuracy per {results['subset_field']} (95% intervals)")
        columns = [("subset", "left"), ("pairs", "right"), ("accuracy", "right"), ("longer wins", "right"), ("shorter wins", "right")]
        columns += [("lists", "right"), ("top-1", "right"), ("Kendall tau", "right")] if lists else []
        for column, justify in columns + [("section", "left")]:
            table.add_column(column, justify=justify)
        for subset, entry in results["subsets"].items():
            cells = [subset, str(entry["pairs"]), with_interval(entry["accuracy"], entry.get("accuracy_interval")),
                     _value(entry.get("longer_wins")), _value(entry.get("shorter_wins"))]
            if lists:
                cells += [str(entry.get("num_lists", 0)), with_interval(entry.get("top1_accuracy"), entry.get("top1_interval")),
                          _value(entry.get("mean_kendall_tau"))]
            table.add_row(*cells, section_of.get(subset, "-"))
        if "subset_mean" in results:
            blank = [""] * (len(columns) - 3)
            mean, worst = results["subset_mean"], results["worst_subset"]
            table.add_row("mean of subsets", "", with_interval(mean["accuracy"], mean["interval"]), *blank, "")
            table.add_row(f"worst: {worst['subset']}", "", with_interval(worst["accuracy"], worst["interval"]), *blank, "")
        console.print(table)
    if results.get("sections"):
        intervals = results.get("section_intervals", {})
        table = Table(title="RewardBench sections")
        table.add_column("section")
        table.add_column("score", justify="right")
        for section, score in results["sections"].items():
            table.add_row(section, with_interval(score, intervals.get(section)))
        if results.get("rewardbench_score") is not None:
            table.add_row("mean of the 4 sections", with_interval(results["rewardbench_score"], results.get("rewardbench_score_interval")))
        console.print(table)
    if results.get("bestofk_regret") is not None:
        print_best_of_k(console, results)
    if "rewardbench2" in results:
        print_rewardbench2(console, results["rewardbench2"])
    if "ensemble" in results:
        print_ensemble(console, results["ensemble"])

    calibration = results["calibration"]
    table = Table(title=f"calibration: ECE {_fmt(calibration['ece'])}")
    for column in ("sigmoid(margin)", "responses", "mean predicted", "observed wins"):
        table.add_column(column, justify="right")
    for row in calibration["bins"]:
        if row["count"]:
            table.add_row(f"{row['low']:.1f}-{row['high']:.1f}", str(row["count"]), _fmt(row["mean_probability"]), _fmt(row["frequency"]))
    console.print(table)

    bias = results["length_bias"]
    table = Table(title=f"length bias: Spearman {_value(bias['spearman_reward_length'])}")
    for column, justify in (("pairs where chosen is", "left"), ("pairs", "right"), ("accuracy", "right")):
        table.add_column(column, justify=justify)
    table.add_row("longer", str(bias["pairs_chosen_longer"]), _value(bias["accuracy_chosen_longer"]))
    table.add_row("shorter", str(bias["pairs_chosen_shorter"]), _value(bias["accuracy_chosen_shorter"]))
    table.add_row("same length", str(bias["pairs_same_length"]), "-")
    console.print(table)


def print_best_of_k(console, results: dict[str, Any]) -> None:
    """Best-of-K on graded lists: the score of the model's pick against the list's best and mean, the normalized regret,
    and the rulers "longest" (its regret) and "random" (regret 1 by definition)."""
    table = Table(title="best-of-K on graded lists: score of the top-ranked completion (95% intervals)")
    for column in ("scope", "lists", "picked", "best", "mean", "regret", "regret of longest", "top-1", "top-1 of longest",
                   "top-1 of shortest", "top-1 of random"):
        table.add_column(column, justify="left" if column == "scope" else "right")
    scopes = [("all", results, results.get("baselines", {}))]
    scopes += [(name, entry, entry) for name, entry in results.get("subsets", {}).items() if entry.get("num_lists")]
    for name, entry, baselines in scopes:
        table.add_row(name, str(entry["num_lists"]), _value(entry["bestofk_picked_score"]), _value(entry["bestofk_best_score"]),
                      _value(entry["bestofk_mean_score"]), with_interval(entry["bestofk_regret"], entry.get("bestofk_regret_interval")),
                      _value(baselines.get("bestofk_longest_regret")), with_interval(entry["top1_accuracy"], entry.get("top1_interval")),
                      _value(baselines.get("top1_longest")), _value(baselines.get("top1_shortest")), _value(baselines.get("top1_random")))
    console.print(table)


def print_ensemble(console, block: dict[str, Any]) -> None:
    """An ensemble's members alone, each aggregate's reading, and what their spread says about the ensemble's errors."""
    picks = any("bestofk_picked_score" in entry for entry in block["aggregates"].values())
    table = Table(title=f"ensemble of {block['members']}")
    for column in ("reading", "accuracy") + (("best-of-K picked",) if picks else ()):
        table.add_column(column, justify="left" if column == "reading" else "right")
    blank = ("",) if picks else ()
    for i, accuracy in enumerate(block["member_accuracy"]):
        table.add_row(f"member {i}", _fmt(accuracy), *blank)
    table.add_row("members' mean", _fmt(block["mean_member_accuracy"]), *blank)
    for name, entry in block["aggregates"].items():
        table.add_row(f"aggregate {name}", _value(entry["accuracy"]), *((_value(entry.get("bestofk_picked_score")),) if picks else ()))
    console.print(table)
    console.print(f"members' spread on a pair flags the mean's errors: AUROC {_value(block['spread_auroc'])} (0.5: not at all); "
                  f"ECE of the mean {_fmt(block['mean_ece'])}")


def print_rewardbench2(console, block: dict[str, Any]) -> None:
    """RewardBench 2: per subset, the score (best-of-N, or the Ties formula) and the same score of the rulers."""
    dropped = f", {block['rows_dropped']} left out (a completion longer than max_length)" if block["rows_dropped"] else ""
    table = Table(title=f"RewardBench 2: {block['rows']} rows{dropped} (95% intervals)")
    for column, justify in (("subset", "left"), ("rows", "right"), ("score", "right"), ("longest wins", "right"),
                            ("shortest wins", "right"), ("chance", "right")):
        table.add_column(column, justify=justify)
    for name, entry in block["subsets"].items():
        table.add_row(name, str(entry["rows"]), with_interval(entry["score"], entry["interval"]), _value(entry["longest"]),
                      _value(entry["shortest"]), _value(entry["chance"]))
    if block.get("score") is not None:
        table.add_row(f"mean of {len(block['subsets_in_score'])} subsets", "", with_interval(block["score"], block["interval"]), "", "", "")
        worst = block["worst_subset"]
        table.add_row(f"worst: {worst['subset']}", "", with_interval(worst["score"], worst["interval"]), "", "", "")
    console.print(table)


# --------------------------------------------------------------------------------------------------
# Several models


def _count_key(name: str) -> str:
    """The count behind a compared metric: its pairs, lists or RewardBench 2 rows."""
    scope, _, leaf = name.rpartition("/")
    prefix = scope + "/" if scope else ""
    if leaf == "accuracy":
        return prefix + "pairs"
    if leaf == "top1_accuracy" or leaf.startswith("bestofk"):
        return prefix + "lists"
    return prefix + "rows" if scope.startswith("rewardbench2/subsets/") else "rewardbench2/rows" if name == "rewardbench2/score" else ""


def _compared_metric(name: str) -> tuple[str, str]:
    """(scope, metric) of a comparison metric's name, for the table."""
    parts = name.split("/")
    labels = {"accuracy": "accuracy", "top1_accuracy": "top-1", "bestofk_regret": "best-of-K regret", "bestofk_picked_score": "best-of-K picked score",
              "score": "score", "subset_mean": "mean of subsets", "worst_subset": "worst subset", "rewardbench_score": "mean of the 4 sections"}
    if parts[0] == "subsets":
        return parts[1], labels.get(parts[2], parts[2])
    if parts[0] == "sections":
        return f"section {parts[1]}", "score"
    if parts[0] == "rewardbench2":
        if parts[1] == "subsets":
            return f"RB2 {parts[2]}", labels.get(parts[3], parts[3])
        return "RewardBench 2", "mean of subsets" if parts[1] == "score" else "worst subset"
    return "all", labels.get(parts[0], parts[0])


def _baselines_of(name: str, baselines: dict[str, float]) -> list[str]:
    """The rulers beside a compared metric: (longer or longest, shorter or shortest, chance)."""
    scope, _, leaf = name.rpartition("/")
    prefix = scope + "/" if scope else ""
    keys = {"accuracy": ("longer_wins", "shorter_wins", None), "top1_accuracy": ("top1_longest", "top1_shortest", "top1_random"),
            "bestofk_regret": ("bestofk_longest_regret", None, None), "score": ("longest", "shortest", "chance")}.get(leaf)
    if keys is None or (leaf == "score" and not scope.startswith("rewardbench2/subsets/")):
        return ["", "", ""]
    cells = [f"{baselines[prefix + k]:.3f}" if k and baselines.get(prefix + k) is not None else "" for k in keys]
    if leaf == "accuracy":
        cells[2] = "0.5"
    if leaf == "bestofk_regret":
        cells[2] = "1.0"
    return cells


def print_comparison(log: RunLog, title: str, labels: list[str], comparison: dict[str, Any]) -> None:
    """Several models side by side: each metric per model with its 95% interval, each model's difference to the first
    with its paired interval, the exact McNemar p-value (b: pairs only the first gets right, c: only the other), and
    the content-blind rulers on the same rows."""
    if not log.enabled:
        return
    console = log.console
    for label, path in zip(labels, comparison["models"]):
        console.print(f"{label} = {path}", markup=False, highlight=False)
    left_out = ", ".join(f"{label} {n}" for label, n in zip(labels, comparison["rows_left_out"].values()) if n)
    what = f"{comparison['rows']} rows, {comparison['pairs']} pairs" + (f", {comparison['lists']} lists" if comparison["lists"] else "")
    console.print(f"compared on the {what} every model kept" + (f" (rows kept by one model only, left out: {left_out})" if left_out else ""),
                  markup=False, highlight=False)
    table = Table(title=f"{title} (95% intervals; differences paired)")
    columns = ["scope", "metric", "n"] + labels
    for label in labels[1:]:
        columns += [f"{label} - {labels[0]}", f"McNemar p ({labels[0]} only/{label} only)"]
    columns += ["longer", "shorter", "chance"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("scope", "metric") else "right")
    for name, entry in comparison["metrics"].items():
        scope, metric = _compared_metric(name)
        n = comparison["counts"].get(_count_key(name))
        cells = [scope, metric, str(n) if n is not None else ""]
        for i, (value, interval) in enumerate(zip(entry["values"], entry["intervals"])):
            cell = with_interval(value, interval, 3)
            if name.endswith("worst_subset"):
                worst = comparison["worst"][i].get("rewardbench2" if name.startswith("rewardbench2") else "subsets")
                cell += f" {worst}"
            cells.append(cell)
        for i in range(1, len(labels)):
            cells.append(with_interval(entry["differences"][i], entry["difference_intervals"][i], 3))
            test = entry.get("mcnemar")
            cells.append(f"{test[i]['p']:.3g} ({test[i]['first_only']}/{test[i]['other_only']})" if test else "")
        cells += _baselines_of(name, comparison["baselines"])
        table.add_row(*cells)
    console.print(table)


def strict_json(value: Any, indent: int | None = 2) -> str:
    """JSON that every reader accepts: a metric that is not a number (a Spearman of constant rewards) is null, not NaN."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), indent=indent, allow_nan=False)


def write_report(directory: Path, results: dict[str, Any], records: list[dict[str, Any]], list_records: list[dict[str, Any]]) -> None:
    """metrics.json, pairs.jsonl (one line per scored pair, by source row), for ranked lists lists.jsonl (one
    line per list), and the PNG plots."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(strict_json(results) + "\n", encoding="utf-8")
    for name, lines in (("pairs.jsonl", records), ("lists.jsonl", list_records)):
        if lines or name == "pairs.jsonl":
            with (directory / name).open("w", encoding="utf-8") as f:
                for record in lines:
                    f.write(strict_json(record, indent=None) + "\n")
    _plots(directory, results, records)


def _plots(directory: Path, results: dict[str, Any], records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    chosen = [r["chosen_reward"] for r in records]
    rejected = [r["rejected_reward"] for r in records]

    fig, ax = plt.subplots(figsize=(6, 4))
    low, high = min(chosen + rejected), max(chosen + rejected)
    edges = [low + (high - low) * i / 40 for i in range(41)] if high > low else 40
    ax.hist(chosen, bins=edges, alpha=0.6, label=f"chosen (mean {_fmt(results['mean_chosen_reward'])})")
    ax.hist(rejected, bins=edges, alpha=0.6, label=f"rejected (mean {_fmt(results['mean_rejected_reward'])})")
    ax.set_xlabel("reward")
    ax.set_ylabel("pairs")
    ax.set_title(f"rewards, {len(records)} pairs, accuracy {results['accuracy']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "reward_histogram.png", dpi=100)
    plt.close(fig)

    calibration = results["calibration"]
    filled = [b for b in calibration["bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    width = calibration["bins"][0]["high"] - calibration["bins"][0]["low"]
    ax.bar([b["low"] for b in filled], [b["frequency"] for b in filled], width=width, align="edge", alpha=0.5,
           edgecolor="black", label="observed wins per bin")
    ax.plot([b["mean_probability"] for b in filled], [b["frequency"] for b in filled], marker="o", label="bin mean")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted P(win) = sigmoid(margin)")
    ax.set_ylabel("observed frequency of winning")
    ax.set_title(f"reliability, ECE {calibration['ece']:.3f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(directory / "reliability.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["chosen_tokens"] for r in records], chosen, s=8, alpha=0.5, label="chosen")
    ax.scatter([r["rejected_tokens"] for r in records], rejected, s=8, alpha=0.5, label="rejected")
    ax.set_xlabel("response tokens")
    ax.set_ylabel("reward")
    rho = results["length_bias"]["spearman_reward_length"]
    ax.set_title(f"reward vs response length, Spearman {_value(rho)}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "reward_vs_length.png", dpi=100)
    plt.close(fig)
