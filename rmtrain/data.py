"""Preference rows -> tokenized groups.

A row is a pair (`chosen`/`rejected`) or a ranked list (`completions` with `scores`, higher is better, or
`ranks`, 1 is best), standard (strings) or conversational (lists of `{role, content}` messages), with an
explicit `prompt` or an implicit one (shared by the completions). Standard text is `prompt + completion`
tokenized with the tokenizer's special tokens, plus the EOS token for decoder models so that the reward is
read at the end of the response (as TRL does). Conversational rows are rendered by the chat template
(`prompt + completion` messages) and tokenized without extra specials. One file holds one shape.

A tokenized row is a `Group`: its sequences' longest common token prefix once, then each completion's own
tokens, and the (better, worse) pairs its scores imply (equal scores give none). A pair is a group of two,
chosen first. The prefix is computed here, once; batching, rewards and diagnostics read it from the group.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rmtrain.config import DataConfig, DataSource, sources
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
    """The data's `margin` column, one per pair (pair files), or None."""
    scores: list[float] | None = None
    """One per completion, higher is better (lists; ranks are stored as -rank), or None (pairs)."""
    source: int = 0
    """Which of data.train's (or data.eval's) sources the row comes from."""
    uid: int = -1
    """This group's number in the set it belongs to (a row drawn twice by a mixture is two groups); -1: its row."""

    @classmethod
    def of(
        cls,
        row: int,
        sequences: list[list[int]],
        pairs: list[tuple[int, int]],
        margins: list[float] | None = None,
        scores: list[float] | None = None,
    ) -> "Group":
        n = common_prefix(sequences) if len(sequences) > 1 else 0
        return cls(row, sequences[0][:n], [s[n:] for s in sequences], pairs, margins, scores)

    def chunk(self, indices: list[int]) -> "Group":
        """The same prefix with the completions at `indices` (in that order), and the pairs among them."""
        where = {i: j for j, i in enumerate(indices)}
        pairs = [(where[a], where[b]) for a, b in self.pairs if a in where and b in where]
        scores = [self.scores[i] for i in indices] if self.scores is not None else None
        return Group(self.row, self.prefix, [self.completions[i] for i in indices], pairs, None, scores, self.source, self.uid)

    @property
    def key(self) -> int:
        return self.uid if self.uid >= 0 else self.row

    def sequence(self, i: int) -> list[int]:
        return self.prefix + self.completions[i]

    def lengths(self) -> list[int]:
        return [len(self.prefix) + len(c) for c in self.completions]


@dataclass
class Preflight:
    """What happened to the rows of one split, for the pre-flight line."""

    name: str
    kind: str = "pairs"
    """"pairs" or "lists": what the file's rows are."""
    read: int = 0
    kept: int = 0
    too_long: int = 0
    """Pairs dropped, or (lists) completions dropped, for being longer than max_length."""
    truncated: int = 0
    identical: int = 0
    """Pairs dropped as chosen == rejected, or (lists) pairs between identical completions."""
    completions: int = 0
    """Lists: completions read."""
    completions_kept: int = 0
    pairs: int = 0
    """Lists: pairs the kept completions imply."""
    tied: int = 0
    """Lists: pairs of completions with equal scores (they imply no pair)."""
    longest: int = 0
    """Tokens of the longest sequence read, before filtering or truncation."""
    lengths: list[int] = field(default_factory=list)

    def line(self, truncation: str, max_length: int) -> str:
        if self.kind == "lists":
            cut = (f"{self.too_long} dropped (longer than {max_length} tokens)" if truncation == "filter"
                   else f"{self.truncated} truncated to {max_length} tokens")
            parts = [
                f"{self.name}: {self.read} lists read, {self.kept} kept",
                f"{self.completions_kept:,} of {self.completions:,} completions ({cut})",
                f"{self.pairs:,} pairs implied ({self.tied:,} tied pairs give none, {self.identical} between identical completions)",
            ]
        else:
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


def row_kind(row: dict[str, Any]) -> str:
    return "lists" if "completions" in row else "pairs"


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


def _check_texts(prompt: Any, completions: list[tuple[str, Any]], where: str) -> None:
    """A prompt (or None) and named completions: all strings or all message lists, well formed, none empty."""
    shapes = {_is_messages(value) for _, value in completions} | ({_is_messages(prompt)} if prompt is not None else set())
    if len(shapes) > 1:
        names = "/".join(["prompt"] * (prompt is not None) + [name.split("[")[0] for name, _ in completions[:2]])
        raise DataError(f"{where}: mixes plain strings and message lists in {names}")
    if _is_messages(completions[0][1]):
        if prompt:
            check_messages(prompt, f"{where}: prompt")
        for name, value in completions:
            check_messages(value, f"{where}: {name}")
        return
    for name, value in [("prompt", prompt), *completions]:
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: '{name}' must be a string or a message list, got {type(value).__name__}")
    for name, value in completions:
        if not value.strip():
            raise DataError(f"{where}: empty {name} text; fill it in or remove the row")


def check_row(row: dict[str, Any], where: str) -> None:
    """What can be checked without a tokenizer: columns present, one shape, messages well formed, no empty text."""
    if row_kind(row) == "lists":
        list_scores(row, where)
        _check_texts(row.get("prompt"), [(f"completions[{i}]", c) for i, c in enumerate(row["completions"])], where)
        return
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            present = ", ".join(sorted(row)) or "none"
            raise DataError(f"{where}: missing '{key}' (columns present: {present}; map yours with data.*.columns)")
    _check_texts(row.get("prompt"), [("chosen", row["chosen"]), ("rejected", row["rejected"])], where)


def list_scores(row: dict[str, Any], where: str) -> list[float]:
    """A list row's scores (higher is better), from `scores` or from `ranks` (1 is best: score -rank)."""
    completions = row["completions"]
    if not isinstance(completions, list) or len(completions) < 2:
        got = f"{len(completions)} item(s)" if isinstance(completions, list) else type(completions).__name__
        raise DataError(f"{where}: 'completions' must be a list of at least 2 completions, got {got}")
    given = [key for key in ("scores", "ranks") if row.get(key) is not None]
    if len(given) != 1:
        what = "both 'scores' and 'ranks'; keep one" if given else "no 'scores' (higher is better) or 'ranks' (1 is best)"
        raise DataError(f"{where}: a list row needs one of 'scores' or 'ranks', it has {what} (map yours with data.*.columns)")
    key = given[0]
    values = row[key]
    if not isinstance(values, list) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise DataError(f"{where}: '{key}' must hold one value per completion ({len(completions)}), got {got}")
    for i, value in enumerate(values):
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if key == "ranks" and not (number and float(value).is_integer() and value >= 1):
            raise DataError(f"{where}: ranks[{i}] must be a whole number >= 1 (1 is best), got {value!r}")
        if not number:
            raise DataError(f"{where}: scores[{i}] must be a finite number, got {value!r}")
    return [float(v) for v in values] if key == "scores" else [-float(v) for v in values]


def completion_texts(prompt: Any, completions: list[Any], where: str, tokenizer, fmt: TokenFormat) -> tuple[list[str], bool]:
    """(texts, add_special_tokens): `prompt + completion` for each completion, as the model reads it."""
    if _is_messages(completions[0]):
        if not tokenizer.chat_template:
            raise DataError(
                f"{where}: conversational rows need a chat template, and the tokenizer has none; "
                "set model.chat_template_path to a Jinja file or a tokenizer folder"
            )
        from jinja2 import TemplateError

        try:
            return [tokenizer.apply_chat_template((prompt or []) + c, tokenize=False) for c in completions], False
        except TemplateError as error:  # e.g. the template's own raise_exception("roles must alternate ...")
            raise DataError(f"{where}: the chat template refused these messages: {error}") from None
    texts = [(prompt or "") + c for c in completions]
    if fmt.append_eos:
        texts = [t if t.endswith(fmt.append_eos) else t + fmt.append_eos for t in texts]
    return texts, True


def row_texts(row: dict[str, Any], where: str, tokenizer, fmt: TokenFormat) -> tuple[list[str], bool]:
    """(texts of the row's completions: chosen and rejected, or the list's, add_special_tokens) for one row."""
    check_row(row, where)
    completions = row["completions"] if row_kind(row) == "lists" else [row["chosen"], row["rejected"]]
    return completion_texts(row.get("prompt"), completions, where, tokenizer, fmt)


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


def check_single_shape(rows: list[dict[str, Any]], name: str, row_offset: int = 0) -> None:
    """One file must hold one shape: pairs or lists, all plain strings or all message lists."""
    first = None
    for index, row in enumerate(rows):
        kind = row_kind(row)
        value = row.get("chosen") if kind == "pairs" else (row["completions"] or [None])[0] if isinstance(row["completions"], list) else None
        if value is None:
            continue
        if kind == "lists":
            shape = "a ranked list of message lists" if _is_messages(value) else "a ranked list of strings"
        else:
            shape = "conversational (message lists)" if _is_messages(value) else "standard (strings)"
        if first is None:
            first = (shape, index)
        elif shape != first[0]:
            raise DataError(
                f"{name}: row {index + 1 + row_offset}: is {shape} but row {first[1] + 1 + row_offset} is {first[0]}; "
                "use one shape per file"
            )


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


def tokenize_rows(
    rows: list[dict[str, Any]],
    name: str,
    tokenizer,
    fmt: TokenFormat,
    max_length: int,
    truncation: str,
    num_proc: int | None = None,
    row_offset: int = 0,
) -> tuple[list[Group], Preflight]:
    """Tokenized groups (pairs: chosen, rejected; lists: their completions) and what was dropped on the way.

    Pairs: a pair with a side longer than `max_length` is dropped (`filter`) or cut from the left
    (`truncate`); chosen == rejected is dropped. Lists: the same applies to each completion, then the pairs
    the remaining completions' scores imply are formed (none between equal scores or identical completions);
    a list left without a pair is dropped.
    """
    kind = row_kind(rows[0]) if rows else "pairs"
    stats = Preflight(name=name, kind=kind, read=len(rows))
    wheres = [f"{name}: row {index + 1 + row_offset}" for index in range(len(rows))]
    texts = [row_texts(row, where, tokenizer, fmt) for row, where in zip(rows, wheres)]
    margins = row_margins(rows, name, row_offset) if kind == "pairs" else [None] * len(rows)
    scores = [list_scores(row, where) for row, where in zip(rows, wheres)] if kind == "lists" else [None] * len(rows)
    ids = _tokenize([t for row_texts_, _ in texts for t in row_texts_], texts[0][1] if texts else True, tokenizer, num_proc)
    frame = special_token_frame(tokenizer) if texts and texts[0][1] else (0, 0)
    groups, start = [], 0
    for index, (row_texts_, _) in enumerate(texts):
        sequences = ids[start : start + len(row_texts_)]
        start += len(row_texts_)
        stats.longest = max([stats.longest, *map(len, sequences)])
        if kind == "pairs":
            group = _pair_group(index + row_offset, sequences, margins[index], max_length, truncation, frame, stats)
        else:
            group = _list_group(index + row_offset, sequences, scores[index], max_length, truncation, frame, stats)
        if group is None:
            continue
        check_no_pad([t for i in range(len(group.completions)) for t in group.sequence(i)], fmt, tokenizer, wheres[index])
        groups.append(group)
        stats.lengths.extend(group.lengths())
    stats.kept = len(groups)
    return groups, stats


def _pair_group(row, sequences, margin, max_length, truncation, frame, stats: Preflight) -> Group | None:
    chosen, rejected = sequences
    if chosen == rejected:
        stats.identical += 1
        return None
    if len(chosen) > max_length or len(rejected) > max_length:
        if truncation == "filter":
            stats.too_long += 1
            return None
        chosen, rejected = truncate_left(chosen, max_length, *frame), truncate_left(rejected, max_length, *frame)
        stats.truncated += 1
        if chosen == rejected:
            stats.identical += 1
            return None
    return Group.of(row, [chosen, rejected], [(0, 1)], None if margin is None else [margin])


def _list_group(row, sequences, scores, max_length, truncation, frame, stats: Preflight) -> Group | None:
    stats.completions += len(sequences)
    kept = []
    for i, seq in enumerate(sequences):
        if len(seq) > max_length:
            if truncation == "filter":
                stats.too_long += 1
                continue
            sequences[i] = truncate_left(seq, max_length, *frame)
            stats.truncated += 1
        kept.append(i)
    pairs = []
    for a in range(len(kept)):
        for b in range(len(kept)):
            i, j = kept[a], kept[b]
            if scores[i] > scores[j]:
                if sequences[i] == sequences[j]:
                    stats.identical += 1
                else:
                    pairs.append((a, b))
            elif scores[i] == scores[j] and a < b:
                stats.tied += 1
    if not pairs:
        return None
    stats.completions_kept += len(kept)
    stats.pairs += len(pairs)
    return Group.of(row, [sequences[i] for i in kept], pairs, None, [scores[i] for i in kept])


def token_ids_of(texts: list[str], add_special: bool, tokenizer) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=add_special)["input_ids"]`, straight from the Rust tokenizer when that is
    the same call: it skips the offsets and the Python objects built around them, a third of a request's tokenizing."""
    backend = rust_tokenizer(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special)]


def rust_tokenizer(tokenizer):
    """The tokenizer's Rust backend if nothing is set on it that transformers' call would change (truncation,
    padding, splitting special tokens), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        or not hasattr(backend, "encode_batch_fast")
        or backend.truncation is not None
        or backend.padding is not None
        or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return None
    return backend


def encode_whole_texts(
    texts: list[str], add_special: bool, tokenizer, fmt: TokenFormat, max_length: int, frame: tuple[int, int], wheres: list[str]
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of texts to score (as `completion_texts` makes them), cut from the left beyond `max_length` as
    `data.truncation: truncate` cuts (`frame`: the tokenizer's special tokens, kept), and which were cut; the
    one tokenization of `rmtrain score` and `rmtrain serve`. A text holding the pad token is an error."""
    ids = token_ids_of(texts, add_special, tokenizer)
    head, tail = frame if add_special else (0, 0)
    cut = [len(seq) > max_length for seq in ids]
    ids = [truncate_left(seq, max_length, head, tail) for seq in ids]
    for seq, where in zip(ids, wheres):
        check_no_pad(seq, fmt, tokenizer, where)
    return ids, cut


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


def _tokenize(texts: list[str], add_special: bool, tokenizer, num_proc: int | None) -> list[list[int]]:
    import datasets

    if not texts:  # an empty table maps to no columns at all
        return []
    table = datasets.Dataset.from_dict({"text": texts})
    encoded = table.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=add_special)["input_ids"]},
        batched=True,
        batch_size=1000,
        num_proc=num_proc,
        remove_columns=table.column_names,
        keep_in_memory=True,
        load_from_cache_file=False,
    )
    return encoded["ids"]


@dataclass
class Split:
    """The rows of one source of data.train or data.eval, read and checked."""

    rows: list[dict[str, Any]]
    name: str
    source: DataSource


def read_splits(data: DataConfig) -> dict[str, list[Split]]:
    """The rows of every source of data.train and data.eval, read and checked as far as possible without a
    tokenizer, so that a bad file fails before a model is loaded."""
    splits: dict[str, list[Split]] = {}
    for split in ("train", "eval"):
        for source in sources(data, split):
            rows, name = read_rows(source)
            if not rows:
                raise DataError(f"{split} ({name}): no rows to read; check data.{split}.path, where, skip and limit")
            check_rows(rows, name, source.skip)
            splits.setdefault(split, []).append(Split(rows, name, source))
    return splits


def source_labels(parts: list[Split]) -> list[str]:
    """Short names for a split's sources (file stems; a repeated stem gets its index), as metrics and trackers
    name them: `eval/by_source/hh_harmless_test/accuracy`."""
    stems = [Path(part.source.path).stem or part.name for part in parts]
    return [stem if stems.count(stem) == 1 else f"{stem}.{i}" for i, stem in enumerate(stems)]


def tokenize_split(part: Split, index: int, label: str, tokenizer, fmt: TokenFormat, data: DataConfig) -> tuple[list[Group], Preflight]:
    groups, stats = tokenize_rows(part.rows, part.name, tokenizer, fmt, data.max_length, data.truncation, data.num_proc, part.source.skip)
    for g in groups:
        g.source = index
    stats.name = f"{label} ({part.name})" + (f", weight {part.source.weight:g}" if part.source.weight != 1 else "")
    return groups, stats


def mix(parts: list[list[Group]], weights: list[float], seed: int) -> list[Group]:
    """Every source's groups drawn `weight` times: whole copies for the integer part, a seeded random share of
    them for the rest (0.5: a random half). Each drawn group gets its own uid."""
    rng = random.Random(seed)
    drawn: list[Group] = []
    for groups, weight in zip(parts, weights):
        copies, rest = int(weight), weight - int(weight)
        drawn.extend(g for _ in range(copies) for g in groups)
        drawn.extend(rng.sample(groups, round(rest * len(groups))) if rest else [])
    return [replace(g, uid=i) for i, g in enumerate(drawn)]


def load_groups(
    data: DataConfig, tokenizer, fmt: TokenFormat, seed: int, splits: dict | None = None
) -> tuple[list[Group], list[Group] | None, list[Preflight]]:
    """Train and eval groups for a recipe (rows from read_splits), and their pre-flight statistics, a line per source."""
    assert data.train is not None
    splits = splits if splits is not None else read_splits(data)
    label = lambda split, i: split if len(splits[split]) == 1 else f"{split}[{i}]"  # noqa: E731
    tokenized = [tokenize_split(part, i, label("train", i), tokenizer, fmt, data) for i, part in enumerate(splits["train"])]
    stats = [s for _, s in tokenized]
    for (groups, s), part in zip(tokenized, splits["train"]):
        if not groups:
            raise DataError(_nothing_left(s, data, "train"))
    eval_groups = None
    if data.eval is not None:
        tokenized_eval = [tokenize_split(part, i, label("eval", i), tokenizer, fmt, data) for i, part in enumerate(splits["eval"])]
        for groups, s in tokenized_eval:
            if not groups:
                raise DataError(_nothing_left(s, data, "eval"))
            stats.append(s)
        eval_groups = [replace(g, uid=i) for i, g in enumerate(g for groups, _ in tokenized_eval for g in groups)]
    train_parts = [groups for groups, _ in tokenized]
    if data.eval_fraction:
        held_out = []
        for i, groups in enumerate(train_parts):
            order = list(range(len(groups)))
            random.Random(seed + i).shuffle(order)
            n_eval = max(1, round(len(groups) * data.eval_fraction))
            chosen = set(order[:n_eval])
            held_out.extend(g for j, g in enumerate(groups) if j in chosen)
            train_parts[i] = [g for j, g in enumerate(groups) if j not in chosen]
            stats[i].name += f", {n_eval} held out for eval"
        eval_groups = [replace(g, uid=i) for i, g in enumerate(held_out)]
        if not all(train_parts):
            raise DataError(_nothing_left(stats[0], data, "train"))
    train = mix(train_parts, [part.source.weight for part in splits["train"]], seed)
    return train, eval_groups, stats


def _nothing_left(stats: Preflight, data: DataConfig, split: str) -> str:
    what = "pair" if stats.kind == "pairs" else "completion"
    if stats.too_long and (stats.kind == "lists" and stats.completions_kept == 0 or stats.too_long + stats.identical == stats.read):
        return (
            f"{stats.name}: every {what} is longer than data.max_length={data.max_length} "
            f"(the longest sequence has {stats.longest:,} tokens); set data.truncation: truncate, "
            "or raise data.max_length"
        )
    if stats.kind == "pairs" and stats.identical == stats.read:
        return (
            f"{stats.name}: every pair has chosen identical to rejected ({stats.read} read, all dropped); "
            "such pairs teach nothing: check the chosen/rejected columns"
        )
    if stats.kind == "lists":
        return (
            f"{stats.name}: no list implies a pair ({stats.read} read; {stats.tied} tied pairs, {stats.identical} between "
            f"identical completions, {stats.too_long} completions longer than data.max_length={data.max_length}); "
            "check the scores/ranks columns"
        )
    return (
        f"{stats.name}: no {split} pairs left ({stats.read} read, {stats.identical} dropped as chosen == rejected, "
        f"{stats.too_long} longer than data.max_length={data.max_length})"
    )
