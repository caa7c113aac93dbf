"""`rmtrain score`: one reward per response (plain text or chat messages), for best-of-n and RL pipelines.

A row is turned into token ids exactly as the same text is in training and `rmtrain eval` (rmtrain.data
row_texts): `prompt + completion` with the tokenizer's special tokens and the EOS appended for decoders,
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


from rmtrain.batching import choose_layout
from rmtrain.budget import inference_tokens_per_forward
from rmtrain.config import DataSource
from rmtrain.data import Group, check_messages, completion_texts, encode_whole_texts
from rmtrain.engine import inference_accelerator
from rmtrain.errors import DataError
from rmtrain.log import RunLog
from rmtrain.model import RewardModel
from rmtrain.saved import folder_kind, load_saved
from rmtrain.scoring import inference_set, iter_rewards
from rmtrain.sources import read_rows
from rmtrain.tokenizer import special_token_frame

# The row shapes `rmtrain score` accepts (without --field), documented in the README.
SHAPES = "'text', 'messages', or 'prompt' with 'completion' (or 'response')"


def score_input(row: dict[str, Any], where: str, field: str | None) -> tuple[Any, Any]:
    """(prompt or None, completion) of one row: strings (standard text) or message lists (chat)."""
    if field is not None:
        if row.get(field) is None:
            raise DataError(f"{where}: missing '{field}' (columns present: {', '.join(sorted(row)) or 'none'}; see --field)")
        return None, row[field]
    completion_key = "completion" if "completion" in row else "response" if "response" in row else None
    found = [k for k in ("text", "messages") if k in row] + (["prompt+" + completion_key] if completion_key else [])
    if len(found) > 1:
        raise DataError(f"{where}: holds {' and '.join(found)}; keep one shape per row or pick a column with --field")
    if not found:
        raise DataError(
            f"{where}: expected {SHAPES} (columns present: {', '.join(sorted(row)) or 'none'}); "
            "rename your column or pick it with --field"
        )
    if completion_key:
        if row.get("prompt") is None:
            raise DataError(f"{where}: '{completion_key}' without 'prompt'; use 'text' for a whole text")
        return row["prompt"], row[completion_key]
    return None, row[found[0]]


def input_text(row: dict[str, Any], where: str, field: str | None, tokenizer, fmt) -> tuple[str, bool]:
    """(text, add_special_tokens) of one row, built by the same code as a training pair's chosen side."""
    prompt, completion = score_input(row, where, field)
    name = field or ("messages" if isinstance(completion, list) else "text" if prompt is None else "completion")
    if isinstance(completion, list):
        if prompt is not None and not isinstance(prompt, list):
            raise DataError(f"{where}: 'prompt' is a string but '{name}' is a message list; use one shape")
        if prompt:
            check_messages(prompt, f"{where}: prompt")
        check_messages(completion, f"{where}: {name}")
    elif isinstance(completion, str):
        if prompt is not None and not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' is a message list but '{name}' is a string; use one shape")
        if not completion.strip():
            raise DataError(f"{where}: empty '{name}'")
    else:
        raise DataError(f"{where}: '{name}' must be a string or a message list, got {type(completion).__name__}")
    texts, add_special = completion_texts(prompt, [completion], where, tokenizer, fmt)
    return texts[0], add_special


def tokenize_inputs(
    rows: list[dict[str, Any]], name: str, field: str | None, rm: RewardModel, max_length: int
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of every row (cut from the left beyond max_length, as `--truncation truncate`) and which were cut."""
    tokenizer, fmt = rm.tokenizer, rm.fmt
    texts = [input_text(row, f"{name}: row {i + 1}", field, tokenizer, fmt) for i, row in enumerate(rows)]
    frame = special_token_frame(tokenizer)
    ids: list[list[int]] = [[] for _ in texts]
    truncated = [False] * len(texts)
    for add_special in (True, False):  # plain text with the tokenizer's special tokens; chat rendered by its template
        chosen = [i for i, (_, flag) in enumerate(texts) if flag is add_special]
        if chosen:
            encoded, cut = encode_whole_texts([texts[i][0] for i in chosen], add_special, tokenizer, fmt, max_length, frame,
                                              [f"{name}: row {i + 1}" for i in chosen])
            for i, seq, was_cut in zip(chosen, encoded, cut):
                ids[i], truncated[i] = seq, was_cut
    return ids, truncated


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
) -> int:
    """`rmtrain score`: every row checked and tokenized before the output is opened; returns the row count.

    Batches hold at most `batch_size` sequences and `max_tokens_per_forward` tokens ("auto": as `rmtrain eval`),
    longest first; each batch's lines are written as it finishes (`in_order`: buffered into input order).
    """
    accelerator = inference_accelerator()
    log = log or RunLog(enabled=accelerator.is_main_process)
    if out != "-" and not Path(out).parent.is_dir():
        raise DataError(f"--out: {out}: folder {Path(out).parent} does not exist; create it or pick another path")
    if out != "-" and Path(out).is_dir():
        raise DataError(f"--out: {out} is a folder; give a file to write the JSON lines to (or - for standard output)")
    folder_kind(Path(model_path))
    rows, name = read_rows(DataSource(path=data_path, split=split))
    if not rows:
        raise DataError(f"{name}: no rows to score")
    rm, trained_max_length = load_saved(model_path)
    max_length = max_length or trained_max_length or 1024
    ids, truncated = tokenize_inputs(rows, name, field, rm, max_length)
    if max_tokens_per_forward == "auto":
        max_tokens_per_forward = inference_tokens_per_forward(rm.model, accelerator.device)
    layout, mask_format, _ = choose_layout(rm, share_prefix=True, padding_free=False)
    model = accelerator.prepare(rm.model)
    groups = [Group(i, [], [seq], []) for i, seq in enumerate(ids)]
    scored = inference_set(accelerator, groups, layout, mask_format, rm.fmt.pad_token_id, batch_size, max_tokens_per_forward)
    waiting: dict[int, str] = {}
    next_row = 0
    with _output(out if accelerator.is_main_process else os.devnull) as handle:
        for keys, rewards in iter_rewards(accelerator, model, rm, scored.loader):
            batch = keys.tolist()
            for i, reward in zip(batch, rewards.tolist()):
                record = {"row": i + 1, "reward": reward, "tokens": len(ids[i])} | ({"truncated": True} if truncated[i] else {})
                waiting[i] = json.dumps(record)
            if not in_order:
                handle.write("".join(waiting[i] + "\n" for i in batch))
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
