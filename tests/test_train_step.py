"""`train_step` against hand-computed numbers, on a model whose reward is `w * (last token id)`.

With w = 0 every pair's Bradley-Terry gradient is d/dw -log sigmoid(w (a - b)) = -(a - b) / 2 (a, b: the
last token ids of chosen and rejected), so one SGD step of learning rate 1 from w = 0 lands on the mean of
(a - b) / 2 over the pairs whose gradient the step took: a direct read-out of how the loss was scaled.
"""

import pytest
import torch
from torch import nn

from rmtrain.batching import PAIR_KEY, collate_passes, collate_plain
from rmtrain.config import TrainConfig
from rmtrain.groups import Group
from rmtrain.model import RewardModel
from rmtrain.tokenizer import TokenFormat
from rmtrain.train import train_step


class LastTokenTimesW(nn.Module):
    """Per-token score w * token id, from a one-weight head (read at each sequence's last token)."""

    def __init__(self):
        super().__init__()
        self.score = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.score.weight)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.score(input_ids.float().unsqueeze(-1))


def pair(chosen_last: int, rejected_last: int, row: int) -> Group:
    return Group.of(row, [[1, chosen_last], [1, rejected_last]], [(0, 1)])


class OneOfTwoProcesses:
    """Process 0 of two, simulated around a real single-process Accelerator: a sum over processes adds what the
    other process contributes (`others`, in call order: its pair count, then its non-finite flag)."""

    num_processes = 2

    def __init__(self, accelerator, others: list[int]):
        self.accelerator = accelerator
        self.others = list(others)

    def reduce(self, tensor, reduction):
        return tensor + self.others.pop(0)

    def __getattr__(self, name):
        return getattr(self.accelerator, name)


@pytest.fixture
def setup():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = LastTokenTimesW()
    rm = RewardModel(model, None, TokenFormat(None, 0, False), model.score, "score")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    train = TrainConfig(output_dir="unused", max_grad_norm=None)
    yield accelerator, model, optimizer, rm, train
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def w(model) -> float:
    return model.score.weight.item()


def test_two_passes_of_unequal_size_give_the_mean_over_the_batch(setup):
    accelerator, model, optimizer, rm, t = setup
    # Differences a - b: 2, 4, 6 in the first pass, 20 in the second (a pass of 3 pairs, then of 1).
    groups = [pair(12, 10, 0), pair(14, 10, 1), pair(16, 10, 2), pair(30, 10, 3)]
    passes = [collate_plain(groups[:3], 0), collate_plain(groups[3:], 0)]
    result = train_step(accelerator, model, optimizer, rm, passes, t)
    assert not result.skip
    # The mean over the 4 pairs: (2 + 4 + 6 + 20) / 2 / 4 = 4. Averaging the two passes' means would give
    # ((2 + 4 + 6) / 3 / 2 + 20 / 2) / 2 = 6, and summing them 12.
    assert w(model) == pytest.approx(4.0)
    assert (result.keys // PAIR_KEY).tolist() == [0, 1, 2, 3]  # each pair named by its row
    assert result.loss.tolist() == pytest.approx([0.6931472] * 4)  # log 2 at w = 0
    # The passes collate_passes cuts under a token budget (2 pairs of 2 x 2 tokens each) train the same step.
    budgeted = collate_passes(groups, lambda g: collate_plain(g, 0), "plain", max_tokens=8)
    assert [p["row"].tolist() for p in budgeted] == [[0, 1], [2, 3]]
    model.score.weight.data.zero_()
    train_step(accelerator, model, optimizer, rm, budgeted, t)
    assert w(model) == pytest.approx(4.0)


def test_pairs_are_weighted_by_their_share_of_the_global_batch(setup):
    """Process 0 holds 3 pairs, process 1 holds 1: each backpropagates sum * 2 / 4, and DDP's average of the
    two gradients is the mean over the 4 pairs, as if one process held them all."""
    accelerator, model, optimizer, rm, t = setup
    groups = [pair(12, 10, 0), pair(14, 10, 1), pair(16, 10, 2)]
    result = train_step(OneOfTwoProcesses(accelerator, others=[1, 0]), model, optimizer, rm, [collate_plain(groups, 0)], t)
    assert not result.skip
    process_0 = w(model)  # the step took -grad_0 = (2 + 4 + 6) / 2 * 2 / 4
    assert process_0 == pytest.approx(3.0)
    # Process 1's step from the same start, with its one pair (difference 20) and process 0's 3 pairs elsewhere.
    model.score.weight.data.zero_()
    train_step(OneOfTwoProcesses(accelerator, others=[3, 0]), model, optimizer, rm, [collate_plain([pair(30, 10, 3)], 0)], t)
    process_1 = w(model)  # 20 / 2 * 2 / 4 = 5
    assert process_1 == pytest.approx(5.0)
    assert (process_0 + process_1) / 2 == pytest.approx((2 + 4 + 6 + 20) / 2 / 4)  # DDP's mean: the global mean


def test_a_non_finite_pass_skips_the_step_here_and_when_another_process_had_one(setup):
    accelerator, model, optimizer, rm, t = setup
    groups = [pair(12, 10, 0), pair(14, 10, 1)]
    nan_margin = collate_plain(groups[1:], 0) | {"margin": torch.tensor([float("nan")])}
    result = train_step(accelerator, model, optimizer, rm, [collate_plain(groups[:1], 0), nan_margin], t)
    assert result.skip and w(model) == 0.0 and model.score.weight.grad is None  # no step, gradients dropped
    # Every pass here is finite, but the other process reports a non-finite one: the step is skipped too.
    result = train_step(OneOfTwoProcesses(accelerator, others=[2, 1]), model, optimizer, rm, [collate_plain(groups, 0)], t)
    assert result.skip and w(model) == 0.0
    # And the next batch trains as usual.
    result = train_step(accelerator, model, optimizer, rm, [collate_plain(groups, 0)], t)
    assert not result.skip and w(model) == pytest.approx((2 + 4) / 2 / 2)
