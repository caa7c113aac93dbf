"""Recipes and checks shared by the sharded-engine tests (FSDP2, DeepSpeed ZeRO-2/3) on 2 CPU processes.

Tiny Qwen3 on HH pairs (a full fine-tune) and on ranked lists (LoRA, segment attention, lists longer than a pass
in chunks), each with a small `max_tokens_per_forward` so that processes split their batches into different numbers
of passes; an eval every 2 steps and a checkpoint every 2. The same recipe in one process is the reference.
"""

import json
from pathlib import Path

from tests.conftest import FULL, ROOT, write_recipe
from tests.launch import metrics, run_fit

ACCELERATE_CONFIGS = ROOT / "recipes" / "accelerate"
STEPS = 8 if FULL else 4


def pairs_recipe(model: str, shared_data: Path, out: Path, processes: int, **train) -> dict:
    hh = str(shared_data / "hh_harmless_test.jsonl")
    return {
        "model": {"name_or_path": model},
        "data": {"train": {"path": hh, "limit": 48 if FULL else 40}, "eval": {"path": hh, "skip": 2290}, "max_length": 256},
        "train": {"output_dir": str(out), "max_steps": STEPS, "per_device_batch_size": 8 // processes, "logging_steps": 1,
                  "eval_steps": 2, "save_steps": 2, "learning_rate": 1e-3, "gradient_checkpointing": False,
                  "max_tokens_per_forward": 400, **train},
    }


def lists_recipe(model: str, shared_data: Path, out: Path, processes: int, **train) -> dict:
    lists = str(shared_data / "arena_bench_v1_lists.jsonl")
    return {
        "model": {"name_or_path": model},
        "data": {"train": {"path": lists, "limit": 16 if FULL else 8}, "eval": {"path": lists, "skip": 287},
                 "max_length": 128, "truncation": "truncate"},
        "lora": {"r": 4, "alpha": 8, "merge": True},
        "train": {"output_dir": str(out), "max_steps": STEPS // 2 + 1, "per_device_batch_size": 4 // processes,
                  "logging_steps": 1, "eval_steps": 2, "learning_rate": 1e-3, "max_tokens_per_forward": 600, **train},
    }


RECIPES = {"pairs": pairs_recipe, "lists": lists_recipe}


def fit(tmp: Path, tree: dict, config: str | None, *extra: str) -> str:
    """`rmtrain fit` in one process (config None), or on 2 CPU processes under recipes/accelerate/`config`."""
    recipe = write_recipe(tmp, tree)
    processes = 1 if config is None else 2
    result = run_fit(recipe, *extra, num_processes=processes, config_file=ACCELERATE_CONFIGS / config if config else None, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def run_info(out: Path) -> dict:
    return json.loads((out / "run_info.json").read_text())


def assert_same_run(a: Path, b: Path, tolerance: float) -> None:
    """The same train and eval curves (each step's pairs, loss, accuracy, mean reward)."""
    for split in ("train", "eval"):
        ra, rb = metrics(a, split), metrics(b, split)
        assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
        for x, y in zip(ra, rb):
            assert x["num_pairs"] == y["num_pairs"]
            for key in ("loss", "accuracy", "mean_reward"):
                assert abs(x[key] - y[key]) < tolerance, (split, key, x, y)
