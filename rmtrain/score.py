"""`rmtrain score`: one reward per response (plain text or chat messages), for best-of-n and RL pipelines.

A row is turned into token ids exactly as the same text is in training and `rmtrain eval` (rmtrain.groups
completion_texts): `prompt + completion` with the tokenizer's special tokens and the EOS appended for decoders,
or the chat template for message lists. Rows are scored longest first in batches of similar length, and
each batch's lines are written as soon as it finishes.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

from rmtrain.aggregate import Aggregate, read
from rmtrain.config import DataSource
from rmtrain.errors import DataError
from rmtrain.groups import Group, scoring_ids
from rmtrain.inference import inference_set, prepare_inference, rewards_of_batch, score_batches
from rmtrain.log import RunLog
from rmtrain.rows import score_input
from rmtrain.saved import SavedText, folder_kind, load_saved, load_saved_text, scoring_max_length
from rmtrain.sources import read_rows


def tokenize_inputs(rows: list[dict[str, Any]], name: str, field: str | None, text: SavedText, max_length: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of every row (cut from the left beyond max_length, as `--truncation truncate`) and which were cut."""
    requests = []
    for i, row in enumerate(rows):
        where = f"{name}: row {i + 1}"
        prompt, completion = score_input(row, where, field)
        requests.append((prompt, [completion], where))
    encoded = scoring_ids(requests, text.tokenizer, text.fmt, max_length)
    return [ids[0] for ids, _ in encoded], [cut[0] for _, cut in encoded]


@contextmanager
def _output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as handle:
        yield handle


def run_score(
    model_path: str,
    data_path: str,
    out: str = "-",
    field: str | None = None,
    split: str = "train",
    max_length: int | None = None,
    batch_size: int = 16,
    in_order: bool = False,
    log: RunLog | None = None,
    max_tokens_per_forward: int | str | None = "auto",
    aggregate: Aggregate = Aggregate(),
) -> int:
    """`rmtrain score`: every row checked and tokenized before the output is opened; returns the row count.

    Batches hold at most `batch_size` sequences and `max_tokens_per_forward` tokens ("auto": as `rmtrain eval`),
    longest first; each batch's lines are written as it finishes (`in_order`: buffered into input order). An ensemble's
    rows carry `reward` (the `aggregate`), `reward_mean`, `reward_std` and `rewards` (each member's).
    """
    if out != "-" and not Path(out).parent.is_dir():
        raise DataError(f"--out: {out}: folder {Path(out).parent} does not exist; create it or pick another path")
    if out != "-" and Path(out).is_dir():
        raise DataError(f"--out: {out} is a folder; give a file to write the JSON lines to (or - for standard output)")
    folder_kind(Path(model_path))
    rows, name = read_rows(DataSource(path=data_path, split=split))
    if not rows:
        raise DataError(f"{name}: no rows to score")
    text = load_saved_text(model_path)
    max_length = scoring_max_length(max_length, text.max_length)
    ids, truncated = tokenize_inputs(rows, name, field, text, max_length)  # every row, before the weights load
    rm, _ = load_saved(model_path, text=text)
    inference = prepare_inference(rm, max_tokens_per_forward, batch_size, aggregate=aggregate)
    log = log or RunLog(enabled=inference.accelerator.is_main_process)
    scored = inference_set(inference, [Group(i, [], [seq], []) for i, seq in enumerate(ids)])
    waiting: dict[int, str] = {}
    next_row = 0
    with _output(out if inference.accelerator.is_main_process else os.devnull) as handle:
        for batch in score_batches(inference, scored.loader):
            keys = batch.keys.tolist()
            reading = read(inference.aggregate, rewards_of_batch(inference, batch))
            for at, i in enumerate(keys):
                record = {"row": i + 1} | reading.fields(at) | {"tokens": len(ids[i])} | ({"truncated": True} if truncated[i] else {})
                waiting[i] = json.dumps(record)
            if not in_order:
                handle.write("".join(waiting[i] + "\n" for i in keys))
                waiting.clear()
            while next_row in waiting:
                handle.write(waiting.pop(next_row) + "\n")
                next_row += 1
            handle.flush()
    cut = sum(truncated)
    log.info(
        f"score: {len(rows)} rows of {name} scored"
        + (f", {cut} cut to their last {max_length} tokens" if cut else "")
        + ("" if out == "-" else f", written to {Path(out)}")
    )
    return len(rows)
