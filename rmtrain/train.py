"""`rmtrain fit`: accelerator, data, model, optimizer, prepare, loop, eval, save, top to bottom in `fit`;
one batch's forward/backward passes and optimizer step in `train_step`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmtrain.batching import LengthGroupedBatchSampler, choose_layout, collate_for, token_counts, training_loader
from rmtrain.budget import auto_tokens_per_forward, inference_tokens_per_forward
from rmtrain.config import Recipe, TrainConfig, dump_recipe
from rmtrain.data import Group, load_pairs, read_splits, token_ids
from rmtrain.embedding import seen_rows_count, train_seen_rows_only
from rmtrain.engine import check_engine, is_deepspeed, is_sharded, make_accelerator, sum_over_processes
from rmtrain.errors import NonFiniteLossError, ResourceError
from rmtrain.faults import StopRequest, interrupted_message, is_out_of_memory, nonfinite_message, out_of_memory_message
from rmtrain.log import RunLog, Throughput
from rmtrain.loss import bradley_terry_loss, objective, pair_stats
from rmtrain.model import RewardModel, batch_rewards, load_reward_model
from rmtrain.runs import (
    TrainState,
    check_output_dir,
    claim_output_dir,
    load_checkpoint,
    save_checkpoint,
    save_final,
    write_run_info,
)
from rmtrain.scoring import evaluate_pairs, first_occurrences, gather_per_item, inference_set


def fit(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t, out = recipe.train, Path(recipe.train.output_dir)

    # Accelerator --------------------------------------------------------------------------------
    accelerator, bf16 = make_accelerator(t)
    is_main = accelerator.is_main_process
    log = RunLog(out / "metrics.jsonl", enabled=is_main)
    log.info(
        f"rmtrain fit: {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}), "
        f"device {accelerator.device}, precision {'bf16' if bf16 else 'fp32'}, output {out}"
    )
    checkpoint = check_output_dir(out, resume, overwrite, log)
    check_engine(accelerator, t, log)

    # Data and model -----------------------------------------------------------------------------
    set_seed(t.seed)
    rows = read_splits(recipe.data)  # a bad data file fails before the model loads
    rm = load_reward_model(recipe.model, recipe.lora, t.gradient_checkpointing)
    train_groups, eval_groups, preflight = load_pairs(recipe.data, rm.tokenizer, rm.fmt, t.seed, rows)
    for stats in preflight:
        log.info(stats.line(recipe.data.truncation, recipe.data.max_length))
    if is_main:
        claim_output_dir(out, overwrite, resuming=checkpoint is not None)
    accelerator.wait_for_everyone()
    batches = plan_batches(accelerator, rm, t, bf16, train_groups, log)

    # Optimizer, prepare, schedule ---------------------------------------------------------------
    if t.embedding_rows == "seen" and not is_sharded(accelerator):
        note = train_seen_rows_only(rm.model, torch.tensor(token_ids(train_groups, rm.fmt.pad_token_id)), t.weight_decay)
        if note:
            log.info(note)
    optimizer = make_optimizer(rm.model, t)
    model, optimizer, train_dl = accelerator.prepare(rm.model, optimizer, batches.train)
    eval_set = None
    if eval_groups:
        eval_tokens = inference_tokens_per_forward(rm.model, accelerator.device) if t.max_tokens_per_forward == "auto" else t.max_tokens_per_forward
        eval_set = inference_set(accelerator, eval_groups, batches.layout, batches.mask_format, rm.fmt.pad_token_id,
                                 2 * (t.eval_batch_size or t.per_device_batch_size), eval_tokens)
    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or math.ceil(t.num_epochs * steps_per_epoch)
    # The schedule is stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    accelerator.register_for_checkpointing(scheduler)
    per_step = accelerator.num_processes * t.per_device_batch_size * t.gradient_accumulation_steps
    log.info(
        f"{len(train_groups)} training pairs, {accelerator.num_processes} x {t.per_device_batch_size} pairs x "
        f"{t.gradient_accumulation_steps} accumulation = {per_step} pairs per step, {steps_per_epoch} steps per epoch, "
        f"{total_steps} steps"
    )
    state = TrainState(seen_embedding_rows=seen_rows_count(rm.model))
    if checkpoint is not None:
        state = load_checkpoint(accelerator, out, checkpoint, state.seen_embedding_rows, t.embedding_rows)
        if state.batches_in_epoch >= len(train_dl):
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        log.info(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    if is_main:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))

    # Loop ---------------------------------------------------------------------------------------
    metrics = StepMetrics(accelerator, t.center_rewards_coefficient)
    stop = StopRequest(log)
    last_eval: dict[str, float] | None = None
    saved_step, in_a_row, skip = state.step, 0, False
    offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if t.activation_offloading else contextlib.nullcontext()
    model.train()
    log.start_progress(total_steps, completed=state.step)
    metrics.speed.resume()
    try:
        while state.step < total_steps:
            train_dl.set_epoch(state.epoch)
            if batches.sampler is not None:
                batches.sampler.set_epoch(state.epoch)
            if state.batches_in_epoch == 0:
                metrics.new_epoch()
            epoch = accelerator.skip_first_batches(train_dl, state.batches_in_epoch) if state.batches_in_epoch else train_dl
            for passes in epoch:
                with offload:
                    result = train_step(accelerator, model, optimizer, rm, passes, t, skip)
                state.batches_in_epoch += 1
                skip = metrics.add(result)
                if not accelerator.sync_gradients:
                    continue
                # A skipped step still counts as a step: the schedule and the data position advance as in a
                # run without it; only the weights and optimizer moments stay as they were.
                scheduler.step()
                state.step += 1
                log.advance()
                rows = metrics.end_step(kept=not skip)
                in_a_row = in_a_row + 1 if skip else 0
                if skip:
                    state.skipped_steps += 1
                    log.warn(f"step {state.step}: non-finite loss or gradient norm, optimizer step skipped ({in_a_row} in a row)")
                    if in_a_row >= t.max_nonfinite_steps:
                        raise NonFiniteLossError(nonfinite_message(t.max_nonfinite_steps, state.step, rows, recipe, out, saved_step))
                skip = False
                if state.step % t.logging_steps == 0 or state.step == total_steps:
                    values = metrics.take()
                    if values is not None:
                        epoch_done = state.epoch + state.batches_in_epoch / len(train_dl)
                        extra = {"learning_rate": scheduler.get_last_lr()[0], "epoch": epoch_done, "skipped_steps": state.skipped_steps}
                        log.metrics("train", state.step, values | extra)
                if eval_set is not None and t.eval_steps and state.step % t.eval_steps == 0 and state.step != total_steps:
                    with metrics.speed.paused():
                        last_eval, _ = evaluate_pairs(accelerator, model, rm, eval_set, t.center_rewards_coefficient)
                    log.metrics("eval", state.step, last_eval)
                if t.save_steps and state.step % t.save_steps == 0 and state.step != total_steps and not in_a_row:
                    with metrics.speed.paused():
                        save_checkpoint(accelerator, out, state, t.save_total_limit)
                    saved_step = state.step
                if state.step >= total_steps:
                    break
                if stop.agreed(accelerator):
                    stop_with_checkpoint(accelerator, out, state, saved_step, t, log, stop.signum)
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    except PassOutOfMemory as error:
        raise ResourceError(out_of_memory_message(error.batch, t, state.step, batches.max_tokens_per_forward)) from None
    finally:
        stop.restore()
        log.stop_progress()

    # Final evaluation and save ------------------------------------------------------------------
    if eval_set is not None:
        last_eval, _ = evaluate_pairs(accelerator, model, rm, eval_set, t.center_rewards_coefficient)
        log.metrics("eval", state.step, last_eval)
        log.table(f"final eval ({len(eval_groups)} pairs)", last_eval)
    save_final(accelerator, model, rm, recipe, out)
    info = {
        "complete": True,
        "num_processes": accelerator.num_processes,
        "steps": state.step,
        "train_pairs": len(train_groups),
        "eval_pairs": len(eval_groups) if eval_groups else 0,
        "max_tokens_per_forward": batches.max_tokens_per_forward,  # resolved when the recipe says auto
        "final_eval": last_eval,
        "train": metrics.speed.totals(),
    }
    if is_main:
        write_run_info(out, info)
        log.info(f"saved {'adapter' if recipe.lora else 'model'} to {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return info


# --------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Batches:
    layout: str
    mask_format: str
    max_tokens_per_forward: int | None
    """Resolved (`auto` -> a number); None: one pass per batch."""
    train: Any
    sampler: LengthGroupedBatchSampler | None


def plan_batches(accelerator, rm: RewardModel, t: TrainConfig, bf16: bool, groups: list[Group], log: RunLog) -> Batches:
    """The batch layout, the pass budget and the training loader, with the pre-flight line that says what they compute."""
    layout, mask_format, note = choose_layout(rm, t.share_prefix, t.padding_free)
    if note:
        log.info(note)
    budget, budget_note = t.max_tokens_per_forward, ""
    if budget == "auto":
        budget, budget_note = auto_tokens_per_forward(rm.model.config, bf16, t.gradient_checkpointing, accelerator.device)
    if budget and is_deepspeed(accelerator):
        # DeepSpeed steps the optimizer inside backward(): one backward per batch.
        log.info("DeepSpeed: train.max_tokens_per_forward does not apply, each batch runs in one pass")
        budget = None
    loader, sampler = training_loader(
        groups, layout, collate_for(layout, rm.fmt.pad_token_id, mask_format), t.per_device_batch_size, t.seed,
        length_grouped=t.batching == "length_grouped", max_tokens_per_batch=t.max_tokens_per_batch,
        max_tokens_per_forward=budget, num_processes=accelerator.num_processes,
    )
    line = f"batches: {layout} layout, {t.batching} order" + (f", {t.max_tokens_per_batch} tokens per batch" if t.max_tokens_per_batch else "")
    if budget:
        line += f", at most {budget} tokens per forward" + (f" ({budget_note})" if budget_note else "")
    else:
        line += ", one forward per batch"
    if sampler is not None:
        computed, real, unique = token_counts(groups, sampler, layout)
        line += f"; tokens per epoch: {computed:,} computed, {real:,} real ({computed / real:.2f}x), {unique:,} unique"
    log.info(line)
    return Batches(layout, mask_format, budget, loader, sampler)


def stop_with_checkpoint(accelerator, out: Path, state: TrainState, saved_step: int, t: TrainConfig, log: RunLog, signum: int) -> None:
    """After SIGINT/SIGTERM: save the step just finished (unless saved already), say how to resume, exit 128 + signum."""
    log.stop_progress()
    if saved_step != state.step:
        save_checkpoint(accelerator, out, state, t.save_total_limit)
    log.info(interrupted_message(state.step, out, accelerator.num_processes))
    accelerator.end_training()
    raise SystemExit(128 + signum)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},  # biases and norms
    ]
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=True)


# --------------------------------------------------------------------------------------------------
# One batch


class PassOutOfMemory(RuntimeError):
    """Out of memory inside `train_step`; `batch` is the pass it happened in (None: before any forward)."""

    def __init__(self, batch: dict[str, torch.Tensor] | None):
        super().__init__("out of memory")
        self.batch = batch


@dataclass
class BatchResult:
    """What `train_step` computed, this process's pairs only."""

    rows: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    loss: torch.Tensor
    """Bradley-Terry loss per pair (margins included), detached."""
    skip: bool
    """The optimizer step this batch belongs to is skipped: a pass was non-finite, on some process."""
    real_tokens: torch.Tensor | int
    computed_tokens: int


def train_step(accelerator, model, optimizer, rm: RewardModel, passes: list[dict[str, torch.Tensor]], t: TrainConfig, skip: bool = False) -> BatchResult:
    """One batch, computed in its passes, then, at the end of an accumulated step, the optimizer step.

    Each pass backpropagates its pairs' summed objective times `num_processes / global_pairs`: summed over
    passes and averaged over processes (DDP's all-reduce on the last pass), that is the gradient of the
    mean objective over every pair of the global batch, however the pairs are split into passes and
    processes. A pass whose objective is not finite gets no backward, and then neither does any pass of
    its step on any process (they agree before the last pass's backward, which all-reduces and, under
    DeepSpeed, steps); the step is skipped and its gradients dropped. `skip` carries that across the
    batches of an accumulated step.
    """
    rows, chosen_parts, rejected_parts, losses = [], [], [], []
    real_tokens, computed = 0, 0
    batch = None
    try:
        with accelerator.accumulate(model):
            global_pairs = sum_over_processes(accelerator, sum(len(p["row"]) for p in passes))
            for i, batch in enumerate(passes):
                last = i == len(passes) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    rewards = batch_rewards(model, rm, batch)
                    chosen, rejected = rewards[batch["pair_index"]].unbind(1)
                    loss = bradley_terry_loss(chosen, rejected, batch.get("margin"))
                    minimised = objective(loss, chosen, rejected, t.center_rewards_coefficient)
                    skip = skip or not bool(torch.isfinite(minimised).all())
                    if last:
                        skip = sum_over_processes(accelerator, int(skip)) > 0
                    if not skip:
                        accelerator.backward(minimised.sum() * accelerator.num_processes / global_pairs)
                rows.append(batch["row"])
                chosen_parts.append(chosen.detach())
                rejected_parts.append(rejected.detach())
                losses.append(loss.detach())
                real_tokens += batch["real_tokens"]  # a device tensor: int() would wait for the GPU every pass
                computed += batch["input_ids"].numel()
            if accelerator.sync_gradients and t.max_grad_norm and not skip:
                norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
                skip = norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)).all())
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # at a skipped step: drops the accumulated gradients
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if is_out_of_memory(error):
            raise PassOutOfMemory(batch) from None
        raise
    return BatchResult(torch.cat(rows), torch.cat(chosen_parts), torch.cat(rejected_parts), torch.cat(losses), skip, real_tokens, computed)


# --------------------------------------------------------------------------------------------------
# Training metrics


class StepMetrics:
    """Per-pair values of every process, gathered once per batch (processes may split their batches into
    different numbers of passes), held until their optimizer step is kept or skipped, then pooled until the
    next log line. Each pair counts once per epoch (Accelerate repeats pairs to even out plain batches)."""

    def __init__(self, accelerator, center_rewards_coefficient: float | None):
        self.accelerator = accelerator
        self.center_rewards_coefficient = center_rewards_coefficient
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.window: list[tuple[torch.Tensor, ...]] = []
        self.tokens = [0, 0]  # real, computed: this process's since the last log line
        self.seen: set[int] = set()
        self.speed = Throughput()

    def new_epoch(self) -> None:
        self.seen = set()

    def add(self, result: BatchResult) -> bool:
        """Record a batch; returns whether its step is skipped (as `train_step` said)."""
        self.pending.append(gather_per_item(self.accelerator, result.chosen, result.rejected, result.loss, key=result.rows))
        self.tokens[0] += result.real_tokens
        self.tokens[1] += result.computed_tokens
        return result.skip

    def end_step(self, kept: bool) -> list[int]:
        """Close an optimizer step: its pairs join the window if it was kept. Returns its 1-based source rows."""
        rows = sorted({int(r) + 1 for values in self.pending for r in values[0].tolist()})
        if kept:
            self.window.extend(self.pending)
        self.pending = []
        return rows

    def take(self) -> dict[str, float] | None:
        """Metrics of the pairs since the last call, with throughput; None when no step was kept since."""
        if not self.window:
            return None
        counts = self.accelerator.reduce(torch.stack([torch.as_tensor(n, device=self.accelerator.device) for n in self.tokens]), "sum")
        row, chosen, rejected, loss = (torch.cat(parts) for parts in zip(*self.window))
        first = first_occurrences(row, self.seen).to(chosen.device)
        self.speed.add(int(first.sum()), int(counts[0]), int(counts[1]))
        values = pair_stats(chosen[first], rejected[first], loss[first], self.center_rewards_coefficient)
        self.window, self.tokens = [], [0, 0]
        return values | self.speed.take_window()
