"""What a row holds, checked before anything is tokenized: preference pairs and ranked lists (a file's rows), and
the texts to score (`rmtrain score`'s rows and `rmtrain serve`'s request bodies alike), each problem one message
naming where it is.

A row is a pair (`chosen`/`rejected`) or a ranked list (`completions` with `scores`, higher is better, or `ranks`,
1 is best), standard (strings) or conversational (lists of `{role, content}` messages, both strings), with an explicit
`prompt` or an implicit one (shared by the completions). One file holds one shape.
"""

from __future__ import annotations

import math
from typing import Any

from rmtrain.errors import DataError

ROLES = {"system", "user", "assistant", "tool", "developer"}


def row_kind(row: dict[str, Any]) -> str:
    return "lists" if "completions" in row else "pairs"


def is_messages(value: Any) -> bool:
    return isinstance(value, list)


def check_messages(messages: Any, where: str) -> None:
    """A non-empty list of `{role, content}` messages: a known role, and content that is text (a number, null or a
    list of parts would be read as its Python string)."""
    if not messages:
        raise DataError(f"{where}: empty message list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            if isinstance(message, dict):
                got = f"keys {', '.join(sorted(map(str, message)))}" if message else "no keys"
            else:
                got = type(message).__name__
            raise DataError(f"{where}: message {i} must be an object with 'role' and 'content', got {got}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLES:
            shown = repr(role) if isinstance(role, str) else f"a {type(role).__name__}"
            raise DataError(f"{where}: message {i} has unknown role {shown} (expected one of {', '.join(sorted(ROLES))})")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} 'content' must be a string, got {_kind(content)}")
        check_unicode(content, f"{where}: message {i} 'content'")


def check_texts(prompt: Any, completions: list[tuple[str, Any]], where: str) -> None:
    """A prompt (or None) and named completions: all strings or all message lists, well formed, none empty."""
    for name, value in [("prompt", prompt), *completions]:
        if value is not None and not isinstance(value, (str, list)):
            raise DataError(f"{where}: '{name}' must be a string or a message list, got {_kind(value)}")
    shapes = {is_messages(value) for _, value in completions} | ({is_messages(prompt)} if prompt is not None else set())
    if len(shapes) > 1:
        names = "/".join(["prompt"] * (prompt is not None) + [name.split("[")[0] for name, _ in completions[:2]])
        raise DataError(f"{where}: mixes plain strings and message lists in {names}; use one shape")
    if is_messages(completions[0][1]):
        if prompt:
            check_messages(prompt, f"{where}: prompt")
        for name, value in completions:
            check_messages(value, f"{where}: {name}")
        return
    for name, value in completions:
        if not value.strip():
            raise DataError(f"{where}: '{name}' is empty; fill it in or remove it")
    for name, value in [("prompt", prompt), *completions]:
        if value is not None:
            check_unicode(value, f"{where}: '{name}'")


def check_unicode(text: str, where: str) -> None:
    """Text a tokenizer can read: a lone surrogate (a JSON `\\ud800` escape without its pair) is no character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(f"{where}: not valid Unicode (a lone surrogate {text[error.start]!r} at character {error.start}); "
                        "send UTF-8 text") from None


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def check_row(row: dict[str, Any], where: str) -> None:
    """What can be checked without a tokenizer: columns present, one shape, messages well formed, no empty text."""
    if row_kind(row) == "lists":
        list_scores(row, where)
        check_texts(row.get("prompt"), [(f"completions[{i}]", c) for i, c in enumerate(row["completions"])], where)
        return
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            present = ", ".join(sorted(row)) or "none"
            raise DataError(f"{where}: missing '{key}' (columns present: {present}; map yours with data.*.columns)")
    check_texts(row.get("prompt"), [("chosen", row["chosen"]), ("rejected", row["rejected"])], where)


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
            shape = "a ranked list of message lists" if is_messages(value) else "a ranked list of strings"
        else:
            shape = "conversational (message lists)" if is_messages(value) else "standard (strings)"
        if first is None:
            first = (shape, index)
        elif shape != first[0]:
            raise DataError(
                f"{name}: row {index + 1 + row_offset}: is {shape} but row {first[1] + 1 + row_offset} is {first[0]}; "
                "use one shape per file"
            )


# --------------------------------------------------------------------------------------------------
# Texts to score: `rmtrain score` rows and `rmtrain serve` bodies


SCORE_SHAPES = "'text', 'messages', or 'prompt' with 'completion' (or 'response')"


def score_input(row: Any, where: str, field: str | None = None) -> tuple[Any, Any]:
    """(prompt or None, completion) of one text to score, checked: `{"text"}`, `{"messages"}` or `{"prompt",
    "completion"}` (or the column `field`)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {SCORE_SHAPES}, got {_kind(row)}")
    if field is not None:
        if row.get(field) is None:
            raise DataError(f"{where}: missing '{field}' (columns present: {', '.join(sorted(map(str, row))) or 'none'}; see --field)")
        prompt, completion, name = None, row[field], field
    else:
        completion_key = "completion" if "completion" in row else "response" if "response" in row else None
        found = [k for k in ("text", "messages") if k in row] + (["prompt+" + completion_key] if completion_key else [])
        if len(found) > 1:
            raise DataError(f"{where}: holds {' and '.join(found)}; keep one shape per row or pick a column with --field")
        if not found:
            raise DataError(
                f"{where}: expected {SCORE_SHAPES} (columns present: {', '.join(sorted(map(str, row))) or 'none'}); "
                "rename your column or pick it with --field"
            )
        if completion_key and row.get("prompt") is None:
            raise DataError(f"{where}: '{completion_key}' without 'prompt'; use 'text' for a whole text")
        prompt = row["prompt"] if completion_key else None
        name = completion_key or found[0]
        completion = row[name]
    check_texts(prompt, [(name, completion)], where)
    return prompt, completion


def score_group(body: Any, where: str) -> tuple[Any, list[Any]]:
    """(prompt, completions) of a prompt's completions to score together, checked: `{"prompt", "completions": [...]}`."""
    if not isinstance(body, dict):
        raise DataError(f"{where}: expected an object with 'prompt' and 'completions', got {_kind(body)}")
    if "prompt" not in body:
        raise DataError(f"{where}: missing 'prompt' (a string or a list of messages)")
    completions = body.get("completions")
    if not isinstance(completions, list) or not completions:
        got = "missing" if completions is None else "an empty list" if isinstance(completions, list) else _kind(completions)
        raise DataError(f"{where}: 'completions' must be a non-empty list of completions, got {got}")
    check_texts(body["prompt"], [(f"completions[{i}]", c) for i, c in enumerate(completions)], where)
    return body["prompt"], completions
