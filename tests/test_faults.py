"""Non-finite losses: a step whose loss (or gradient norm) is not finite is skipped and counted; after
`train.max_nonfinite_steps` in a row the run stops, naming the rows, and its last checkpoint stays."""

import re
from pathlib import Path

import pytest
import torch

from rmtrain.config import RecipeError, parse_recipe
from tests.conftest import rmtrain_cli, write_recipe
from tests.launch import metrics


def hh_recipe(model: str, shared_data: Path, out: Path, **train) -> dict:
    hh = str(shared_data / "hh_harmless_test.jsonl")
    return {
        "model": {"name_or_path": model},
        "data": {"train": {"path": hh, "limit": 24}, "max_length": 256},
        "train": {"output_dir": str(out), "per_device_batch_size": 4, "max_steps": 5, "logging_steps": 1,
                  "gradient_checkpointing": False, **train},
    }


def test_max_nonfinite_steps_must_be_positive():
    with pytest.raises(RecipeError) as error:
        parse_recipe({"model": {"name_or_path": "m"}, "data": {"train": {"path": "x.jsonl"}},
                      "train": {"output_dir": "o", "max_nonfinite_steps": 0}})
    assert error.value.problems == ["train.max_nonfinite_steps: must be >= 1, got 0"]


@pytest.mark.shared_data
def test_diverging_run_stops_naming_the_rows_and_keeps_its_checkpoint(tmp_path, tiny_qwen3, shared_data):
    """A learning rate of 1e30: the first AdamW step moves weights by ~1e30, after which the forward overflows."""
    out = tmp_path / "run"
    tree = hh_recipe(tiny_qwen3, shared_data, out, learning_rate=1e30, save_steps=1, max_nonfinite_steps=2)
    result = rmtrain_cli("fit", str(write_recipe(tmp_path, tree)))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())
    assert "step 2: non-finite loss or gradient norm, optimizer step skipped (1 in a row)" in text
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, result.stderr[-3000:]
    found = re.search(r"2 optimizer steps in a row \(up to step 3\).*last batch: rows ([\d, ]+) of (\S+);", error[0])
    assert found, error[0]
    rows = [int(r) for r in found.group(1).split(", ")]
    assert len(rows) == 4 and all(1 <= r <= 24 for r in rows)  # 1-based row numbers of the file
    assert f"the last checkpoint ({out / 'checkpoints' / 'checkpoint-1'}) is kept" in error[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]  # skipped steps save nothing
    assert not (out / "run_info.json").exists() and not (out / "model.safetensors").exists()
    assert [r["step"] for r in metrics(out, "train")] == [1]


@pytest.mark.shared_data
def test_a_non_finite_step_is_skipped_counted_and_training_goes_on(tmp_path, tiny_qwen3, shared_data, monkeypatch, capsys):
    """In process, the model returns NaN rewards for one batch (rows cannot carry inf: the data loader refuses
    non-finite margins); that step changes no weight, the next steps train, and the count is logged."""
    import rmtrain.train as train
    from rmtrain.config import parse_recipe

    recipe = parse_recipe(hh_recipe(tiny_qwen3, shared_data, tmp_path / "run", max_nonfinite_steps=2))
    real_batch_rewards = train.batch_rewards
    calls = {"n": 0, "weights_before": None, "weights_after": None}

    def batch_rewards(model, rm, batch):
        calls["n"] += 1
        head = next(p for n, p in model.named_parameters() if "score" in n)
        if calls["n"] == 3:  # the third step's batch
            calls["weights_before"] = head.detach().clone()
            rewards = real_batch_rewards(model, rm, batch)
            return rewards * torch.tensor([float("nan"), 1.0]).repeat(len(rewards) // 2)  # every chosen reward
        if calls["n"] == 4:
            calls["weights_after"] = head.detach().clone()
        return real_batch_rewards(model, rm, batch)

    monkeypatch.setattr(train, "batch_rewards", batch_rewards)
    info = train.fit(recipe)
    assert info["steps"] == 5
    assert torch.equal(calls["weights_before"], calls["weights_after"])  # the skipped step moved nothing
    records = metrics(tmp_path / "run", "train")
    assert [r["step"] for r in records] == [1, 2, 4, 5]  # step 3 has no pairs to report
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "step 3: non-finite loss or gradient norm, optimizer step skipped (1 in a row)" in " ".join(capsys.readouterr().err.split())
