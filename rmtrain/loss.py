"""Bradley-Terry and Plackett-Luce losses, the training objective, and reward statistics: tensor math only."""

from __future__ import annotations

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

    def total(self, rewards: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """(objective summed over the batch with its weights, chosen, rejected, Bradley-Terry loss per pair).

        The per-pair loss is the reported `loss`: the data's margin column only, no score margins, no
        centering, so that it means the same number in training, in fit's eval and in `rmtrain eval`.
        """
        chosen, rejected = rewards[batch["pair_index"]].unbind(1)
        loss = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        terms = loss
        if self.list_margins:
            in_list = batch["pair_in_list"]
            terms = torch.where(in_list, bradley_terry_loss(chosen, rejected, batch["score_margin"]), loss)
        centering = centering_penalty(chosen, rejected) * self.center_rewards_coefficient if self.center_rewards_coefficient else None
        if self.per_pair:
            return (terms if centering is None else terms + centering).sum(), chosen, rejected, loss
        weights = batch["pair_weight"]
        if self.list_loss == "plackett_luce":
            listwise = plackett_luce_terms(rewards, batch["sequence_score"], batch["sequence_group"])
            total = listwise[batch["sequence_in_list"]].sum() + terms[~batch["pair_in_list"]].sum()
        else:
            total = (terms * weights).sum()
        if centering is not None:
            total = total + (centering * weights).sum()
        return total, chosen, rejected, loss


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
