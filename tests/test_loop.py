"""The training loop alone (`train_loop`), on a one-weight model whose reward is `w * (last token id)`, with batches
made by hand: a step with a non-finite loss is skipped and counted and training goes on; too many in a row stop the
run naming the rows; a SIGTERM ends it after the step with a checkpoint that names the step."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from rmtrain.batching import collate_plain
from rmtrain.config import parse_recipe
from rmtrain.errors import NonFiniteLossError
from rmtrain.layout import Layout
from rmtrain.log import RunLog
from rmtrain.model import RewardModel
from rmtrain.runs import BestModel, TrainState
from rmtrain.tokenizer import TokenFormat
from rmtrain.train import Batches, Run, StepMetrics, train_loop
from tests.test_train_step import LastTokenTimesW, pair


class Passes(torch.utils.data.Dataset):
    """Batches of one pass each, the pair at `nan_at` (0-based) with a NaN margin (a non-finite loss)."""

    def __init__(self, count: int, nan_at: set[int]):
        self.count, self.nan_at = count, nan_at

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        batch = collate_plain([pair(12 + i % 5, 10, i)], 0)
        if i in self.nan_at:
            batch["margin"] = torch.tensor([float("nan")])
        return [batch]


def make_run(tmp_path: Path, nan_at: set[int], steps: int = 6, **train) -> tuple[Run, StepMetrics]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    recipe = parse_recipe({"model": {"name_or_path": "unused"}, "data": {"train": {"path": "unused.jsonl"}},
                           "train": {"output_dir": str(tmp_path), "max_steps": steps, "logging_steps": 1, "max_grad_norm": None,
                                     "learning_rate": 1.0, **train}})
    accelerator = Accelerator(cpu=True)
    model = LastTokenTimesW()
    rm = RewardModel(model, None, TokenFormat(None, 0, False), model.score, "score")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(Passes(steps, nan_at), batch_size=None, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator.register_for_checkpointing(scheduler)
    (tmp_path / "recipe.yaml").write_text("")
    log = RunLog(tmp_path / "metrics.jsonl")
    run = Run(accelerator, model, optimizer, scheduler, rm, recipe, tmp_path, log, loader, Batches(Layout("plain", "bool"), None, loader, None),
              None, BestModel(recipe, tmp_path), steps, {i: (0, i) for i in range(steps)})
    return run, StepMetrics(accelerator, recipe.train, lists=False)


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_a_non_finite_step_is_skipped_and_counted_and_training_goes_on(tmp_path):
    run, metrics = make_run(tmp_path, nan_at={2})
    weights = []
    step = run.scheduler.step

    def step_noting_the_weight():
        weights.append(run.model.score.weight.item())
        step()

    run.scheduler.step = step_noting_the_weight
    state = TrainState()
    train_loop(run, state, metrics)
    assert (state.step, state.skipped_steps, state.skipped_in_a_row) == (6, 1, 0)
    assert weights[2] == weights[1] and weights[3] != weights[2]  # the third step moved nothing; the fourth trained
    assert logged_steps(tmp_path) == [1, 2, 4, 5, 6]  # the skipped step has no pairs to report


def test_too_many_non_finite_steps_in_a_row_stop_the_run_naming_the_rows(tmp_path):
    run, metrics = make_run(tmp_path, nan_at={1, 2}, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError) as error:
        train_loop(run, TrainState(), metrics)
    assert "2 optimizer steps in a row (up to step 3)" in str(error.value) and "rows 3 of" in str(error.value)


def test_a_sigterm_ends_the_loop_after_its_step_with_a_checkpoint(tmp_path):
    run, metrics = make_run(tmp_path, nan_at=set())
    forward, calls = run.model.forward, []

    def forward_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # during the third step: it finishes, then the loop stops
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(*args, **kwargs)

    run.model.forward = forward_then_sigterm
    state = TrainState()
    with pytest.raises(SystemExit) as stopped:
        train_loop(run, state, metrics)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert state.step == 3 and (tmp_path / "checkpoints" / "checkpoint-3" / "training_state.json").is_file()
    assert json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not None  # the loop's handler is gone again
