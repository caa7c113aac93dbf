"""Rows -> tokenized groups: the texts a model reads, their token ids, and what was dropped on the way.

Standard text is `prompt + completion` tokenized with the tokenizer's special tokens, plus the EOS token for
decoder models so that the reward is read at the end of the response (as TRL does). Conversational rows are rendered
by the chat template (`prompt + completion` messages) and tokenized without extra specials. Every caller tokenizes
through `token_ids_of`: training, `eval`, `score` and `serve` get the same ids.

A tokenized row is a `Group`: its sequences' longest common token prefix once, then each completion's own
tokens, and the (better, worse) pairs its scores imply (equal scores give none). A pair is a group of two,
chosen first. The prefix is computed here, once; batching, rewards and diagnostics read it from the group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rmtrain.errors import DataError
from rmtrain.rows import check_row, is_messages, list_scores, row_kind, row_margins
from rmtrain.tokenizer import TokenFormat, ends_in_eos, special_token_frame


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
# Rows -> texts -> ids


def completion_texts(prompt: Any, completions: list[Any], where: str, tokenizer, fmt: TokenFormat) -> tuple[list[str], bool]:
    """(texts, add_special_tokens): `prompt + completion` for each completion, as the model reads it."""
    if is_messages(completions[0]):
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
        texts = [t if ends_in_eos(t, fmt.append_eos) else t + fmt.append_eos for t in texts]
    return texts, True


def row_texts(row: dict[str, Any], where: str, tokenizer, fmt: TokenFormat) -> tuple[list[str], bool]:
    """(texts of the row's completions: chosen and rejected, or the list's, add_special_tokens) for one row."""
    check_row(row, where)
    completions = row["completions"] if row_kind(row) == "lists" else [row["chosen"], row["rejected"]]
    return completion_texts(row.get("prompt"), completions, where, tokenizer, fmt)


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
    ids = encode([t for row_texts_, _ in texts for t in row_texts_], texts[0][1] if texts else True, tokenizer, fmt, num_proc)
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
        for completion in group.completions:
            check_reward_token(completion, fmt, tokenizer, wheres[index])
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


def encode(texts: list[str], add_special: bool, tokenizer, fmt: TokenFormat, num_proc: int | None = None) -> list[list[int]]:
    """Token ids of texts as `completion_texts` makes them: the one tokenization of training, `eval`, `score` and
    `serve`. An exported folder's tokenizer appends the EOS itself; to a text that ends with it already it adds none
    (`ends_in_eos`), as `completion_texts` adds none."""
    ids = token_ids_of(texts, add_special, tokenizer, num_proc)
    if add_special and fmt.eos_in_tokenizer:
        eos_id, tail = tokenizer.convert_tokens_to_ids(fmt.eos_in_tokenizer), special_token_frame(tokenizer)[1]
        for i, text in enumerate(texts):
            at = len(ids[i]) - tail  # where the post-processor put its EOS
            if ends_in_eos(text, fmt.eos_in_tokenizer) and 0 <= at < len(ids[i]) and ids[i][at] == eos_id:
                ids[i] = ids[i][:at] + ids[i][at + 1 :]
    return ids


def token_ids_of(texts: list[str], add_special: bool, tokenizer, num_proc: int | None = None) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=add_special)["input_ids"]`, straight from the Rust tokenizer (in parallel
    threads) when that is the same call: it skips the offsets and the Python objects built around them. A tokenizer
    without a Rust backend (a Python one) runs in `num_proc` processes when given (`data.num_proc`)."""
    backend = rust_tokenizer(tokenizer)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special)]
    if num_proc and num_proc > 1 and len(texts) > 1:
        return _tokenize_in_processes(texts, add_special, tokenizer, num_proc)
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def _tokenize_in_processes(texts: list[str], add_special: bool, tokenizer, num_proc: int) -> list[list[int]]:
    import datasets

    table = datasets.Dataset.from_dict({"text": texts})
    encoded = table.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=add_special)["input_ids"]},
        batched=True, batch_size=1000, num_proc=num_proc, remove_columns=table.column_names, keep_in_memory=True,
        load_from_cache_file=False,
    )
    return encoded["ids"]


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


def scoring_ids(
    requests: list[tuple[Any, list[Any], str]], tokenizer, fmt: TokenFormat, max_length: int, special_tokens: bool = True
) -> list[tuple[list[list[int]], list[bool]]]:
    """Token ids of texts to score, `(prompt, completions, where)` each (checked by rmtrain.rows): every completion as
    `completion_texts` makes it, cut from the left beyond `max_length` as `data.truncation: truncate` cuts (the
    tokenizer's special tokens kept), and which were cut; `rmtrain score`'s and `rmtrain serve`'s one tokenization.
    A text ending in the pad token is an error naming its `where`. `special_tokens=False`: plain text without the
    tokenizer's own special tokens (a BOS), as vLLM's `add_special_tokens: false`; the EOS rule still holds."""
    texts = [completion_texts(prompt, completions, where, tokenizer, fmt) for prompt, completions, where in requests]
    texts = [(request_texts, flag and special_tokens) for request_texts, flag in texts]
    ids: list[list[list[int]]] = [[[] for _ in request_texts] for request_texts, _ in texts]
    cut: list[list[bool]] = [[False] * len(request_texts) for request_texts, _ in texts]
    for add_special in (True, False):  # plain text with the tokenizer's special tokens; chat rendered by its template
        at = [(r, c) for r, (request_texts, flag) in enumerate(texts) if flag is add_special for c in range(len(request_texts))]
        if not at:
            continue
        head, tail = special_token_frame(tokenizer) if add_special else (0, 0)
        for (r, c), seq in zip(at, encode([texts[r][0][c] for r, c in at], add_special, tokenizer, fmt)):
            check_reward_token(seq, fmt, tokenizer, requests[r][2])
            ids[r][c], cut[r][c] = truncate_left(seq, max_length, head, tail), len(seq) > max_length
    return list(zip(ids, cut))


def token_ids(groups: list[Group], pad_token_id: int) -> list[int]:
    """Every token id the groups hold, and the pad id (what a training batch can contain), sorted."""
    ids = {pad_token_id}
    for g in groups:
        ids.update(g.prefix)
        for completion in g.completions:
            ids.update(completion)
    return sorted(ids)


def check_reward_token(ids: list[int], fmt: TokenFormat, tokenizer, where: str) -> None:
    """A decoder's reward is read at a sequence's last token; the pad token there would hide it from transformers'
    last-non-pad pooling (the pad token inside a text is read as any other token)."""
    if not fmt.is_encoder and ids and ids[-1] == fmt.pad_token_id:
        pad = tokenizer.convert_ids_to_tokens(fmt.pad_token_id)
        raise DataError(
            f"{where}: ends in the pad token {pad!r}, where the reward is read (transformers' last-non-pad pooling "
            "would skip it); remove it from the end, or set model.pad_token to a token your data never ends with"
        )
