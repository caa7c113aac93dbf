"""`rmtrain fit`: accelerator, data, model, optimizer, prepare, loop, eval, save, top to bottom in `fit`;
one batch's forward/backward passes and optimizer step in `train_step`."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rmtrain.batching import PAIR_KEY, LengthGroupedBatchSampler, collate_for, token_counts, training_loader
from rmtrain.budget import auto_tokens_per_forward, held_bytes, inference_tokens_per_forward
from rmtrain.config import Recipe, TrainConfig, dump_recipe
from rmtrain.embedding import seen_rows_count, train_seen_rows_only
from rmtrain.engine import (
    check_engine, check_trackers, is_deepspeed, is_fsdp, is_sharded, is_zero3, make_accelerator, shard_head_in_fp32, start_trackers,
    sum_over_processes, total_over_processes,
)
from rmtrain.errors import NonFiniteLossError, ResourceError
from rmtrain.faults import StopRequest, interrupted_message, is_out_of_memory, nonfinite_message, out_of_memory_message
from rmtrain.flops import peak_flops, reward_model_training_flops
from rmtrain.groups import Group, token_ids
from rmtrain.inference import Inference, InferenceSet, evaluate_pairs, gather_per_item, inference_set
from rmtrain.layout import Layout, choose_layout
from rmtrain.log import RunLog, Throughput
from rmtrain.loss import Objective, bootstrap_weights, pair_stats
from rmtrain.model import RewardModel, batch_rewards, load_reward_model, load_text_side
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
from rmtrain.splits import load_groups, read_splits, source_labels


def fit(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    t, out = recipe.train, Path(recipe.train.output_dir)

    # Accelerator --------------------------------------------------------------------------------
    check_trackers(t)  # a missing tracker package fails before anything loads
    accelerator, bf16 = make_accelerator(t, out)
    log = RunLog(out / "metrics.jsonl", enabled=accelerator.is_main_process, trackers=accelerator if t.report_to else None)
    log.info(
        f"rmtrain fit: {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}), "
        f"device {accelerator.device}, precision {'bf16' if bf16 else 'fp32'}, output {out}"
    )
    checkpoint = check_output_dir(out, resume, overwrite, log)
    check_engine(accelerator, t, log)

    # Data: read, then tokenized, before the weights load ----------------------------------------
    set_seed(t.seed)
    splits = read_splits(recipe.data)
    text = load_text_side(recipe.model, recipe.data.max_length)
    train_groups, eval_groups, preflight = load_groups(recipe.data, *text, t.seed, splits)
    for stats in preflight:
        log.info(stats.line(recipe.data.truncation, recipe.data.max_length))

    # Model --------------------------------------------------------------------------------------
    rm = load_reward_model(recipe.model, recipe.lora, t.gradient_checkpointing, text)
    if rm.weights_dtype != torch.float32 and recipe.lora is None:
        dtype = str(rm.weights_dtype).removeprefix("torch.")
        log.info(f"weights: loaded in {dtype}, trained as float32 master weights ({'bf16' if bf16 else 'fp32'} compute), saved in {dtype}")
    if accelerator.is_main_process:
        claim_output_dir(out, overwrite, resuming=checkpoint is not None)
    accelerator.wait_for_everyone()
    batches = plan_batches(accelerator, rm, t, bf16, train_groups, log)

    # Optimizer, prepare, schedule ---------------------------------------------------------------
    if t.embedding_rows == "seen" and not is_sharded(accelerator):
        log.info(train_seen_rows_only(rm.model, torch.tensor(token_ids(train_groups, rm.fmt.pad_token_id)), t.weight_decay))
    shard_head_in_fp32(accelerator, rm)
    optimizer = make_optimizer(rm.model, t)
    model, optimizer, train_dl = accelerator.prepare(rm.model, optimizer, batches.train)
    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or math.ceil(t.num_epochs * steps_per_epoch)
    # The schedule is stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps), num_training_steps=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    kind = preflight[0].kind
    log.info(
        f"{len(train_groups)} training {kind}, {accelerator.num_processes} x {t.per_device_batch_size} {kind} x "
        f"{t.gradient_accumulation_steps} accumulation = {accelerator.num_processes * t.per_device_batch_size * t.gradient_accumulation_steps} "
        f"{kind} per step, {steps_per_epoch} steps per epoch, {total_steps} steps"
    )
    state = TrainState(seen_embedding_rows=seen_rows_count(rm.model))
    if checkpoint is not None:
        state = load_checkpoint(accelerator, out, checkpoint, state.seen_embedding_rows, t.embedding_rows)
        if state.batches_in_epoch >= len(train_dl):
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        log.info(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})")
    start_trackers(accelerator, recipe, out)
    if accelerator.is_main_process:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    evaluation = None
    if eval_groups:
        inference = Inference(accelerator, model, rm, batches.layout, eval_tokens(rm, t, accelerator), 2 * (t.eval_batch_size or t.per_device_batch_size))
        evaluation = (inference, inference_set(inference, eval_groups, source_labels(splits.get("eval", []))))
    metrics = StepMetrics(accelerator, t, lists=any(len(g.completions) > 2 for g in train_groups),
                          flops_of=partial(reward_model_training_flops, rm.model.config, rm.fmt.is_encoder), peak_flops=device_peak(accelerator, t))
    run = Run(accelerator, model, optimizer, scheduler, rm, recipe, out, log, train_dl, batches, evaluation, BestModel(recipe, out),
              total_steps, {g.uid: (g.source, g.row) for g in train_groups})

    # Loop ---------------------------------------------------------------------------------------
    last_eval = train_loop(run, state, metrics)

    # Final evaluation and save ------------------------------------------------------------------
    if evaluation is not None:
        last_eval = run.evaluate(state)
        log.table(f"final eval ({len(eval_groups)} {preflight[-1].kind})", last_eval)
    engine = {"distributed_type": accelerator.distributed_type.value}
    if is_fsdp(accelerator):
        engine |= {"fsdp_version": accelerator.state.fsdp_plugin.fsdp_version, "idle_forwards": sum_over_processes(accelerator, metrics.idle_forwards)}
    save_final(accelerator, model, rm, recipe, out)
    info = {
        "complete": True, "num_processes": accelerator.num_processes, **engine, "steps": state.step,
        "train_pairs": sum(len(g.pairs) for g in train_groups), "eval_pairs": sum(len(g.pairs) for g in eval_groups or []),
        **({"train_lists": len(train_groups)} if kind == "lists" else {}),
        "max_tokens_per_forward": batches.max_tokens_per_forward,  # resolved when the recipe says auto
        "final_eval": last_eval, "train": metrics.speed.totals(), **({"best": run.best.info(state)} if run.best.metric else {}),
    }
    if accelerator.is_main_process:
        write_run_info(out, info)
        plot_runs([out], out / "curves.png")
        log.info(f"saved {'adapter' if recipe.lora else 'model'} to {out}")
    # No barrier: the other processes end while the main one writes (and merges) the final folder.
    accelerator.end_training()
    return info


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """What the loop works with, prepared by `fit`."""

    accelerator: Any
    model: torch.nn.Module
    """Prepared (DDP, FSDP, DeepSpeed)."""
    optimizer: Any
    scheduler: Any
    rm: RewardModel
    recipe: Recipe
    out: Path
    log: RunLog
    loader: Any
    """The prepared training loader: each batch a list of passes."""
    batches: "Batches"
    evaluation: tuple[Inference, InferenceSet] | None
    best: BestModel
    total_steps: int
    row_of: dict[int, tuple[int, int]]
    """Each training group's (source, row): what a non-finite step names."""

    def evaluate(self, state: TrainState) -> dict[str, Any]:
        """The eval set's metrics now, logged; the model kept as the best so far when it is (`train.keep_best`)."""
        metrics, _ = evaluate_pairs(*self.evaluation)
        self.best.consider(self.accelerator, self.model, self.rm, state, metrics)
        self.log.metrics("eval", state.step, metrics)
        return metrics


def train_loop(run: Run, state: TrainState, metrics: "StepMetrics") -> dict[str, Any] | None:
    """Optimizer steps from `state` until `run.total_steps`; returns the last periodic eval's metrics (or None).

    A SIGINT/SIGTERM ends it after the current step with a checkpoint (exit 128 + signal); out of memory in a pass
    is one line naming the pass."""
    t, accelerator = run.recipe.train, run.accelerator
    stop = StopRequest(run.log)
    offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if t.activation_offloading else contextlib.nullcontext()
    last_eval, saved_step, nonfinite = None, state.step, None
    run.model.train()
    run.log.start_progress(run.total_steps, completed=state.step)
    metrics.speed.resume()
    try:
        while state.step < run.total_steps:
            run.loader.set_epoch(state.epoch)
            if run.batches.sampler is not None:
                run.batches.sampler.set_epoch(state.epoch)
            if state.batches_in_epoch == 0:
                metrics.new_epoch()
            epoch = accelerator.skip_first_batches(run.loader, state.batches_in_epoch) if state.batches_in_epoch else run.loader
            for passes in epoch:
                with offload:
                    result = train_step(accelerator, run.model, run.optimizer, run.rm, passes, t, nonfinite)
                state.batches_in_epoch += 1
                metrics.add(result)
                if not accelerator.sync_gradients:
                    nonfinite = result.nonfinite  # carried to the step's last batch
                    continue
                nonfinite = None
                last_eval = after_step(run, state, metrics, result.skip, saved_step) or last_eval
                if t.save_steps and state.step % t.save_steps == 0 and state.step != run.total_steps and not state.skipped_in_a_row:
                    with metrics.speed.paused():
                        save_checkpoint(accelerator, run.out, state, t.save_total_limit)
                    saved_step = state.step
                if state.step >= run.total_steps:
                    break
                if stop.agreed(accelerator):
                    stop_with_checkpoint(accelerator, run.out, state, saved_step, t, run.log, stop.signum)
            else:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    except PassOutOfMemory as error:
        raise ResourceError(out_of_memory_message(error.batch, t, state.step, run.batches.max_tokens_per_forward)) from None
    finally:
        stop.restore()
        run.log.stop_progress()
    return last_eval


def after_step(run: Run, state: TrainState, metrics: "StepMetrics", skipped: bool, saved_step: int) -> dict[str, Any] | None:
    """The bookkeeping of an optimizer step that just ended: the schedule and counters, the non-finite policy, the
    log line and the periodic eval (whose metrics it returns). A skipped step still counts as a step: the schedule
    and the data position advance as in a run without it; only the weights and optimizer moments stay as they were."""
    t = run.recipe.train
    run.scheduler.step()
    state.step += 1
    run.log.advance()
    metrics.end_step(kept=not skipped)
    state.skipped_in_a_row = state.skipped_in_a_row + 1 if skipped else 0
    if skipped:
        state.skipped_steps += 1
        run.log.warn(f"step {state.step}: non-finite loss or gradient norm, optimizer step skipped ({state.skipped_in_a_row} in a row)")
        if state.skipped_in_a_row >= t.max_nonfinite_steps:
            rows = [(run.row_of[uid][0], run.row_of[uid][1] + 1) for uid in metrics.skipped_groups()]
            raise NonFiniteLossError(nonfinite_message(t.max_nonfinite_steps, state.step, rows, run.recipe, run.out, saved_step))
    if state.step % t.logging_steps == 0 or state.step == run.total_steps:
        values = metrics.take()
        if values is not None:
            epoch_done = state.epoch + state.batches_in_epoch / len(run.loader)
            extra = {"learning_rate": run.scheduler.get_last_lr()[0], "epoch": epoch_done, "skipped_steps": state.skipped_steps}
            run.log.metrics("train", state.step, values | extra)
    if run.evaluation is not None and t.eval_steps and state.step % t.eval_steps == 0 and state.step != run.total_steps:
        with metrics.speed.paused():
            return run.evaluate(state)
    return None


# --------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Batches:
    layout: Layout
    max_tokens_per_forward: int | None
    """Resolved (`auto` -> a number); None: one pass per batch."""
    train: Any
    sampler: LengthGroupedBatchSampler | None


def plan_batches(accelerator, rm: RewardModel, t: TrainConfig, bf16: bool, groups: list[Group], log: RunLog) -> Batches:
    """The batch layout, the pass budget and the training loader, with the pre-flight line that says what they compute."""
    prefix_attention = t.prefix_attention
    if is_zero3(accelerator) and prefix_attention == "segments":
        # The weights are partitioned from the load on: nothing can run the model before DeepSpeed wraps it.
        log.info("DeepSpeed ZeRO-3: segment attention cannot be checked on the partitioned model, using the 4D mask")
        prefix_attention = "mask"
    layout = choose_layout(rm, t.share_prefix, t.padding_free, prefix_attention)
    if layout.note:
        log.info(layout.note)
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
        groups, layout.name, collate_for(layout.name, rm.fmt.pad_token_id, layout.mask_format), t.per_device_batch_size, t.seed,
        length_grouped=t.batching == "length_grouped", max_tokens_per_batch=t.max_tokens_per_batch,
        max_tokens_per_forward=budget, num_processes=accelerator.num_processes,
        workers=t.dataloader_workers if t.dataloader_workers is not None else 2 * (accelerator.device.type == "cuda"),
    )
    line = f"batches: {layout.name} layout, {t.batching} order" + (f", {t.max_tokens_per_batch} tokens per batch" if t.max_tokens_per_batch else "")
    if budget:
        line += f", at most {budget} tokens per forward" + (f" ({budget_note})" if budget_note else "")
    else:
        line += ", one forward per batch"
    if sampler is not None:
        computed, real, unique = token_counts(groups, sampler, layout.name)
        line += f"; tokens per epoch: {computed:,} computed, {real:,} real ({computed / real:.2f}x), {unique:,} unique"
    log.info(line)
    return Batches(layout, budget, loader, sampler)


def stop_with_checkpoint(accelerator, out: Path, state: TrainState, saved_step: int, t: TrainConfig, log: RunLog, signum: int) -> None:
    """After SIGINT/SIGTERM: save the step just finished (unless saved already), say how to resume, exit 128 + signum."""
    log.stop_progress()
    if saved_step != state.step:
        save_checkpoint(accelerator, out, state, t.save_total_limit)
    log.info(interrupted_message(state.step, out, accelerator.num_processes))
    accelerator.end_training()
    raise SystemExit(128 + signum)


def eval_tokens(rm: RewardModel, t: TrainConfig, accelerator) -> int | None:
    """Tokens per batch of the periodic eval: as `rmtrain eval` would choose them when `auto`."""
    return inference_tokens_per_forward(rm.model, accelerator.device) if t.max_tokens_per_forward == "auto" else t.max_tokens_per_forward


def device_peak(accelerator, t: TrainConfig) -> float | None:
    """A GPU's peak bf16 FLOP/s (`train.peak_tflops`, else rmtrain.flops' table), for the MFU in the log; None on a CPU."""
    if accelerator.device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(accelerator.device), t.peak_tflops)


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
    nonfinite: torch.Tensor
    """A device flag: some pass of this process's batches of the step so far had a non-finite objective."""
    skip: bool
    """At the end of an optimizer step: the step was skipped (a non-finite objective or gradient norm, on some process)."""
    idle: int
    """Forwards run only to keep in step with the other processes (FSDP, `lockstep`)."""
    counts: list
    """Real tokens (a device tensor), computed tokens, rows with pairs, completions, model tokens and pairs."""


def train_step(accelerator, model, optimizer, rm: RewardModel, passes: list[dict[str, Any]], t: TrainConfig,
               nonfinite: torch.Tensor | None = None) -> BatchResult:
    """One batch, computed in its passes, then, at the end of an accumulated step, the optimizer step.

    Each pass backpropagates its objective (summed over its pairs, or rows, with their weights) times
    `num_processes / global weight`: summed over passes and averaged over processes (DDP's all-reduce on the
    last pass), that is the gradient of the objective's mean over the global batch, however it is split into
    passes and processes. A row too long for one pass is computed in chunks of its completions: the rewards of all
    chunks first, without a graph, and the objective's gradient with respect to them; then each chunk again with a
    graph, backpropagating its rewards times that gradient (the objective depends on the model only through the
    rewards: its exact gradient, for any loss over the whole list, at one more forward per chunk).

    Under FSDP every forward is a collective: processes whose batches split into fewer passes run idle ones
    (`lockstep`), so all make the same forwards. A non-finite objective is carried as a device flag (`nonfinite`,
    across the batches of an accumulated step) and its pass still backpropagates; at the step's end the processes
    agree, once, whether any objective or the gradient norm was non-finite, and such a step is skipped, its
    gradients dropped. Under DeepSpeed, which steps inside the last backward, that pass's loss is made NaN instead,
    so that DeepSpeed's own check skips the step and drops the gradients.
    """
    objective = Objective.of(t)
    device = accelerator.device
    nonfinite = torch.zeros((), dtype=torch.bool, device=device) if nonfinite is None else nonfinite
    values: dict[int, tuple] = {}
    batch = None
    try:
        with accelerator.accumulate(model):
            weight = sum(objective.weight(p) for p in passes)
            # The global weight stays on the device: no wait for it before the forwards.
            scale = (accelerator.num_processes / total_over_processes(accelerator, weight).clamp(min=1)).float()
            graph: list[tuple[int, dict, torch.Tensor | None]] = []  # (pass, batch or chunk, gradient of its rewards)
            idle_no_grad, idle_graph = lockstep(accelerator, passes)
            for _ in range(idle_no_grad):
                with torch.no_grad():
                    batch_rewards(model, rm, idle_batch(rm, device))
            for i, batch in enumerate(passes):
                if "chunks" not in batch:
                    graph.append((i, batch, None))
                    continue
                with torch.no_grad():
                    rewards = torch.cat([batch_rewards(model, rm, chunk) for chunk in batch["chunks"]])
                rewards.requires_grad_(True)
                values[i] = objective.total(rewards, batch, head_weights(batch, rm.heads, t))
                (gradient,) = torch.autograd.grad(values[i][0] * scale, rewards)
                sizes = [chunk["num_completions"] for chunk in batch["chunks"]]
                graph.extend((i, chunk, part) for chunk, part in zip(batch["chunks"], gradient.split(sizes)))
            graph = [(-1, idle_batch(rm, device), None)] * idle_graph + graph
            for j, (i, batch, gradient) in enumerate(graph):
                last = j == len(graph) - 1
                # DDP all-reduces on the last backward only; FSDP2 reduce-scatters every one (gradients stay sharded).
                with contextlib.nullcontext() if last or is_fsdp(accelerator) else accelerator.no_sync(model):
                    rewards = batch_rewards(model, rm, batch)
                    if i < 0:  # idle: a forward and backward that add nothing
                        loss = rewards.sum() * 0.0
                    elif gradient is None:
                        values[i] = objective.total(rewards, batch, head_weights(batch, rm.heads, t))
                        loss = values[i][0] * scale
                    else:
                        loss = (rewards * gradient).sum()
                    if last:
                        nonfinite = nonfinite | ~torch.isfinite(torch.stack([v[0] for v in values.values()])).all()
                        if is_deepspeed(accelerator) and accelerator.sync_gradients and sum_over_processes(accelerator, nonfinite) > 0:
                            loss = loss * float("nan")
                    accelerator.backward(loss)
            skip = accelerator.sync_gradients and apply_step(accelerator, model, optimizer, t, nonfinite)
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if is_out_of_memory(error):
            raise PassOutOfMemory(batch["chunks"][0] if batch and "chunks" in batch else batch) from None
        raise
    keys = torch.cat([p["pair_key"] for p in passes])
    minimised, chosen, rejected, loss = (torch.cat([values[i][k].detach().reshape(-1) for i in range(len(passes))]) for k in range(4))
    counts = [sum(n) for n in zip(*(pass_counts(p) for p in passes))]
    return BatchResult(keys, chosen, rejected, loss, minimised.sum(), weight, nonfinite, skip, idle_no_grad + idle_graph, counts)


def head_weights(batch: dict[str, Any], heads: int, t: TrainConfig) -> torch.Tensor | None:
    """`train.head_bootstrap`: each head's Poisson(1) weight of each pair's row, on the rewards' device."""
    if not t.head_bootstrap:
        return None
    return bootstrap_weights(batch["pair_key"].to(batch["pair_index"].device) // PAIR_KEY, heads, t.seed)


def apply_step(accelerator, model, optimizer, t: TrainConfig, nonfinite: torch.Tensor) -> bool:
    """Clip, then step unless some process had a non-finite objective or the gradient norm is not finite (one
    agreement across processes); drop the gradients either way. Returns whether the step was skipped."""
    if is_deepspeed(accelerator):  # it clipped and stepped (or skipped) inside the last backward
        return accelerator.optimizer_step_was_skipped
    if t.max_grad_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        nonfinite = nonfinite | ~torch.isfinite(torch.as_tensor(norm, device=nonfinite.device)).all()
    skip = sum_over_processes(accelerator, nonfinite) > 0
    if not skip:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skip


def lockstep(accelerator, passes: list[dict[str, Any]]) -> tuple[int, int]:
    """Under FSDP (every forward gathers parameters, a collective): the idle forwards without and with a graph this
    process runs so that every process makes as many of each as the busiest. Elsewhere none."""
    if not is_fsdp(accelerator):
        return 0, 0
    chunks = sum(len(p["chunks"]) for p in passes if "chunks" in p)
    mine = torch.tensor([[chunks, len(passes) - sum("chunks" in p for p in passes) + chunks]], device=accelerator.device)
    most = accelerator.gather(mine).amax(0)
    return int(most[0] - mine[0, 0]), int(most[1] - mine[0, 1])


def idle_batch(rm: RewardModel, device) -> dict[str, torch.Tensor]:
    """A one-token batch whose forward and zero-weighted backward keep a process in step with the others."""
    ids = torch.full((1, 1), rm.fmt.pad_token_id, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def pass_counts(batch: dict[str, Any]) -> tuple:
    """(real tokens, computed tokens, rows with pairs, completions, and the model's tokens and query-key pairs,
    rmtrain.batching.model_work) of a pass; a chunked row counts its chunks' tokens twice (they are computed twice)."""
    if "chunks" in batch:
        real = sum(chunk["real_tokens"] for chunk in batch["chunks"])
        computed = 2 * sum(chunk["input_ids"].numel() for chunk in batch["chunks"])
    else:  # real_tokens is a device tensor: int() would wait for the GPU every pass
        real, computed = batch["real_tokens"], batch["input_ids"].numel()
    return real, computed, batch["num_groups"], batch["num_completions"], *batch["model_work"]


# --------------------------------------------------------------------------------------------------
# Training metrics


class StepMetrics:
    """Per-pair values of this process, held until their optimizer step is kept or skipped, then pooled until the
    next log line, where every process's are gathered at once (processes may split their batches into different
    numbers of passes; a gather per batch would wait for the device each time). Each pair counts once per epoch
    (Accelerate repeats pairs to even out plain batches). `objective` is logged beside `loss` when they can differ."""

    def __init__(self, accelerator, t: TrainConfig, lists: bool, flops_of=lambda tokens, pairs: 0.0, peak_flops: float | None = None):
        self.accelerator = accelerator
        self.flops_of = flops_of
        """Model FLOPs of training on (tokens, causal query-key pairs) (rmtrain.flops)."""
        objective = Objective.of(t)
        self.report_objective = bool(t.center_rewards_coefficient) or (lists and (not objective.per_pair or t.list_margins))
        self.pending: list[tuple] = []
        self.window: list[tuple] = []
        self.sums = [0.0] * 8  # this process's real, computed tokens, rows, completions, model tokens, pairs, objective, weight
        self.epoch = 0
        self.seen: dict[int, set[int]] = {}  # keys counted, per epoch
        self.last_skipped: torch.Tensor | None = None
        self.idle_forwards = 0
        self.speed = Throughput(lists=lists, peak_flops=peak_flops * accelerator.num_processes if peak_flops else None)

    def new_epoch(self) -> None:
        self.epoch += 1

    def add(self, result: BatchResult) -> bool:
        """Record a batch; returns whether its step is skipped (as `train_step` said)."""
        self.pending.append(((result.keys, result.chosen, result.rejected, result.loss), [*result.counts, result.objective, result.weight]))
        self.idle_forwards += result.idle
        return result.skip

    def end_step(self, kept: bool) -> None:
        """Close an optimizer step: its values join the window if it was kept."""
        if kept:
            self.window.extend((self.epoch, *values) for values, _ in self.pending)
            for _, sums in self.pending:
                self.sums = [a + b for a, b in zip(self.sums, sums)]
        else:
            self.last_skipped = torch.cat([values[0] for values, _ in self.pending])
        self.pending = []

    def skipped_groups(self) -> list[int]:
        """The uids of the groups of the last skipped step, every process's (a collective: all processes call it)."""
        keys = self.last_skipped
        (keys,) = gather_per_item(self.accelerator, key=keys)
        return sorted({int(k) // PAIR_KEY for k in keys.tolist()})

    def take(self) -> dict[str, float] | None:
        """Metrics of the pairs since the last call, with throughput; None when no step was kept since."""
        if not self.window:
            return None
        device = self.accelerator.device
        sums = self.accelerator.reduce(torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64) for v in self.sums]), "sum")
        epochs = torch.cat([torch.full_like(keys, epoch) for epoch, keys, *_ in self.window])
        key, chosen, rejected, loss = (torch.cat(parts) for parts in list(zip(*self.window))[1:])
        key, chosen, rejected, loss, epochs = gather_per_item(self.accelerator, chosen, rejected, loss, epochs.to(chosen.dtype), key=key)
        keep = []
        for epoch, k in zip(epochs.long().tolist(), key.tolist()):
            seen = self.seen.setdefault(epoch, set())
            keep.append(k not in seen)
            seen.add(k)
        first = torch.tensor(keep, dtype=torch.bool, device=chosen.device)
        self.seen = {e: keys for e, keys in self.seen.items() if e >= self.epoch}  # older epochs are over
        real, computed, rows, completions, tokens, pairs, objective_sum, weight = sums.tolist()
        self.speed.add(int(first.sum()), int(real), int(computed), int(rows), int(completions), self.flops_of(int(tokens), int(pairs)))
        values = pair_stats(chosen[first], rejected[first], loss[first])
        if self.report_objective:
            values["objective"] = objective_sum / max(weight, 1)
        self.window, self.sums = [], [0.0] * 8
        return values | self.speed.take_window()
