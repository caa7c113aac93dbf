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
    """The scalar metrics of the main table, with the headline diagnostics."""
    values = {k: v for k, v in results.items() if not isinstance(v, (dict, list, str)) and k != "rewardbench_score"}
    values["ece"] = results["calibration"]["ece"]
    values["spearman_reward_length"] = results["length_bias"]["spearman_reward_length"]
    return values


def print_results(log: RunLog, title: str, results: dict[str, Any]) -> None:
    if not log.enabled:
        return
    log.table(title, summary_values(results))
    console = log.console

    if "subsets" in results:
        section_of = {}
        from rmtrain.diagnostics import REWARDBENCH_SECTIONS

        for section, counts in REWARDBENCH_SECTIONS.items():
            section_of.update({s: section for s in counts})
        lists = "num_lists" in results
        table = Table(title=f"accuracy per {results['subset_field']}")
        columns = [("subset", "left"), ("pairs", "right"), ("accuracy", "right")]
        columns += [("lists", "right"), ("top-1", "right"), ("Kendall tau", "right")] if lists else []
        for column, justify in columns + [("section", "left")]:
            table.add_column(column, justify=justify)
        for subset, entry in results["subsets"].items():
            cells = [subset, str(entry["pairs"]), _fmt(entry["accuracy"])]
            if lists:
                cells += [str(entry.get("num_lists", 0)), _value(entry.get("top1_accuracy")), _value(entry.get("mean_kendall_tau"))]
            table.add_row(*cells, section_of.get(subset, "-"))
        console.print(table)
    if results.get("sections"):
        table = Table(title="RewardBench sections")
        table.add_column("section")
        table.add_column("score", justify="right")
        for section, score in results["sections"].items():
            table.add_row(section, _fmt(score))
        if results.get("rewardbench_score") is not None:
            table.add_row("mean of the 4 sections", _fmt(results["rewardbench_score"]))
        console.print(table)

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
