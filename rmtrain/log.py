"""Rich console (progress bar with ETA, metric lines and tables) and the metrics.jsonl file.

Only the main process writes; other processes get a logger whose methods do nothing.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

METRIC_ORDER = ["loss", "accuracy", "margin", "mean_reward", "std_reward", "min_reward", "max_reward"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def _summary(values: dict[str, Any]) -> str:
    """A console line short enough for a terminal; metrics.jsonl has every value."""
    parts = [f"loss {values['loss']:.4f}", f"acc {values['accuracy']:.3f}", f"margin {_fmt(values['margin'])}"]
    if values.get("top1_accuracy") is not None:
        parts.append(f"top-1 {values['top1_accuracy']:.3f}")
    parts.append(f"reward {_fmt(values['mean_reward'])} [{_fmt(values['min_reward'])}, {_fmt(values['max_reward'])}]")
    if "learning_rate" in values:
        parts.append(f"lr {values['learning_rate']:.2e}")
    if "pairs_per_s" in values:
        parts.append(f"{values['pairs_per_s']:.1f} pairs/s")
    if "lists_per_s" in values:
        parts.append(f"{values['lists_per_s']:.2f} lists/s")
    if "computed_tokens_per_real" in values:
        parts.append(f"computed/real tokens {values['computed_tokens_per_real']:.2f}")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    elif "gflops_per_s" in values:
        parts.append(f"{values['gflops_per_s']:.1f} GFLOP/s")
    return "  ".join(parts)


class RunLog:
    def __init__(self, metrics_file: Path | None = None, enabled: bool = True, console: Console | None = None, trackers=None):
        self.enabled = enabled
        self.trackers = trackers
        """An Accelerator whose trackers get every record's numbers too (`train.report_to`)."""
        self.console = console or Console(file=sys.stderr, highlight=False)
        self.metrics_file = metrics_file
        self.progress: Progress | None = None
        self.task = None

    # plain lines -------------------------------------------------------------------------------
    def info(self, message: str | None) -> None:
        if self.enabled and message:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"warning: {message}", style="yellow", markup=False)

    # progress ----------------------------------------------------------------------------------
    def start_progress(self, total: int, completed: int = 0, description: str = "train") -> None:
        if not self.enabled:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, completed=completed)

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, steps)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    # metrics -----------------------------------------------------------------------------------
    def metrics(self, split: str, step: int, values: dict[str, Any]) -> None:
        """One record: a console line and a metrics.jsonl row."""
        if not self.enabled:
            return
        record = {"split": split, "step": step, **values}
        if self.metrics_file is not None:
            with self.metrics_file.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
        if self.trackers is not None:  # the same numbers at the same step: "train/loss", "eval/by_source/x/accuracy"
            self.trackers.log(_numbers(values, f"{split}/"), step=step)
        self.console.print(f"[{split} step {step}] {_summary(values)}", markup=False, highlight=False)

    def table(self, title: str, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in [k for k in METRIC_ORDER if k in values] + [k for k in values if k not in METRIC_ORDER]:
            table.add_row(key, _fmt(values[key]))
        self.console.print(table)


def _numbers(values: dict[str, Any], prefix: str) -> dict[str, float]:
    numbers: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            numbers |= _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[f"{prefix}{key}"] = value
    return numbers


class Throughput:
    """Training-only time and token counts (evaluation and checkpointing are paused out)."""

    def __init__(self, lists: bool = False, peak_flops: float | None = None) -> None:
        self.window = {"seconds": 0.0, "pairs": 0, "real_tokens": 0, "computed_tokens": 0, "flops": 0.0}
        if lists:  # training on ranked lists also counts lists and completions
            self.window |= {"lists": 0, "completions": 0}
        self.total = dict(self.window)
        self.peak_flops = peak_flops
        """All processes' peak FLOP/s (a GPU's from rmtrain.flops times their number), for MFU; None on a CPU."""
        self._since: float | None = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.window["seconds"] += time.perf_counter() - self._since
            self._since = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and checkpointing inside the loop do not count as training time."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def add(self, pairs: int, real_tokens: int, computed_tokens: int, lists: int = 0, completions: int = 0, flops: float = 0.0) -> None:
        for key, value in (("pairs", pairs), ("real_tokens", real_tokens), ("computed_tokens", computed_tokens),
                           ("lists", lists), ("completions", completions), ("flops", flops)):
            if key in self.window:
                self.window[key] += value

    def take_window(self) -> dict[str, float]:
        """Rates since the last call (the clock keeps running), folded into the run totals."""
        running = self._since is not None
        self.pause()
        w = self.window
        for key in w:
            self.total[key] += w[key]
        rates = _rates(w, self.peak_flops)
        self.window = {k: 0 if k not in ("seconds", "flops") else 0.0 for k in w}
        if running:
            self.resume()
        return rates

    def totals(self) -> dict[str, float]:
        return {**self.total, **_rates(self.total, self.peak_flops)}


def _rates(counts: dict[str, float], peak_flops: float | None = None) -> dict[str, float]:
    seconds = max(counts["seconds"], 1e-9)
    rates = {
        "pairs_per_s": counts["pairs"] / seconds,
        "tokens_per_s": counts["real_tokens"] / seconds,
        "computed_tokens_per_real": counts["computed_tokens"] / max(counts["real_tokens"], 1),
        # Model FLOPs (rmtrain.flops: padding and recomputation left out) per second, and as a share of the peak.
        "gflops_per_s": counts["flops"] / seconds / 1e9,
    }
    if peak_flops:
        rates["mfu"] = counts["flops"] / seconds / peak_flops
    for key in ("lists", "completions"):
        if key in counts:
            rates[f"{key}_per_s"] = counts[key] / seconds
    return rates


def truncate_metrics_file(path: Path, after_step: int) -> None:
    """On resume, drop records written after the checkpoint so the file reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("step", math.inf) <= after_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
