"""Scoring preference pairs with a reward model: used by `fit` (periodic eval) and `rmtrain eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rmtrain.config import DataSource
from rmtrain.batching import choose_layout, make_dataloader
from rmtrain.data import check_single_shape, read_rows, tokenize_pairs
from rmtrain.log import RunLog
from rmtrain.loss import pair_stats, reward_loss
from rmtrain.model import RewardModel, batch_rewards, load_saved


def gather_pairs(accelerator, *values: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-pair values of every process, as (row, *values); batches may differ in size across processes.

    Rows padded in for the gather are dropped. A pair that accelerate repeats to even out the last
    batches still appears twice: callers drop repeated rows (see `first_occurrences`).
    """
    if accelerator.num_processes == 1:
        return (row, *values)
    stacked = torch.stack([row.to(values[0].dtype), *values], dim=1)  # [pairs, 1 + k]
    padded = accelerator.pad_across_processes(stacked, dim=0, pad_index=-1)
    count = accelerator.gather(torch.tensor([stacked.shape[0]], device=stacked.device))
    gathered = accelerator.gather(padded)
    width = padded.shape[0]
    keep = torch.cat([torch.arange(i * width, i * width + int(n), device=gathered.device) for i, n in enumerate(count)])
    gathered = gathered[keep]
    return (gathered[:, 0].long(), *gathered[:, 1:].unbind(dim=1))


def first_occurrences(rows: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """Boolean mask of rows not in `seen` (first time this epoch), updating `seen`."""
    keep = []
    for r in rows.tolist():
        keep.append(r not in seen)
        seen.add(r)
    return torch.tensor(keep, dtype=torch.bool)


@torch.inference_mode()
def score_pairs(
    accelerator, model, rm: RewardModel, dataloader, center_rewards_coefficient: float | None = None
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics over every pair of `dataloader`, gathered across processes, each pair counted once.

    Returns the metrics and the per-pair tensors (row, chosen, rejected, loss) on the CPU.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"row": [], "chosen": [], "rejected": [], "loss": []}
    for batch in dataloader:
        chosen, rejected = batch_rewards(model, rm, batch)
        loss = reward_loss(chosen, rejected, batch.get("margin"), center_rewards_coefficient)
        for key, value in zip(parts, gather_pairs(accelerator, chosen, rejected, loss, row=batch["row"])):
            parts[key].append(value.cpu())
    model.train(was_training)
    per_pair = {k: torch.cat(v) for k, v in parts.items()}
    keep = first_occurrences(per_pair["row"], set())
    per_pair = {k: v[keep] for k, v in per_pair.items()}
    return pair_stats(per_pair["chosen"], per_pair["rejected"], per_pair["loss"]), per_pair


def run_eval(
    model_path: str,
    data_path: str,
    split: str = "train",
    max_length: int | None = None,
    truncation: str = "filter",
    batch_size: int = 16,
    json_out: str | None = None,
    log: RunLog | None = None,
) -> dict[str, Any]:
    """`rmtrain eval`: load a saved model (full or adapter), score a preference file, print and save metrics."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.accelerator.is_available())
    log = log or RunLog(enabled=accelerator.is_main_process)
    rm, trained_max_length = load_saved(model_path)
    max_length = max_length or trained_max_length or 1024
    rows, name = read_rows(DataSource(path=data_path, split=split))
    check_single_shape(rows, name)
    pairs, stats = tokenize_pairs(rows, name, rm.tokenizer, rm.fmt, max_length, truncation)
    log.info(stats.line(truncation, max_length))
    if not pairs:
        from rmtrain.data import DataError

        raise DataError(f"{name}: no pairs left to evaluate (see the line above); try --truncation truncate")
    layout, mask_format, _ = choose_layout(rm, share_prefix=True, padding_free=False)
    # Longest first: similar lengths share a batch (less padding), and memory peaks at once, not late.
    dataloader, _ = make_dataloader(
        pairs, layout, rm.fmt.pad_token_id, mask_format, batch_size, 0, shuffle=False, length_grouped=True
    )
    model, dataloader = accelerator.prepare(rm.model, dataloader)
    metrics, _ = score_pairs(accelerator, model, rm, dataloader)
    metrics["num_pairs_read"] = stats.read
    log.table(f"eval: {model_path} on {name}", metrics)
    if json_out and accelerator.is_main_process:
        Path(json_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
