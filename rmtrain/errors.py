"""Errors that are the user's to fix. The CLI catches `UserError` and prints its lines with exit status 2.

Importing this module imports nothing heavy, so the CLI can catch these before torch is loaded.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or an impossible request: one line that names the file, key, row or folder, and how to fix it."""

    def lines(self) -> list[str]:
        return [str(self)]


class RecipeError(UserError):
    """A recipe that cannot be used; `problems` holds one line per problem, all reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def lines(self) -> list[str]:
        return [f"{self.source}: {problem}" for problem in self.problems]


class DataError(UserError):
    """A data problem, with the file (or dataset) and row it comes from."""


class ModelError(UserError):
    """A model, tokenizer, LoRA setting or model folder that cannot work, with the key or folder to fix."""


class RunDirError(UserError):
    """The output folder cannot be used as asked (holds a run without --resume/--overwrite, nothing to resume, ...)."""


class ResourceError(UserError):
    """The machine cannot do what the recipe asks: out of memory, disk full, no bf16."""


class NonFiniteLossError(UserError):
    """`train.max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradient norm."""


class ExportError(UserError):
    """The export cannot be done as asked, or the written folder does not give rmtrain's rewards."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages run over many lines)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def require_extra(extra: str, modules: tuple[str, ...], purpose: str) -> None:
    """A one-line error naming the extra to install when an optional feature's packages are missing."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{purpose} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
                        f"pip install 'rmtrain[{extra}]'")
