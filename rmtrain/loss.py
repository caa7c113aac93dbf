"""Bradley-Terry loss and reward statistics: pure tensor math, no model, no I/O."""

from __future__ import annotations

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


def objective(
    loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: float | None = None
) -> torch.Tensor:
    """Per-pair training objective from the pairs' Bradley-Terry `loss`: plus the centering term when its
    coefficient is set. Its mean over pairs is what is optimised."""
    if center_rewards_coefficient:
        return loss + center_rewards_coefficient * centering_penalty(chosen, rejected)
    return loss


def pair_stats(
    chosen: torch.Tensor, rejected: torch.Tensor, loss: torch.Tensor, center_rewards_coefficient: float | None = None
) -> dict[str, float]:
    """Metrics over every pair given (already gathered across processes).

    `loss` is the Bradley-Terry loss (margins included) everywhere: training logs, fit's eval and `rmtrain
    eval` agree on it whatever the recipe. With a centering coefficient, `objective` adds the centering term:
    what training minimises. accuracy counts a tie as wrong (strict >), as RewardBench does; reward statistics
    cover chosen and rejected together.
    """
    chosen = chosen.detach().double()
    rejected = rejected.detach().double()
    rewards = torch.cat([chosen, rejected])
    values = {
        "loss": loss.detach().double().mean().item(),
        "accuracy": (chosen > rejected).double().mean().item(),
        "margin": (chosen - rejected).mean().item(),
        "mean_reward": rewards.mean().item(),
        "std_reward": rewards.std(unbiased=False).item(),
        "min_reward": rewards.min().item(),
        "max_reward": rewards.max().item(),
        "num_pairs": int(chosen.numel()),
    }
    if center_rewards_coefficient:
        penalty = centering_penalty(chosen, rejected).mean().item()
        values["objective"] = values["loss"] + center_rewards_coefficient * penalty
    return values


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, from the attention mask alone.

    Works with right or left padding and never looks at token ids, so pad == eos is harmless.
    """
    seq_len = attention_mask.shape[-1]
    positions = torch.arange(seq_len, device=attention_mask.device)
    return (positions * attention_mask.bool()).argmax(-1)
