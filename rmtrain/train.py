"""`rmtrain fit`: accelerator, data, model, optimizer, prepare, loop, eval, save, top to bottom in `fit`;
one batch's forward/backward passes and optimizer step in `train_step`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rmtrain.batching import PAIR_KEY, LengthGroupedBatchSampler, choose_layout, collate_for, token_counts, training_loader
from rmtrain.budget import auto_tokens_per_forward, held_bytes, inference_tokens_per_forward
from rmtrain.config import Recipe, TrainConfig, dump_recipe
from rmtrain.data import Group, load_groups, read_splits, source_labels, token_ids
from rmtrain.embedding import seen_rows_count, train_seen_rows_only
from rmtrain.engine import check_engine, check_trackers, is_deepspeed, is_fsdp, is_sharded, make_accelerator, start_trackers, sum_over_processes
from rmtrain.errors import NonFiniteLossError, ResourceError
from rmtrain.faults import StopRequest, interrupted_message, is_out_of_memory, nonfinite_message, out_of_memory_message
from rmtrain.log import RunLog, Throughput
from rmtrain.loss import Objective, pair_stats
from rmtrain.model import RewardModel, batch_rewards, load_reward_model
from rmtrain.plot import plot_runs
from rmtrain.runs import (
    BestModel,
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
    check_trackers(t)  # a missing tracker package fails before anything loads
    accelerator, bf16 = make_accelerator(t, out)
    is_main = accelerator.is_main_process
    log = RunLog(out / "metrics.jsonl", enabled=is_main, trackers=accelerator if t.report_to else None)
    log.info(
        f"rmtrain fit: {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}), "
        f"device {accelerator.device}, precision {'bf16' if bf16 else 'fp32'}, output {out}"
    )
    checkpoint = check_output_dir(out, resume, overwrite, log)
    check_engine(accelerator, t, log)

    # Data and model -----------------------------------------------------------------------------
    set_seed(t.seed)
    splits = read_splits(recipe.data)  # a bad data file fails before the model loads
    rm = load_reward_model(recipe.model, recipe.lora, t.gradient_checkpointing)
    if rm.weights_dtype != torch.float32 and recipe.lora is None:
        dtype = str(rm.weights_dtype).removeprefix("torch.")
        log.info(f"weights: loaded in {dtype}, trained as float32 master weights ({'bf16' if bf16 else 'fp32'} compute), saved in {dtype}")
    train_groups, eval_groups, preflight = load_groups(recipe.data, rm.tokenizer, rm.fmt, t.seed, splits)
    for stats in preflight:
        log.info(stats.line(recipe.data.truncation, recipe.data.max_length))
    if is_main:
        claim_output_dir(out, overwrite, resuming=checkpoint is not None)
    accelerator.wait_for_everyone()
    batches = plan_batches(accelerator, rm, t, bf16, train_groups, log)

    # Optimizer, prepare, schedule ---------------------------------------------------------------
    if t.embedding_rows == "seen" and not is_sharded(accelerator):
        log.info(train_seen_rows_only(rm.model, torch.tensor(token_ids(train_groups, rm.fmt.pad_token_id)), t.weight_decay))
    optimizer = make_optimizer(rm.model, t)
    model, optimizer, train_dl = accelerator.prepare(rm.model, optimizer, batches.train)
    eval_set = eval_batches(accelerator, rm, t, batches, eval_groups, source_labels(splits.get("eval", []))) if eval_groups else None
    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or math.ceil(t.num_epochs * steps_per_epoch)
    # The schedule is stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    accelerator.register_for_checkpointing(scheduler)
    per_step, kind = accelerator.num_processes * t.per_device_batch_size * t.gradient_accumulation_steps, preflight[0].kind
    log.info(
        f"{len(train_groups)} training {kind}, {accelerator.num_processes} x {t.per_device_batch_size} {kind} x "
        f"{t.gradient_accumulation_steps} accumulation = {per_step} {kind} per step, {steps_per_epoch} steps per epoch, "
        f"{total_steps} steps"
    )
    state = TrainState(seen_embedding_rows=seen_rows_count(rm.model))
    if checkpoint is not None:
        state = load_checkpoint(accelerator, out, checkpoint, state.seen_embedding_rows, t.embedding_rows)
        if state.batches_in_epoch >= len(train_dl):
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        log.info(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    start_trackers(accelerator, recipe, out)
    if is_main:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    best = BestModel(recipe, out)

    # Loop ---------------------------------------------------------------------------------------
    metrics = StepMetrics(accelerator, t, lists=any(len(g.completions) > 2 for g in train_groups))
    row_of = {g.uid: (g.source, g.row) for g in train_groups}  # what a non-finite step names
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
                        rows = [(row_of[uid][0], row_of[uid][1] + 1) for uid in rows]
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
                        last_eval, _ = evaluate_pairs(accelerator, model, rm, eval_set)
                        best.consider(accelerator, model, rm, state, last_eval)
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
        last_eval, _ = evaluate_pairs(accelerator, model, rm, eval_set)
        best.consider(accelerator, model, rm, state, last_eval)
        log.metrics("eval", state.step, last_eval)
        log.table(f"final eval ({len(eval_groups)} {preflight[-1].kind})", last_eval)
    save_final(accelerator, model, rm, recipe, out)
    info = {
        "complete": True,
        "num_processes": accelerator.num_processes,
        "steps": state.step,
        "train_pairs": sum(len(g.pairs) for g in train_groups),
        "eval_pairs": sum(len(g.pairs) for g in eval_groups) if eval_groups else 0,
        **({"train_lists": len(train_groups)} if kind == "lists" else {}),
        "max_tokens_per_forward": batches.max_tokens_per_forward,  # resolved when the recipe says auto
        "final_eval": last_eval,
        "train": metrics.speed.totals(),
        **({"best": best.info(state)} if best.metric else {}),
    }
    if is_main:
        write_run_info(out, info)
        plot_runs([out], out / "curves.png")
        log.info(f"saved {'adapter' if recipe.lora else 'model'} to {out}")
    # No barrier: the other processes end while the main one writes (and merges) the final folder.
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
    layout, mask_format, note = choose_layout(rm, t.share_prefix, t.padding_free, t.prefix_attention)
    if note:
        log.info(note)
    budget, budget_note = t.max_tokens_per_forward, ""
    if budget == "auto":
        shards = accelerator.num_processes if is_fsdp(accelerator) else 1
        held = held_bytes(rm.model, shards)
        budget, budget_note = auto_tokens_per_forward(rm.model.config, bf16, t.gradient_checkpointing, accelerator.device, held)
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


def eval_batches(accelerator, rm: RewardModel, t: TrainConfig, batches: Batches, groups: list[Group], names: list[str]) -> Any:
    """The periodic eval's batches: as `rmtrain eval` builds them, with inference's pass budget when `auto`."""
    tokens = inference_tokens_per_forward(rm.model, accelerator.device) if t.max_tokens_per_forward == "auto" else t.max_tokens_per_forward
    return inference_set(accelerator, groups, batches.layout, batches.mask_format, rm.fmt.pad_token_id,
                         2 * (t.eval_batch_size or t.per_device_batch_size), tokens, names)


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

    keys: torch.Tensor
    """Each pair's key (row * PAIR_KEY + its index in the row)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    loss: torch.Tensor
    """Bradley-Terry loss per pair (the data's margins included), detached."""
    objective: torch.Tensor
    """The batch's objective summed with its weights (detached): divided by `weight`, what is minimised."""
    weight: int
    skip: bool
    """The optimizer step this batch belongs to is skipped: a pass was non-finite, on some process."""
    counts: list
    """Real tokens (a device tensor), computed tokens, rows with pairs, completions."""


def train_step(accelerator, model, optimizer, rm: RewardModel, passes: list[dict[str, Any]], t: TrainConfig, skip: bool = False) -> BatchResult:
    """One batch, computed in its passes, then, at the end of an accumulated step, the optimizer step.

    Each pass backpropagates its objective (summed over its pairs, or rows, with their weights) times
    `num_processes / global weight`: summed over passes and averaged over processes (DDP's all-reduce on the
    last pass), that is the gradient of the objective's mean over the global batch, however it is split into
    passes and processes. A row too long for one pass is computed in chunks of its completions
    (`backward_in_chunks`). A pass whose objective is not finite gets no backward, and then neither does any
    pass of its step on any process (they agree before the last pass's backward, which all-reduces and, under
    DeepSpeed, steps); the step is skipped and its gradients dropped. `skip` carries that across the batches
    of an accumulated step.
    """
    objective = Objective.of(t)
    keys, chosen_parts, rejected_parts, losses, objectives = [], [], [], [], []
    counts = [0, 0, 0, 0]
    batch = None
    try:
        with accelerator.accumulate(model):
            weight = sum(objective.weight(p) for p in passes)
            scale = accelerator.num_processes / max(sum_over_processes(accelerator, weight), 1)
            for i, batch in enumerate(passes):
                last = i == len(passes) - 1
                if "chunks" in batch:
                    skip, values = backward_in_chunks(accelerator, model, rm, batch, objective, scale, last, skip)
                else:
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        values = objective.total(batch_rewards(model, rm, batch), batch)
                        skip = skip or not bool(torch.isfinite(values[0]))
                        if last:
                            skip = sum_over_processes(accelerator, int(skip)) > 0
                        if not skip:
                            accelerator.backward(values[0] * scale)
                minimised, chosen, rejected, loss = values
                keys.append(batch["pair_key"])
                chosen_parts.append(chosen.detach())
                rejected_parts.append(rejected.detach())
                losses.append(loss.detach())
                objectives.append(minimised.detach())
                for j, n in enumerate(pass_counts(batch)):
                    counts[j] += n
            if accelerator.sync_gradients and t.max_grad_norm and not skip:
                norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
                skip = norm is not None and not bool(torch.isfinite(torch.as_tensor(norm)).all())
            if not skip:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # at a skipped step: drops the accumulated gradients
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if is_out_of_memory(error):
            raise PassOutOfMemory(batch["chunks"][0] if batch and "chunks" in batch else batch) from None
        raise
    return BatchResult(torch.cat(keys), torch.cat(chosen_parts), torch.cat(rejected_parts), torch.cat(losses),
                       torch.stack(objectives).sum(), weight, skip, counts)


def backward_in_chunks(accelerator, model, rm: RewardModel, item: dict[str, Any], objective: Objective, scale: float, last: bool, skip: bool):
    """A row too long for one pass, in chunks of its completions (each with the prompt): the rewards of all
    chunks first, without a graph; the objective and its gradient with respect to those rewards; then each
    chunk again with a graph, backpropagating its rewards times that gradient. The objective depends on the
    model only through the rewards, so this is its exact gradient, for any loss over the whole list, at the
    cost of one more forward per chunk."""
    with torch.no_grad():
        rewards = torch.cat([batch_rewards(model, rm, chunk) for chunk in item["chunks"]])
    rewards.requires_grad_(True)
    values = objective.total(rewards, item)
    skip = skip or not bool(torch.isfinite(values[0]))
    if last:
        skip = sum_over_processes(accelerator, int(skip)) > 0
    if not skip:
        (gradient,) = torch.autograd.grad(values[0] * scale, rewards)
        start = 0
        for j, chunk in enumerate(item["chunks"]):
            n = chunk["num_completions"]
            final = last and j == len(item["chunks"]) - 1
            with contextlib.nullcontext() if final else accelerator.no_sync(model):
                accelerator.backward((batch_rewards(model, rm, chunk) * gradient[start : start + n]).sum())
            start += n
    return skip, tuple(v.detach() for v in values)


def pass_counts(batch: dict[str, Any]) -> tuple:
    """(real tokens, computed tokens, rows with pairs, completions) of a pass; a chunked row counts its
    chunks' tokens twice (they are computed twice)."""
    if "chunks" in batch:
        real = sum(chunk["real_tokens"] for chunk in batch["chunks"])
        computed = 2 * sum(chunk["input_ids"].numel() for chunk in batch["chunks"])
    else:  # real_tokens is a device tensor: int() would wait for the GPU every pass
        real, computed = batch["real_tokens"], batch["input_ids"].numel()
    return real, computed, batch["num_groups"], batch["num_completions"]


# --------------------------------------------------------------------------------------------------
# Training metrics


class StepMetrics:
    """Per-pair values of every process, gathered once per batch (processes may split their batches into
    different numbers of passes), held until their optimizer step is kept or skipped, then pooled until the
    next log line. Each pair counts once per epoch (Accelerate repeats pairs to even out plain batches).
    `objective` is logged beside `loss` when they can differ."""

    def __init__(self, accelerator, t: TrainConfig, lists: bool):
        self.accelerator = accelerator
        objective = Objective.of(t)
        self.report_objective = bool(t.center_rewards_coefficient) or (lists and (not objective.per_pair or t.list_margins))
        self.pending: list[tuple] = []
        self.window: list[tuple] = []
        self.sums = [0.0] * 6  # this process's real, computed tokens, rows, completions, objective, weight
        self.seen: set[int] = set()
        self.speed = Throughput(lists=lists)

    def new_epoch(self) -> None:
        self.seen = set()

    def add(self, result: BatchResult) -> bool:
        """Record a batch; returns whether its step is skipped (as `train_step` said)."""
        gathered = gather_per_item(self.accelerator, result.chosen, result.rejected, result.loss, key=result.keys)
        self.pending.append((gathered, [*result.counts, result.objective, result.weight]))
        return result.skip

    def end_step(self, kept: bool) -> list[int]:
        """Close an optimizer step: its values join the window if it was kept. Returns the uids of its groups."""
        uids = sorted({int(k) // PAIR_KEY for values, _ in self.pending for k in values[0].tolist()})
        if kept:
            self.window.extend(values for values, _ in self.pending)
            for _, sums in self.pending:
                self.sums = [a + b for a, b in zip(self.sums, sums)]
        self.pending = []
        return uids

    def take(self) -> dict[str, float] | None:
        """Metrics of the pairs since the last call, with throughput; None when no step was kept since."""
        if not self.window:
            return None
        device = self.accelerator.device
        sums = self.accelerator.reduce(torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64) for v in self.sums]), "sum")
        key, chosen, rejected, loss = (torch.cat(parts) for parts in zip(*self.window))
        first = first_occurrences(key, self.seen).to(chosen.device)
        real, computed, rows, completions, objective_sum, weight = sums.tolist()
        self.speed.add(int(first.sum()), int(real), int(computed), int(rows), int(completions))
        values = pair_stats(chosen[first], rejected[first], loss[first])
        if self.report_objective:
            values["objective"] = objective_sum / max(weight, 1)
        self.window, self.sums = [], [0.0] * 6
        return values | self.speed.take_window()
