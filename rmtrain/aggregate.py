"""One reward from an ensemble's rewards (reward heads on one trunk, or member models): their mean, their minimum
(worst-case optimization, Coste et al. 2023, arXiv 2310.02743) or their mean minus a multiple of their spread
(uncertainty-weighted optimization, the same paper). A single reward model is an ensemble of one: every aggregate
is its reward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from rmtrain.errors import DataError

CHOICES = "mean, min, or mean-std:LAMBDA (e.g. mean-std:1.0)"


@dataclass(frozen=True)
class Aggregate:
    how: str = "mean"
    """"mean", "min" or "mean-std"."""
    spread_weight: float = 0.0
    """LAMBDA of mean-std: how much of the members' standard deviation is taken off their mean."""

    @classmethod
    def parse(cls, text: str, where: str = "--aggregate") -> "Aggregate":
        how, _, weight = text.strip().partition(":")
        if how in ("mean", "min") and not weight:
            return cls(how)
        if how == "mean-std":
            try:
                value = float(weight)
            except ValueError:
                value = float("nan")
            if value >= 0:
                return cls(how, value)
        raise DataError(f"{where}: {text!r} is not an aggregate; expected {CHOICES}")

    def __str__(self) -> str:
        return f"mean-std:{self.spread_weight:g}" if self.how == "mean-std" else self.how

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        """[..., members] -> [...]."""
        if self.how == "min":
            return rewards.min(-1).values
        mean = rewards.mean(-1)
        if self.how == "mean-std":
            return mean - self.spread_weight * spread(rewards)
        return mean


def spread(rewards: torch.Tensor) -> torch.Tensor:
    """The members' standard deviation [..., members] -> [...] (over the members themselves: no sample correction;
    0 for one member)."""
    return rewards.std(-1, unbiased=False)


class Reading(NamedTuple):
    """An ensemble's rewards read out, one value per sequence: `reward` (the aggregate), and for more than one member
    their mean, their spread and each member's reward (None for a single reward model, whose reward is all there is)."""

    reward: list[float]
    mean: list[float] | None
    std: list[float] | None
    members: list[list[float]] | None

    def fields(self, i: int) -> dict:
        """The i-th sequence's fields as `rmtrain score` writes them."""
        if self.members is None:
            return {"reward": self.reward[i]}
        return {"reward": self.reward[i], "reward_mean": self.mean[i], "reward_std": self.std[i], "rewards": self.members[i]}


def read(aggregate: Aggregate, rewards: torch.Tensor) -> Reading:
    """[sequences, members] float32 -> what score rows and the server's answers carry (the same numbers, computed here
    alone)."""
    if rewards.shape[-1] == 1:
        return Reading(rewards[:, 0].tolist(), None, None, None)
    return Reading(aggregate(rewards).tolist(), rewards.mean(-1).tolist(), spread(rewards).tolist(), rewards.tolist())
