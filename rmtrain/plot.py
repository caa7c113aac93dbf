"""`rmtrain plot`: training curves of one or more runs from their metrics.jsonl (a sweep at a glance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmtrain.errors import DataError

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
"""What `--out` may be: formats matplotlib writes without extra packages."""
PANELS = (("loss", "loss (Bradley-Terry)"), ("accuracy", "accuracy"), ("margin", "margin (chosen - rejected)"))


def read_metrics(run: Path) -> dict[str, list[dict[str, Any]]]:
    """{"train": [...], "eval": [...]} records of a run folder (or of a metrics.jsonl file)."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise DataError(f"{run}: no metrics.jsonl (is it an rmtrain run folder?)")
    records: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if record.get("split") in records and "step" in record:
            records[record["split"]].append(record)
    if not records["train"] and not records["eval"]:
        raise DataError(f"{path}: holds no train or eval record to plot")
    return records


def run_label(run: Path, others: list[Path]) -> str:
    """The shortest name that tells the runs apart: the folder name, or its parent/name when names repeat."""
    name = run.name if run.is_dir() else run.parent.name
    if sum((o.name if o.is_dir() else o.parent.name) == name for o in others) > 1:
        return f"{run.parent.name}/{name}"
    return name


def plot_runs(runs: list[Path], out: Path) -> Path:
    """One image: train (lines) and eval (markers) loss, accuracy and margin against step, one colour per run."""
    if out.suffix.lower() not in IMAGE_SUFFIXES or out.is_dir():
        raise DataError(f"--out: {out}: expected an image file ending in {', '.join(IMAGE_SUFFIXES)}")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    data = [(run_label(run, runs), read_metrics(run)) for run in runs]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(data):
        colour = colours[i % len(colours)]
        for ax, (key, title) in zip(axes, PANELS):
            train = [(r["step"], r[key]) for r in records["train"] if r.get(key) is not None]
            evals = [(r["step"], r[key]) for r in records["eval"] if r.get(key) is not None]
            if train:
                ax.plot(*zip(*train), color=colour, label=f"{label} train")
            if evals:
                ax.plot(*zip(*evals), color=colour, marker="o", linestyle="--", label=f"{label} eval")
            ax.set_title(title)
            ax.set_xlabel("step")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
