"""Rewards of tokenized groups without gradients: the one inference path of fit's eval, `rmtrain eval`,
`rmtrain score` and export's statistics (same batches, same token budget), gathered across processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from rmtrain.batching import inference_loader
from rmtrain.data import Group
from rmtrain.diagnostics import list_stats
from rmtrain.loss import bradley_terry_loss, pair_stats
from rmtrain.model import RewardModel, batch_rewards


def gather_per_item(accelerator, *values: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-item values of every process, as (key, *values); batches may differ in size across processes.

    Rows padded in for the gather are dropped. An item that accelerate repeats to even out the last
    batches still appears twice: callers drop repeated keys (see `first_occurrences`).
    """
    if accelerator.num_processes == 1:
        return (key, *values)
    count = accelerator.gather(torch.tensor([key.shape[0]], device=key.device))

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        padded = accelerator.pad_across_processes(tensor, dim=0, pad_index=-1)
        gathered, width = accelerator.gather(padded), padded.shape[0]
        keep = torch.cat([torch.arange(i * width, i * width + int(n), device=gathered.device) for i, n in enumerate(count)])
        return gathered[keep]

    # Keys are gathered as integers (a float would round pair keys), the values in one float tensor.
    if not values:
        return (gather(key),)
    return (gather(key), *gather(torch.stack(values, dim=1)).unbind(dim=1))


def first_occurrences(keys: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """Boolean mask of keys not in `seen` (their first time), updating `seen`."""
    keep = []
    for k in keys.tolist():
        keep.append(k not in seen)
        seen.add(k)
    return torch.tensor(keep, dtype=torch.bool)


@dataclass
class InferenceSet:
    """Groups and their prepared inference loader (built once: Accelerate checkpoints every loader it prepared)."""

    groups: list[Group]
    loader: Any
    sequences: int
    source_names: list[str] | None = None
    """With several sources: their names, for metrics per source."""


def inference_set(
    accelerator, groups: list[Group], layout: str, mask_format: str, pad_token_id: int, max_sequences: int,
    max_tokens: int | None, source_names: list[str] | None = None,
) -> InferenceSet:
    loader, sequences = inference_loader(groups, layout, pad_token_id, mask_format, max_sequences, max_tokens)
    return InferenceSet(groups, accelerator.prepare(loader), sequences, source_names)


@torch.no_grad()  # not inference_mode: under ZeRO-3 (fit's eval) its tensors would break the next backward
def iter_rewards(accelerator, model, rm: RewardModel, loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, rewards) of each batch's sequences on the CPU, gathered across processes, each sequence once."""
    was_training = model.training
    model.eval()
    seen: set[int] = set()
    try:
        for batch in loader:
            keys, rewards = gather_per_item(accelerator, batch_rewards(model, rm, batch), key=batch["key"])
            keys, rewards = keys.cpu(), rewards.cpu()
            keep = first_occurrences(keys, seen)
            yield keys[keep], rewards[keep]
    finally:
        model.train(was_training)


def group_rewards(accelerator, model, rm: RewardModel, scored: InferenceSet) -> list[torch.Tensor]:
    """Each group's completion rewards (float32, CPU), in the order of `scored.groups`."""
    flat = torch.full((scored.sequences,), float("nan"))
    for keys, rewards in iter_rewards(accelerator, model, rm, scored.loader):
        flat[keys] = rewards
    sizes = [len(g.completions) for g in scored.groups]
    return list(flat.split(sizes)) if sizes else []


def pair_values(groups: list[Group], rewards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per pair: source row, the (better, worse) completion indices in their row, chosen and rejected rewards,
    the Bradley-Terry loss (the data's margins included), and each response's tokens after the row's common
    prefix (the prompt never counts)."""
    columns: dict[str, list] = {k: [] for k in ("row", "source", "better", "worse", "chosen", "rejected", "margin", "chosen_tokens", "rejected_tokens")}
    for g, r in zip(groups, rewards):
        for p, (better, worse) in enumerate(g.pairs):
            for key, value in (("row", g.row), ("source", g.source), ("better", better), ("worse", worse), ("chosen", r[better]), ("rejected", r[worse]),
                               ("margin", g.margins[p] if g.margins is not None else 0.0),
                               ("chosen_tokens", len(g.completions[better])), ("rejected_tokens", len(g.completions[worse]))):
                columns[key].append(value)
    values = {k: torch.tensor(v, dtype=torch.long) for k, v in columns.items() if k not in ("chosen", "rejected", "margin")}
    values["chosen"], values["rejected"] = torch.stack(columns["chosen"]), torch.stack(columns["rejected"])
    values["loss"] = bradley_terry_loss(values["chosen"], values["rejected"], torch.tensor(columns["margin"], dtype=torch.float32))
    return values


def evaluate_pairs(accelerator, model, rm: RewardModel, scored: InferenceSet) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics over every pair of `scored` (and, for ranked lists, top-1 accuracy and Kendall's tau), and the
    per-pair values they come from; `per_pair["group_rewards"]` holds each group's rewards."""
    rewards = group_rewards(accelerator, model, rm, scored)
    per_pair = pair_values(scored.groups, rewards)
    metrics = pair_stats(per_pair["chosen"], per_pair["rejected"], per_pair["loss"])
    if any(g.scores is not None for g in scored.groups):
        metrics |= list_stats([g.scores for g in scored.groups], rewards)
    if scored.source_names and len(scored.source_names) > 1:
        metrics["by_source"] = {}
        for index, name in enumerate(scored.source_names):
            mine = per_pair["source"] == index
            entry = pair_stats(per_pair["chosen"][mine], per_pair["rejected"][mine], per_pair["loss"][mine])
            members = [(g, r) for g, r in zip(scored.groups, rewards) if g.source == index]
            if any(g.scores is not None for g, _ in members):
                entry |= list_stats([g.scores for g, _ in members], [r for _, r in members])
            metrics["by_source"][name] = entry
    return metrics, per_pair | {"group_rewards": rewards}
