"""Reading rows from a data source: local JSON lines / JSON / parquet / CSV files or folders, or a Hub dataset;
then `where`, `skip`, `limit` and `columns` as the recipe gives them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmtrain.config import DataSource
from rmtrain.errors import DataError, first_line

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def read_rows(source: DataSource) -> tuple[list[dict[str, Any]], str]:
    """Rows of one source as plain dicts (columns renamed), and a name for messages."""
    path = Path(source.path).expanduser()
    if path.exists():
        files = _data_files(path)
        name = str(path)
        rows: list[dict[str, Any]] = []
        for file in files:
            rows.extend(_read_file(file, source))
    elif source.path.startswith((".", "/", "~")) or Path(source.path).suffix in FILE_BUILDERS:
        raise DataError(f"{source.path}: no such file or folder")
    else:
        rows, name = _read_hub(source)
    if source.where:
        for column in source.where:
            if rows and all(column not in row for row in rows):
                raise DataError(f"{name}: where: no column '{column}' (columns: {', '.join(sorted(rows[0]))})")
        rows = [row for row in rows if all(row.get(k) == v for k, v in source.where.items())]
    rows = rows[source.skip:]
    if source.limit is not None:
        rows = rows[: source.limit]
    if source.columns:
        renamed = {k: v for k, v in source.columns.items() if v is not None and k != v}
        clash = next((v for v in renamed.values() if rows and v in rows[0] and v not in source.columns), None)
        if clash is not None:
            old = next(k for k, v in renamed.items() if v == clash)
            raise DataError(f"{name}: columns: {old} -> {clash}, but the data has a '{clash}' column too; map that one "
                            f"elsewhere or drop it ({clash}: null)")
        rows = [
            {source.columns.get(k, k): v for k, v in row.items() if source.columns.get(k, k) is not None}
            for row in rows
        ]
    return rows, name


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise DataError(f"{path}: unsupported file type '{path.suffix}', expected .jsonl, .json, .parquet or .csv")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in FILE_BUILDERS)
    if not files:
        raise DataError(f"{path}: folder holds no .jsonl, .json, .parquet or .csv file")
    return files


def _read_file(path: Path, source: DataSource) -> list[dict[str, Any]]:
    if path.suffix in (".json", ".jsonl"):
        return _read_json(path)
    import datasets

    try:
        dataset = datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types; the message is what the user needs
        raise DataError(f"{path}: cannot read as {path.suffix[1:]}: {first_line(error)}") from None
    return dataset.to_list()


def _read_json(path: Path) -> list[dict[str, Any]]:
    """JSON lines (or one JSON array) read with row numbers for errors."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {error.start}); re-encode the file as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {error.lineno}: invalid JSON: {error.msg}") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}: line {number}: invalid JSON: {error.msg} (column {error.colno}); "
                    "JSON lines need one complete JSON object per line"
                ) from None
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
    return rows


def _read_hub(source: DataSource) -> tuple[list[dict[str, Any]], str]:
    import datasets

    name = f"{source.path}[{source.split}]"
    try:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as error:
        raise DataError(
            f"{source.path}: not a local file or folder, and loading it as a Hub dataset failed: {first_line(error)}"
        ) from None
    return dataset.to_list(), name
