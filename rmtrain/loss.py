"""Bradley-Terry and Plackett-Luce losses, the training objective, and reward statistics: tensor math only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss `-log sigmoid(r_chosen - r_rejected - margin)`, shape [num_pairs]."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def centering_penalty(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair `(r_chosen + r_rejected)^2`, which pushes rewards towards mean zero.

    This is Eq. 2 of Eisenstein et al. 2023 (arXiv 2312.09244) and exactly what TRL's
    `center_rewards_coefficient` multiplies, so a recipe ported from TRL trains the same model.
    """
    return (chosen + rejected) ** 2


def plackett_luce_terms(rewards: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per completion, its Plackett-Luce term `-log softmax` over itself and the completions of its group scored
    below it (0 when none is). Summed over a group with distinct scores this is the listwise likelihood of its
    order; tied completions do not compete with each other, as equal scores give no Bradley-Terry pair, and a
    pair's term is its Bradley-Terry loss.
    """
    same = groups[:, None] == groups[None, :]
    below = same & (scores[None, :] < scores[:, None])
    competitors = below | torch.eye(len(rewards), dtype=torch.bool, device=rewards.device)
    log_total = torch.logsumexp(rewards[None, :].masked_fill(~competitors, float("-inf")), dim=1)
    return torch.where(below.any(dim=1), log_total - rewards, torch.zeros_like(rewards))


@dataclass(frozen=True)
class Objective:
    """What training minimises: the Bradley-Terry loss of every pair, or lists' Plackett-Luce loss, plus the
    centering term, weighted per pair or per row, as the recipe's train section says."""

    center_rewards_coefficient: float | None = None
    list_loss: str = "bradley_terry"
    list_weighting: str = "pair"
    list_margins: bool = False

    @classmethod
    def of(cls, t) -> "Objective":
        return cls(t.center_rewards_coefficient, t.list_loss, t.list_weighting, t.list_margins)

    @property
    def per_pair(self) -> bool:
        """Every pair weighs the same (the mean over pairs): as training on binarized pairs."""
        return self.list_loss == "bradley_terry" and self.list_weighting == "pair"

    def weight(self, batch: dict[str, Any]) -> int:
        """What a batch contributes to the mean the objective is: its pairs, or its rows that hold a pair."""
        return batch["num_pairs"] if self.per_pair else batch["num_groups"]

    def total(self, rewards: torch.Tensor, batch: dict[str, Any], head_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """(objective summed over the batch with its weights, chosen, rejected, Bradley-Terry loss per pair).

        `rewards` holds one column per reward head: the objective is the mean of the heads' objectives, each head's
        pairs weighted by its column of `head_weights` [pairs, heads] when given (a bootstrap). Chosen, rejected and
        the per-pair loss are the ensemble's (the heads' mean reward); the loss is the reported `loss`: the data's
        margin column only, no score margins, no centering, so that it means the same number in training, in fit's
        eval and in `rmtrain eval`. One head is the single reward model, exactly.
        """
        rewards = rewards[:, None] if rewards.dim() == 1 else rewards
        heads = rewards.shape[1]
        totals = [self.head_total(rewards[:, k], batch, None if head_weights is None else head_weights[:, k]) for k in range(heads)]
        chosen, rejected = rewards.mean(1)[batch["pair_index"]].unbind(1)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        return (totals[0] if heads == 1 else torch.stack(totals).mean()), chosen, rejected, loss

    def head_total(self, rewards: torch.Tensor, batch: dict[str, Any], weights: torch.Tensor | None = None) -> torch.Tensor:
        """One head's objective summed over the batch; each pair's terms times its bootstrap `weights` when given
        (Bradley-Terry objectives: the recipe refuses a bootstrap of Plackett-Luce)."""
        chosen, rejected = rewards[batch["pair_index"]].unbind(1)
        terms = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        if self.list_margins:
            terms = torch.where(batch["pair_in_list"], bradley_terry_loss(chosen, rejected, batch["score_margin"]), terms)
        centering = centering_penalty(chosen, rejected) * self.center_rewards_coefficient if self.center_rewards_coefficient else None
        if weights is not None:
            terms = terms * weights
            centering = None if centering is None else centering * weights
        if self.per_pair:
            return (terms if centering is None else terms + centering).sum()
        pair_weight = batch["pair_weight"]
        if self.list_loss == "plackett_luce":
            listwise = plackett_luce_terms(rewards, batch["sequence_score"], batch["sequence_group"])
            total = listwise[batch["sequence_in_list"]].sum() + terms[~batch["pair_in_list"]].sum()
        else:
            total = (terms * pair_weight).sum()
        return total if centering is None else total + (centering * pair_weight).sum()


POISSON_1_CDF = torch.tensor([math.exp(-1) * sum(1 / math.factorial(j) for j in range(k + 1)) for k in range(16)], dtype=torch.float64)
"""P(X <= k) of Poisson(1), k = 0..15 (what is left above 15 is below 1e-13)."""


def bootstrap_weights(row_keys: torch.Tensor, heads: int, seed: int) -> torch.Tensor:
    """Poisson(1) weights [pairs, heads], given each pair's row key: each head's bootstrap sample of the training rows
    without copying data (the "online bootstrap", Oza & Russell 2001). A row's weights (a pair's, or every pair of a
    list) are a function of the seed, the row's key and the head alone, so they are the same in every epoch, on every
    process, in every batch layout and after a resume: a hash of the three gives a uniform, inverted through the CDF."""
    mask = 0xFFFFFFFF
    head = torch.arange(heads, device=row_keys.device)
    x = ((row_keys[:, None] & mask) * 0x9E3779B1 + (seed & mask) * 0x85EBCA77 + head * 0xC2B2AE3D + 0x27D4EB2F) & mask
    for _ in range(3):  # 32-bit mixing (the products stay below 2**63)
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    uniform = ((x ^ (x >> 16)).double() + 0.5) / 2**32
    return (uniform[..., None] > POISSON_1_CDF.to(row_keys.device)).sum(-1).float()


def correct(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair outcome: the chosen reward is strictly higher (a tie counts as wrong, as in RewardBench)."""
    return chosen > rejected


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor) -> dict[str, float]:
    """Metrics over every pair given (already gathered across processes).

    `loss` is the Bradley-Terry loss (the data's margins included), the same number in training logs, fit's
    eval and `rmtrain eval`; accuracy counts a tie as wrong (strict >), as RewardBench does; reward statistics
    cover chosen and rejected together.
    """
    chosen = chosen.detach().double()
    rejected = rejected.detach().double()
    rewards = torch.cat([chosen, rejected])
    return {
        "loss": loss.detach().double().mean().item(),
        "accuracy": correct(chosen, rejected).double().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "mean_reward": rewards.mean().item(),
        "std_reward": rewards.std(unbiased=False).item(),
        "min_reward": rewards.min().item(),
        "max_reward": rewards.max().item(),
        "num_pairs": int(chosen.numel()),
    }


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, from the attention mask alone.

    Works with right or left padding and never looks at token ids, so pad == eos is harmless.
    """
    seq_len = attention_mask.shape[-1]
    positions = torch.arange(seq_len, device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)
