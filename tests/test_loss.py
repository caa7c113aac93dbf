"""Loss and statistics against values computed by hand."""

import math

import torch

from rmtrain.loss import Objective, bradley_terry_loss, last_token_index, pair_stats


def nll(x):
    return math.log(1 + math.exp(-x))  # -log sigmoid(x)


def test_bradley_terry_by_hand():
    chosen = torch.tensor([2.0, 0.5, -1.0])
    rejected = torch.tensor([1.0, 0.5, 1.0])
    got = bradley_terry_loss(chosen, rejected)
    want = torch.tensor([nll(1.0), nll(0.0), nll(-2.0)])
    assert torch.allclose(got, want, atol=1e-6)
    assert abs(got[1].item() - math.log(2)) < 1e-6


def test_margin_is_subtracted():
    chosen, rejected = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0])
    margin = torch.tensor([1.5, -1.0])
    got = bradley_terry_loss(chosen, rejected, margin)
    assert torch.allclose(got, torch.tensor([nll(0.5), nll(2.0)]), atol=1e-6)


def test_centering_term_matches_trl():
    from rmtrain.batching import targets
    from rmtrain.groups import Group

    chosen, rejected = torch.tensor([1.0, -3.0]), torch.tensor([2.0, 1.0])
    batch = targets([Group.of(0, [[1, 2], [1, 3]], [(0, 1)]), Group.of(1, [[4, 5], [4, 6]], [(0, 1)])])
    rewards = torch.stack([chosen, rejected], dim=1).reshape(-1)  # group by group: chosen, rejected
    total, _, _, loss = Objective(center_rewards_coefficient=0.01).total(rewards, batch)
    want = (nll(-1.0) + nll(-4.0)) / 2 + 0.01 * ((1 + 2) ** 2 + (-3 + 1) ** 2) / 2
    assert abs(total.item() / 2 - want) < 1e-6
    # `loss` (what metrics report) is the Bradley-Terry loss alone; without a coefficient the objective is it.
    assert torch.allclose(loss, bradley_terry_loss(chosen, rejected))
    assert abs(Objective().total(rewards, batch)[0].item() - loss.sum().item()) < 1e-6


def test_loss_is_large_for_confidently_wrong_pairs_without_overflow():
    got = bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert abs(got.item() - 200.0) < 1e-3


def test_pair_stats_by_hand_ties_count_as_wrong():
    chosen = torch.tensor([1.0, 2.0, 0.0, -1.0])
    rejected = torch.tensor([0.0, 2.0, 1.0, -3.0])
    loss = bradley_terry_loss(chosen, rejected)
    stats = pair_stats(chosen, rejected, loss)
    assert stats["accuracy"] == 0.5  # pairs 0 and 3; the tie (pair 1) is wrong
    assert abs(stats["margin"] - (1 + 0 - 1 + 2) / 4) < 1e-9
    rewards = [1, 2, 0, -1, 0, 2, 1, -3]
    assert abs(stats["mean_reward"] - sum(rewards) / 8) < 1e-9
    assert stats["min_reward"] == -3 and stats["max_reward"] == 2
    assert abs(stats["loss"] - (nll(1) + nll(0) + nll(-1) + nll(2)) / 4) < 1e-6
    assert stats["num_pairs"] == 4


def test_last_token_index_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]
