"""Rewards without gradients: the one set-up and the one batch loop of fit's eval, `rmtrain eval`, `rmtrain score`,
export's statistics and `rmtrain serve` (the same layout, token budget and batches, rmtrain.batching's inference
batches), gathered across processes; out of memory on a batch handled here, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import torch

from rmtrain.aggregate import Aggregate
from rmtrain.batching import inference_loader
from rmtrain.diagnostics import list_stats
from rmtrain.errors import ResourceError
from rmtrain.faults import is_out_of_memory
from rmtrain.groups import Group
from rmtrain.layout import Layout, choose_layout
from rmtrain.loss import bradley_terry_loss, pair_stats
from rmtrain.model import RewardModel, batch_rewards


@dataclass
class Inference:
    """A model ready to score, and how its batches are built."""

    accelerator: Any
    model: torch.nn.Module
    """The model as it runs (prepared by the accelerator: DDP, FSDP, on its device)."""
    rm: RewardModel
    layout: Layout
    max_tokens: int | None
    """Tokens per batch, padding included (None: unbounded)."""
    max_sequences: int
    """Sequences per batch."""
    aggregate: Aggregate = Aggregate()
    """How an ensemble's rewards (its heads') make the one reward metrics and answers read."""


def prepare_inference(rm: RewardModel, max_tokens: int | str | None = "auto", max_sequences: int = 32, share_prefix: bool = True,
                      aggregate: Aggregate = Aggregate()) -> Inference:
    """The set-up of `eval`, `score`, `serve` and export: the accelerator if there is one (else the CPU), the model
    in eval mode on it, its layout (rmtrain.layout), and the token budget (`auto`: from the model's size)."""
    from rmtrain.budget import inference_tokens_per_forward
    from rmtrain.engine import inference_accelerator

    accelerator = inference_accelerator()
    layout = choose_layout(rm, share_prefix, padding_free=False)
    if max_tokens == "auto":
        max_tokens = inference_tokens_per_forward(rm.model, accelerator.device)
    model = accelerator.prepare(rm.model)
    model.eval()
    return Inference(accelerator, model, rm, layout, max_tokens, max_sequences, aggregate)


def batches(inference: Inference, groups: list[Group]) -> tuple[Any, int]:
    """The inference batches of `groups` (each carries `key`, the number of its sequences) and how many sequences
    they score; not sharded across processes (a caller that shards prepares the loader, `inference_set`)."""
    return inference_loader(groups, inference.layout.name, inference.rm.fmt.pad_token_id, inference.layout.mask_format,
                            inference.max_sequences, inference.max_tokens)


class Scored(NamedTuple):
    keys: torch.Tensor
    """The numbers of the batch's sequences (CPU), each once."""
    rewards: torch.Tensor | None
    """Their rewards [sequences, heads] (float32, CPU); None: the batch ran out of memory (one process: the caller decides)."""
    tokens: int
    """What the batch computed, padding included."""


def score_batches(inference: Inference, loader) -> Iterator[Scored]:
    """The one no-grad batch loop: each batch's rewards, gathered across processes, each sequence once (Accelerate
    repeats sequences to even out the last batches). `no_grad`, not `inference_mode`: under ZeRO-3 and FSDP (fit's
    eval) inference tensors would break the next training step's backward."""
    from accelerate.utils import send_to_device

    model, accelerator = inference.model, inference.accelerator
    was_training = model.training
    model.eval()
    seen: set[int] = set()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = send_to_device(batch, accelerator.device)
                tokens = batch["input_ids"].numel()
                try:
                    rewards = batch_rewards(model, inference.rm, batch)
                except (torch.OutOfMemoryError, RuntimeError) as error:
                    if not is_out_of_memory(error):
                        raise
                    if accelerator.num_processes > 1:  # the others wait in the gather: end here
                        raise ResourceError(out_of_memory_message(inference, len(batch["key"]), tokens)) from None
                    yield Scored(batch["key"].cpu(), None, tokens)
                    continue
                keys, rewards = gather_per_item(accelerator, rewards, key=batch["key"])
                keys, rewards = keys.cpu(), rewards.cpu()
                keep = first_occurrences(keys, seen)
                yield Scored(keys[keep], rewards[keep], tokens)
    finally:
        model.train(was_training)


def out_of_memory_message(inference: Inference, sequences: int, tokens: int) -> str:
    return (
        f"out of memory scoring a batch of {sequences} sequences, {tokens:,} tokens (at most {inference.max_tokens or 'unbounded'} "
        f"tokens and {inference.max_sequences} sequences per batch); pass a smaller --max-tokens-per-forward or --batch-size"
    )


def rewards_of_batch(inference: Inference, scored: Scored) -> torch.Tensor:
    """A batch's rewards, for callers that cannot go on without them: out of memory is a one-line error."""
    if scored.rewards is None:
        raise ResourceError(out_of_memory_message(inference, len(scored.keys), scored.tokens))
    return scored.rewards


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


def inference_set(inference: Inference, groups: list[Group], source_names: list[str] | None = None) -> InferenceSet:
    loader, sequences = batches(inference, groups)
    return InferenceSet(groups, inference.accelerator.prepare(loader), sequences, source_names)


def group_rewards(inference: Inference, scored: InferenceSet) -> list[torch.Tensor]:
    """Each group's completion rewards [completions, heads] (float32, CPU), in the order of `scored.groups`."""
    flat = torch.full((scored.sequences, inference.rm.heads), float("nan"))
    for batch in score_batches(inference, scored.loader):
        flat[batch.keys] = rewards_of_batch(inference, batch)
    sizes = [len(g.completions) for g in scored.groups]
    return list(flat.split(sizes)) if sizes else []


def rewards_of(inference: Inference, groups: list[Group]) -> list[torch.Tensor]:
    """Each group's completion rewards [completions, heads], computed as `rmtrain eval` computes them."""
    return group_rewards(inference, inference_set(inference, groups))


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


def evaluate_pairs(inference: Inference, scored: InferenceSet) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics over every pair of `scored` (and, for ranked lists, top-1 accuracy and Kendall's tau), and the
    per-pair values they come from; `per_pair["group_rewards"]` holds each group's rewards (`inference.aggregate` of
    its heads') and `per_pair["group_heads"]` each head's."""
    heads = group_rewards(inference, scored)
    rewards = [inference.aggregate(r) for r in heads]
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
    return metrics, per_pair | {"group_rewards": rewards, "group_heads": heads}
