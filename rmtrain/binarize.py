"""`rmtrain binarize`: ranked-list rows -> preference-pair rows, so list training can be compared with the
pair datasets people ship (one best-versus-worst pair per prompt, or every pair)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rmtrain.config import DataSource
from rmtrain.rows import check_rows, list_scores, row_kind
from rmtrain.errors import DataError
from rmtrain.log import RunLog
from rmtrain.sources import read_rows

STRATEGIES = ("all", "best-worst", "best-rest")


def list_pairs(scores: list[float], strategy: str) -> list[tuple[int, int]]:
    """(better, worse) completion indices of one list. all: every pair with different scores; best-worst: the
    first best against the first worst; best-rest: the first best against every completion scored below it."""
    best, worst = max(scores), min(scores)
    if best == worst:
        return []
    if strategy == "all":
        return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]
    top = scores.index(best)
    if strategy == "best-worst":
        return [(top, scores.index(worst))]
    return [(top, j) for j in range(len(scores)) if scores[j] < best]


def pair_rows(row: dict[str, Any], where: str, strategy: str) -> list[dict[str, Any]]:
    """The pair rows of one list row: prompt, chosen, rejected, their scores, and the row's other columns."""
    scores = list_scores(row, where)
    kept = {k: v for k, v in row.items() if k not in ("completions", "scores", "ranks", "prompt")}
    prompt = {"prompt": row["prompt"]} if row.get("prompt") is not None else {}
    return [
        kept | prompt | {"chosen": row["completions"][i], "rejected": row["completions"][j], "score_chosen": scores[i], "score_rejected": scores[j]}
        for i, j in list_pairs(scores, strategy)
    ]


def binarize(lists_path: str, out_path: str, strategy: str, overwrite: bool = False, split: str = "train", log: RunLog | None = None) -> int:
    """Write the pairs of every list of `lists_path` to `out_path` (JSON lines); returns the pair count.

    `ranks` are written as scores (-rank), so `score_chosen > score_rejected` holds for every pair.
    """
    log = log or RunLog()
    if strategy not in STRATEGIES:
        raise DataError(f"--pairs: expected {', '.join(STRATEGIES)}, got {strategy!r}")
    out = Path(out_path)
    if out.exists() and not overwrite:
        raise DataError(f"{out}: exists; pass --overwrite to replace it, or choose another file")
    if not out.parent.is_dir():
        raise DataError(f"{out}: folder {out.parent} does not exist; create it or pick another path")
    rows, name = read_rows(DataSource(path=lists_path, split=split))
    if not rows:
        raise DataError(f"{name}: no rows to binarize")
    if row_kind(rows[0]) != "lists":
        raise DataError(f"{name}: row 1: holds a pair, not a list ('completions' with 'scores' or 'ranks'); it is binarized already")
    check_rows(rows, name)
    pairs = [p for i, row in enumerate(rows) for p in pair_rows(row, f"{name}: row {i + 1}", strategy)]
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(f"binarize: {len(rows)} lists of {name} -> {len(pairs)} pairs ({strategy}), written to {out}")
    return len(pairs)
