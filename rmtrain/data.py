"""Preference rows -> tokenized groups.

A row is standard (`chosen`/`rejected` are strings) or conversational (lists of `{role, content}`
messages), with an explicit `prompt` or an implicit one (shared by chosen and rejected). Standard text
is `prompt + completion` tokenized with the tokenizer's special tokens, plus the EOS token for decoder
models so that the reward is read at the end of the response (as TRL does). Conversational rows are
rendered by the chat template (`prompt + completion` messages) and tokenized without extra specials.

A tokenized row is a `Group`: its sequences' longest common token prefix once, then each completion's
own tokens. A pair is a group of two, chosen first. The prefix is computed here, once; batching,
rewards and diagnostics read it from the group.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from rmtrain.config import DataConfig
from rmtrain.errors import DataError
from rmtrain.sources import read_rows
from rmtrain.tokenizer import TokenFormat, special_token_frame

ROLES = {"system", "user", "assistant", "tool", "developer"}


def common_prefix(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix of `sequences`, each keeping at least its own last token."""
    n = min(len(s) for s in sequences) - 1
    first = sequences[0]
    i = 0
    while i < n and all(s[i] == first[i] for s in sequences[1:]):
        i += 1
    return i


@dataclass
class Group:
    """One row's completions as token ids: the common prefix of its sequences once, then each completion's
    own tokens (never empty, so each keeps its reward token). `pairs` holds (better, worse) completion indices;
    a preference pair is the group ([chosen, rejected], pairs [(0, 1)])."""

    row: int
    """Index of the source row (0-based, counting `skip`ped rows): row + 1 is the file's row number."""
    prefix: list[int]
    completions: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float] | None = None
    """One per pair, or None."""

    @classmethod
    def of(cls, row: int, sequences: list[list[int]], pairs: list[tuple[int, int]], margins: list[float] | None = None) -> "Group":
        n = common_prefix(sequences) if len(sequences) > 1 else 0
        return cls(row, sequences[0][:n], [s[n:] for s in sequences], pairs, margins)

    def sequence(self, i: int) -> list[int]:
        return self.prefix + self.completions[i]

    def lengths(self) -> list[int]:
        return [len(self.prefix) + len(c) for c in self.completions]


@dataclass
class Preflight:
    """What happened to the rows of one split, for the pre-flight line."""

    name: str
    read: int = 0
    kept: int = 0
    too_long: int = 0
    truncated: int = 0
    identical: int = 0
    longest: int = 0
    """Tokens of the longest sequence read, before filtering or truncation."""
    lengths: list[int] = field(default_factory=list)

    def line(self, truncation: str, max_length: int) -> str:
        parts = [f"{self.name}: {self.read} pairs read, {self.kept} kept"]
        if truncation == "filter":
            parts.append(f"{self.too_long} dropped (longer than {max_length} tokens)")
        else:
            parts.append(f"{self.truncated} truncated to {max_length} tokens")
        parts.append(f"{self.identical} dropped (chosen == rejected)")
        if self.lengths:
            ordered = sorted(self.lengths)
            pct = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
            parts.append(f"tokens/sequence p50 {pct(0.5)} p90 {pct(0.9)} p99 {pct(0.99)} max {ordered[-1]}")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Rows -> texts


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def check_messages(messages: Any, where: str) -> None:
    if not messages:
        raise DataError(f"{where}: empty message list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            if isinstance(message, dict):
                got = f"keys {', '.join(sorted(message))}" if message else "no keys"
            else:
                got = type(message).__name__
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {got}")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role '{message['role']}' (expected one of {', '.join(sorted(ROLES))})")


def check_row(row: dict[str, Any], where: str) -> None:
    """What can be checked without a tokenizer: columns present, one shape, messages well formed, no empty text."""
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            present = ", ".join(sorted(row)) or "none"
            raise DataError(f"{where}: missing '{key}' (columns present: {present}; map yours with data.*.columns)")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    shapes = {_is_messages(chosen), _is_messages(rejected)} | ({_is_messages(prompt)} if prompt is not None else set())
    if len(shapes) > 1:
        raise DataError(f"{where}: mixes plain strings and message lists in prompt/chosen/rejected")
    if _is_messages(chosen):
        for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if key != "prompt" or value:
                check_messages(value, f"{where}: {key}")
        return
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string or a message list, got {type(value).__name__}")
    if not chosen.strip() or not rejected.strip():
        raise DataError(
            f"{where}: empty {'chosen' if not chosen.strip() else 'rejected'} text; fill it in or remove the row"
        )


def row_texts(row: dict[str, Any], where: str, tokenizer, fmt: TokenFormat) -> tuple[str, str, bool]:
    """(chosen_text, rejected_text, add_special_tokens) for one row."""
    check_row(row, where)
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if _is_messages(chosen):
        prompt = prompt or []
        if not tokenizer.chat_template:
            raise DataError(
                f"{where}: conversational rows need a chat template, and the tokenizer has none; "
                "set model.chat_template_path to a Jinja file or a tokenizer folder"
            )
        render = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False)  # noqa: E731
        return render(prompt + chosen), render(prompt + rejected), False
    prompt = prompt or ""
    chosen, rejected = prompt + chosen, prompt + rejected
    if fmt.append_eos:
        chosen = chosen if chosen.endswith(fmt.append_eos) else chosen + fmt.append_eos
        rejected = rejected if rejected.endswith(fmt.append_eos) else rejected + fmt.append_eos
    return chosen, rejected, True


def row_margin(row: dict[str, Any], where: str) -> float | None:
    if "margin" not in row:
        return None
    value = row["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(
            f"{where}: 'margin' must be a finite number, got {value!r}; fix the value, "
            "or train without margins with data.*.columns: {margin: null}"
        )
    return float(value)


def row_margins(rows: list[dict[str, Any]], name: str, row_offset: int = 0) -> list[float | None]:
    margins = [row_margin(row, f"{name}: row {index + 1 + row_offset}") for index, row in enumerate(rows)]
    has_margin = [m is not None for m in margins]
    if any(has_margin) and not all(has_margin):
        missing = has_margin.index(False) + 1 + row_offset
        raise DataError(f"{name}: row {missing}: 'margin' missing while other rows have it")
    return margins


def check_rows(rows: list[dict[str, Any]], name: str, row_offset: int = 0) -> None:
    check_single_shape(rows, name, row_offset)
    for index, row in enumerate(rows):
        check_row(row, f"{name}: row {index + 1 + row_offset}")
    row_margins(rows, name, row_offset)


# --------------------------------------------------------------------------------------------------
# Tokenizing, truncating, filtering


def truncate_left(ids: list[int], max_length: int, head: int, tail: int) -> list[int]:
    """Keep the last tokens of the body (prompt is cut first, then the start of the completion).

    Leading and trailing special tokens (BOS/CLS, SEP) stay, so the reward token is still the end of the
    response and encoders keep the token they pool.
    """
    if len(ids) <= max_length:
        return ids
    body = ids[head : len(ids) - tail]
    keep = max_length - head - tail
    return ids[:head] + body[len(body) - keep :] + ids[len(ids) - tail :]


def tokenize_pairs(
    rows: list[dict[str, Any]],
    name: str,
    tokenizer,
    fmt: TokenFormat,
    max_length: int,
    truncation: str,
    num_proc: int | None = None,
    row_offset: int = 0,
) -> tuple[list[Group], Preflight]:
    """Tokenized pairs (groups of two: chosen, rejected) and what was dropped on the way."""
    stats = Preflight(name=name, read=len(rows))
    texts = [row_texts(row, f"{name}: row {index + 1 + row_offset}", tokenizer, fmt) for index, row in enumerate(rows)]
    margins = row_margins(rows, name, row_offset)
    chosen_ids, rejected_ids = _tokenize(texts, tokenizer, num_proc)
    head, tail = special_token_frame(tokenizer)
    groups = []
    for index, (chosen, rejected, (_, _, add_special)) in enumerate(zip(chosen_ids, rejected_ids, texts)):
        stats.longest = max(stats.longest, len(chosen), len(rejected))
        if chosen == rejected:
            stats.identical += 1
            continue
        if len(chosen) > max_length or len(rejected) > max_length:
            if truncation == "filter":
                stats.too_long += 1
                continue
            h, t = (head, tail) if add_special else (0, 0)
            chosen, rejected = truncate_left(chosen, max_length, h, t), truncate_left(rejected, max_length, h, t)
            stats.truncated += 1
            if chosen == rejected:
                stats.identical += 1
                continue
        check_no_pad(chosen + rejected, fmt, tokenizer, f"{name}: row {index + 1 + row_offset}")
        margin = None if margins[index] is None else [margins[index]]
        groups.append(Group.of(index + row_offset, [chosen, rejected], [(0, 1)], margin))
        stats.lengths.extend((len(chosen), len(rejected)))
    stats.kept = len(groups)
    return groups, stats


def token_ids(groups: list[Group], pad_token_id: int) -> list[int]:
    """Every token id the groups hold, and the pad id (what a training batch can contain), sorted."""
    ids = {pad_token_id}
    for g in groups:
        ids.update(g.prefix)
        for completion in g.completions:
            ids.update(completion)
    return sorted(ids)


def check_no_pad(ids: list[int], fmt: TokenFormat, tokenizer, where: str) -> None:
    if not fmt.is_encoder and fmt.pad_token_id in ids:
        pad = tokenizer.convert_ids_to_tokens(fmt.pad_token_id)
        raise DataError(
            f"{where}: contains the pad token {pad!r}, which would hide the reward token from transformers' "
            "last-non-pad pooling; set model.pad_token to a token your data never uses, or remove it from the row"
        )


def _tokenize(texts: list[tuple[str, str, bool]], tokenizer, num_proc: int | None) -> tuple[list, list]:
    import datasets

    if not texts:  # an empty table maps to no columns at all
        return [], []
    # One shape per file (check_single_shape), so one add_special_tokens flag for all rows.
    add_special = texts[0][2] if texts else True
    table = datasets.Dataset.from_dict({"chosen": [t[0] for t in texts], "rejected": [t[1] for t in texts]})

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return {
            f"{key}_ids": tokenizer(batch[key], add_special_tokens=add_special)["input_ids"]
            for key in ("chosen", "rejected")
        }

    encoded = table.map(
        encode,
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        remove_columns=table.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
    )
    return encoded["chosen_ids"], encoded["rejected_ids"]


def check_single_shape(rows: list[dict[str, Any]], name: str, row_offset: int = 0) -> None:
    """One file must hold one shape: all plain strings or all message lists."""
    first = None
    for index, row in enumerate(rows):
        value = row.get("chosen")
        if value is None:
            continue
        shape = "conversational (message lists)" if _is_messages(value) else "standard (strings)"
        if first is None:
            first = (shape, index)
        elif shape != first[0]:
            raise DataError(
                f"{name}: row {index + 1 + row_offset}: is {shape} but row {first[1] + 1 + row_offset} is {first[0]}; "
                "use one shape per file"
            )


def read_splits(data: DataConfig) -> dict[str, tuple[list[dict[str, Any]], str]]:
    """Rows and name of data.train and data.eval, read and checked as far as possible without a tokenizer,
    so that a bad file fails before a model is loaded."""
    splits = {}
    for split in ("train", "eval"):
        source = getattr(data, split)
        if source is not None:
            rows, name = read_rows(source)
            if not rows:
                raise DataError(f"{split} ({name}): no rows to read; check data.{split}.path, where, skip and limit")
            check_rows(rows, name, source.skip)
            splits[split] = (rows, name)
    return splits


def load_pairs(
    data: DataConfig, tokenizer, fmt: TokenFormat, seed: int, splits: dict | None = None
) -> tuple[list[Group], list[Group] | None, list[Preflight]]:
    """Train and eval pairs for a recipe (rows from read_splits), and their pre-flight statistics."""
    assert data.train is not None
    splits = splits if splits is not None else read_splits(data)
    rows, name = splits["train"]
    train, train_stats = tokenize_pairs(
        rows, name, tokenizer, fmt, data.max_length, data.truncation, data.num_proc, data.train.skip
    )
    stats = [train_stats]
    train_stats.name = f"train ({name})"
    eval_pairs = None
    if data.eval is not None:
        rows, name = splits["eval"]
        eval_pairs, eval_stats = tokenize_pairs(
            rows, name, tokenizer, fmt, data.max_length, data.truncation, data.num_proc, data.eval.skip
        )
        eval_stats.name = f"eval ({name})"
        stats.append(eval_stats)
    elif data.eval_fraction:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(train) * data.eval_fraction))
        held_out = set(order[:n_eval])
        eval_pairs = [p for i, p in enumerate(train) if i in held_out]
        train = [p for i, p in enumerate(train) if i not in held_out]
        train_stats.name += f", {len(eval_pairs)} held out for eval"
    if not train:
        raise DataError(_nothing_left(stats[0], data, "train"))
    if eval_pairs is not None and not eval_pairs:
        raise DataError(_nothing_left(stats[-1], data, "eval"))
    return train, eval_pairs, stats


def _nothing_left(stats: Preflight, data: DataConfig, split: str) -> str:
    if stats.too_long and stats.too_long + stats.identical == stats.read:
        return (
            f"{stats.name}: every pair is longer than data.max_length={data.max_length} "
            f"(the longest sequence has {stats.longest:,} tokens); set data.truncation: truncate, "
            "or raise data.max_length"
        )
    if stats.identical == stats.read:
        return (
            f"{stats.name}: every pair has chosen identical to rejected ({stats.read} read, all dropped); "
            "such pairs teach nothing: check the chosen/rejected columns"
        )
    return (
        f"{stats.name}: no {split} pairs left ({stats.read} read, {stats.identical} dropped as chosen == rejected, "
        f"{stats.too_long} longer than data.max_length={data.max_length})"
    )
