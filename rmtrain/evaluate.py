"""Scoring preference pairs with a reward model: used by `fit` (periodic eval) and `rmtrain eval`."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rmtrain.config import DataSource
from rmtrain.data import check_single_shape, collate_pairs, read_rows, tokenize_pairs
from rmtrain.log import RunLog
from rmtrain.loss import pair_stats, reward_loss
from rmtrain.model import RewardModel, load_saved, sequence_rewards


@torch.inference_mode()
def score_pairs(
    accelerator, model, rm: RewardModel, dataloader, center_rewards_coefficient: float | None = None
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Metrics over every pair of `dataloader`, gathered across processes (each pair counted once).

    Returns the metrics and the per-pair tensors (chosen, rejected, loss, row) on the CPU.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "loss": [], "row": []}
    for batch in dataloader:
        rewards = sequence_rewards(model, rm.head, rm.fmt.is_encoder, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.float().chunk(2)
        loss = reward_loss(chosen, rejected, batch.get("margin"), center_rewards_coefficient)
        gathered = accelerator.gather_for_metrics((chosen, rejected, loss, batch["row"]))
        for key, value in zip(parts, gathered):
            parts[key].append(value.cpu())
    model.train(was_training)
    per_pair = {k: torch.cat(v) for k, v in parts.items()}
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
    from torch.utils.data import DataLoader

    accelerator = Accelerator()
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
    # Longest first: similar lengths share a batch (less padding), and memory peaks at once, not late.
    pairs = sorted(pairs, key=lambda p: -max(len(p["chosen_ids"]), len(p["rejected_ids"])))
    dataloader = DataLoader(pairs, batch_size=batch_size, collate_fn=partial(collate_pairs, pad_token_id=rm.fmt.pad_token_id))
    model, dataloader = accelerator.prepare(rm.model, dataloader)
    metrics, _ = score_pairs(accelerator, model, rm, dataloader)
    metrics["num_pairs_read"] = stats.read
    log.table(f"eval: {model_path} on {name}", metrics)
    if json_out and accelerator.is_main_process:
        Path(json_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
