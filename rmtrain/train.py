"""`rmtrain fit`: set-up, then the training loop, top to bottom in one function."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from rmtrain.config import Recipe, dump_recipe
from rmtrain.batching import choose_layout, make_dataloader, token_counts
from rmtrain.data import load_pairs, read_splits
from rmtrain.evaluate import first_occurrences, gather_pairs, score_pairs
from rmtrain.log import RunLog, Throughput, truncate_metrics_file
from rmtrain.loss import pair_stats, reward_loss
from rmtrain.model import (
    auto_tokens_per_forward,
    batch_rewards,
    load_reward_model,
    load_saved,
    merged_copy,
    restore_full_embedding,
    save_model_folder,
    seen_rows_count,
    train_seen_rows_only,
)

RUN_MARKERS = ("recipe.yaml", "run_info.json", "metrics.jsonl", "checkpoints")
STATE_FILE = "training_state.json"


class RunDirError(ValueError):
    """The output folder cannot be used as asked (exists without --resume/--overwrite, not writable, ...)."""


class NonFiniteLossError(RuntimeError):
    """`train.max_nonfinite_steps` optimizer steps in a row had a non-finite loss or gradient norm."""


class ResourceError(ValueError):
    """The machine cannot do what the recipe asks: out of memory, disk full, no bf16."""


def fit(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, set_seed
    from transformers import get_scheduler

    t = recipe.train
    out = Path(t.output_dir)
    bf16 = choose_bf16(t.bf16)
    accelerator = Accelerator(
        # Without an accelerator, `accelerate launch --multi_gpu` still starts N processes; cpu=True makes
        # them one gloo group (MULTI_CPU) instead of N independent runs writing the same folder.
        cpu=not torch.accelerator.is_available(),
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    is_main = accelerator.is_main_process
    log = RunLog(out / "metrics.jsonl", enabled=is_main)
    log.info(
        f"rmtrain fit: {accelerator.num_processes} process(es) ({accelerator.distributed_type.value}), "
        f"device {accelerator.device}, precision {'bf16' if bf16 else 'fp32'}, output {out}"
    )
    checkpoint = check_output_dir(out, resume, overwrite, log)
    check_engine(accelerator, t, log)

    # Model, data ------------------------------------------------------------------------------
    set_seed(t.seed)
    data_rows = read_splits(recipe.data)  # a bad data file fails before the model loads
    rm = load_reward_model(recipe.model, recipe.lora, t.gradient_checkpointing)
    train_pairs, eval_pairs, preflight = load_pairs(recipe.data, rm.tokenizer, rm.fmt, t.seed, data_rows)
    for stats in preflight:
        log.info(stats.line(recipe.data.truncation, recipe.data.max_length))
    if is_main:
        claim_output_dir(out, overwrite, resuming=checkpoint is not None)
    accelerator.wait_for_everyone()

    layout, mask_format, note = choose_layout(rm, t.share_prefix, t.padding_free)
    if note:
        log.info(note)
    max_tokens_per_forward, budget_note = t.max_tokens_per_forward, ""
    if max_tokens_per_forward == "auto":
        max_tokens_per_forward, budget_note = auto_tokens_per_forward(
            rm.model.config, bf16, t.gradient_checkpointing, accelerator.device
        )
    if max_tokens_per_forward and accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed steps the optimizer inside backward(): one backward per batch.
        log.info("DeepSpeed: train.max_tokens_per_forward does not apply, each batch runs in one pass")
        max_tokens_per_forward = None
    train_dl, length_sampler = make_dataloader(
        train_pairs, layout, rm.fmt.pad_token_id, mask_format, t.per_device_batch_size, t.seed,
        shuffle=True, length_grouped=t.batching == "length_grouped", max_tokens=t.max_tokens_per_batch,
        num_processes=accelerator.num_processes, micro_batches=True, max_tokens_per_forward=max_tokens_per_forward,
    )
    eval_dl = None
    if eval_pairs:
        # Longest first: similar lengths share a batch, and memory peaks at once, not late.
        eval_dl, _ = make_dataloader(
            eval_pairs, layout, rm.fmt.pad_token_id, mask_format, t.eval_batch_size or t.per_device_batch_size, t.seed,
            shuffle=False, length_grouped=True, max_tokens=max_tokens_per_forward, cap_pairs=True,  # bounded memory here too
        )
    line = f"batches: {layout} layout, {t.batching} order" + (f", {t.max_tokens_per_batch} tokens per batch" if t.max_tokens_per_batch else "")
    if max_tokens_per_forward:
        line += f", at most {max_tokens_per_forward} tokens per forward" + (f" ({budget_note})" if budget_note else "")
    else:
        line += ", one forward per batch"
    if length_sampler is not None:
        computed, real, unique = token_counts(train_pairs, length_sampler, layout)
        line += f"; tokens per epoch: {computed:,} computed, {real:,} real ({computed / real:.2f}x), {unique:,} unique"
    log.info(line)

    # Optimizer, schedule ----------------------------------------------------------------------
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if t.embedding_rows == "seen" and not sharded:
        token_ids = {rm.fmt.pad_token_id}
        for pair in train_pairs:
            token_ids.update(pair["chosen_ids"], pair["rejected_ids"])
        note = train_seen_rows_only(rm.model, torch.tensor(sorted(token_ids)), t.weight_decay)
        if note:
            log.info(note)
    seen_embedding_rows = seen_rows_count(rm.model)
    trainable = [p for p in rm.model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},  # biases and norms
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=True
    )
    model, optimizer, train_dl, eval_dl = accelerator.prepare(rm.model, optimizer, train_dl, eval_dl)
    steps_per_epoch = math.ceil(len(train_dl) / t.gradient_accumulation_steps)
    total_steps = t.max_steps or math.ceil(t.num_epochs * steps_per_epoch)
    # The schedule is stepped by hand once per optimizer step (accelerate would step it once per process).
    scheduler = get_scheduler(
        t.lr_scheduler, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    accelerator.register_for_checkpointing(scheduler)
    log.info(
        f"{len(train_pairs)} training pairs, {accelerator.num_processes} x {t.per_device_batch_size} pairs x "
        f"{t.gradient_accumulation_steps} accumulation = {accelerator.num_processes * t.per_device_batch_size * t.gradient_accumulation_steps} "
        f"pairs per step, {steps_per_epoch} steps per epoch, {total_steps} steps"
    )

    # Resume -----------------------------------------------------------------------------------
    step, epoch, batches_done, skipped_steps = 0, 0, 0, 0
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if state.get("seen_embedding_rows") != seen_embedding_rows:
            raise RunDirError(
                f"{checkpoint}: trained {state.get('seen_embedding_rows') or 'all'} embedding rows, this run's training data "
                f"gives {seen_embedding_rows or 'all'} (train.embedding_rows: {t.embedding_rows}); resume with the data and "
                "settings the run started with"
            )
        accelerator.load_state(str(checkpoint))
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        skipped_steps = state.get("skipped_steps", 0)
        if batches_done >= len(train_dl):
            epoch, batches_done = epoch + 1, 0
        if is_main:
            truncate_metrics_file(out / "metrics.jsonl", step)
        log.info(f"resumed from {checkpoint} at step {step} (epoch {epoch}, batch {batches_done})")
    if is_main:
        (out / "recipe.yaml").write_text(dump_recipe(recipe))

    # Loop -------------------------------------------------------------------------------------
    offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if t.activation_offloading else contextlib.nullcontext()
    window: dict[str, list[torch.Tensor]] = {"row": [], "chosen": [], "rejected": [], "loss": []}
    step_pairs: list[tuple[torch.Tensor, ...]] = []  # this optimizer step's gathered pairs, until it is kept or skipped
    nonfinite_step = False  # some micro-batch of this optimizer step had a non-finite loss on some process
    nonfinite_in_a_row = 0
    saved_step = step  # the step of the newest checkpoint (or the start)
    seen_rows: set[int] = set()  # pairs counted this epoch: repeats that even out DDP batches are not
    speed = Throughput()
    real_tokens = computed_tokens = 0  # this process's, summed across processes when logged
    last_eval: dict[str, float] | None = None
    batch: dict[str, torch.Tensor] | None = None  # the current pass, named by an out-of-memory error
    model.train()
    log.start_progress(total_steps, completed=step)
    speed.resume()
    stop = StopRequest(log)
    try:
        while step < total_steps:
            train_dl.set_epoch(epoch)
            if length_sampler is not None:
                length_sampler.set_epoch(epoch)
            seen_rows = set() if batches_done == 0 else seen_rows
            batches = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
            for micro_batches in batches:  # one batch, in passes of at most max_tokens_per_forward tokens
                local: dict[str, list[torch.Tensor]] = {k: [] for k in window}
                with accelerator.accumulate(model), offload:
                    # Processes average gradients: weighting each by its pair count makes that the mean over
                    # the global batch, even when a short last batch splits unevenly across processes.
                    global_pairs = sum_over_processes(accelerator, sum(len(micro["row"]) for micro in micro_batches))
                    for i, micro in enumerate(micro_batches):
                        batch = micro
                        # Gradients are all-reduced once per batch, on its last pass.
                        last_pass = i == len(micro_batches) - 1
                        with contextlib.nullcontext() if last_pass else accelerator.no_sync(model):
                            chosen, rejected = batch_rewards(model, rm, micro)
                            per_pair = reward_loss(chosen, rejected, micro.get("margin"), t.center_rewards_coefficient)
                            # Summed over the pass and scaled to the global batch: the gradient of its mean loss.
                            accelerator.backward(per_pair.sum() * accelerator.num_processes / global_pairs)
                        real_tokens += micro["real_tokens"]  # a device tensor: int() would wait for the GPU every pass
                        computed_tokens += micro["input_ids"].numel()
                        for key, value in zip(local, (micro["row"], chosen.detach(), rejected.detach(), per_pair.detach())):
                            local[key].append(value)
                    local_pairs = {k: torch.cat(v) for k, v in local.items()}
                    # A non-finite loss on any process skips the step on every process (its gradients are dropped).
                    nonfinite_step |= sum_over_processes(accelerator, int(not torch.isfinite(local_pairs["loss"]).all())) > 0
                    if accelerator.sync_gradients and t.max_grad_norm and not nonfinite_step:
                        norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
                        nonfinite_step = norm is not None and not torch.isfinite(torch.as_tensor(norm)).all().item()
                    if not nonfinite_step:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)  # at a skipped step: drops the accumulated gradients
                batches_done += 1
                # One gather per batch: processes may split their batches into different numbers of passes.
                step_pairs.append(gather_pairs(accelerator, *(local_pairs[k] for k in ("chosen", "rejected", "loss")), row=local_pairs["row"]))
                if not accelerator.sync_gradients:
                    continue

                # A skipped step still counts as a step: the schedule and the data position advance as in a
                # run without it; only the weights and optimizer moments stay as they were.
                scheduler.step()
                step += 1
                log.advance()
                if nonfinite_step:
                    skipped_steps += 1
                    nonfinite_in_a_row += 1
                    rows = sorted({int(r) + 1 for pairs in step_pairs for r in pairs[0].tolist()})
                    log.warn(f"step {step}: non-finite loss or gradient norm, optimizer step skipped ({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= t.max_nonfinite_steps:
                        raise NonFiniteLossError(nonfinite_message(t.max_nonfinite_steps, step, rows, recipe, out, saved_step))
                else:
                    nonfinite_in_a_row = 0
                    for values in step_pairs:
                        for key, value in zip(window, values):
                            window[key].append(value)
                step_pairs, nonfinite_step = [], False
                if (step % t.logging_steps == 0 or step == total_steps) and window["row"]:
                    local_counts = [torch.as_tensor(n, device=accelerator.device) for n in (real_tokens, computed_tokens)]
                    counts = accelerator.reduce(torch.stack(local_counts), "sum")
                    pairs = {k: torch.cat(v) for k, v in window.items()}
                    first = first_occurrences(pairs["row"], seen_rows).to(pairs["chosen"].device)
                    speed.add(int(first.sum()), int(counts[0]), int(counts[1]))
                    values = pair_stats(pairs["chosen"][first], pairs["rejected"][first], pairs["loss"][first])
                    values |= {"learning_rate": scheduler.get_last_lr()[0], **speed.take_window()}
                    values["epoch"] = epoch + batches_done / len(train_dl)
                    values["skipped_steps"] = skipped_steps
                    log.metrics("train", step, values)
                    window = {k: [] for k in window}
                    real_tokens = computed_tokens = 0
                if eval_dl is not None and t.eval_steps and step % t.eval_steps == 0 and step != total_steps:
                    speed.pause()
                    last_eval, _ = score_pairs(accelerator, model, rm, eval_dl, t.center_rewards_coefficient)
                    log.metrics("eval", step, last_eval)
                    speed.resume()
                if t.save_steps and step % t.save_steps == 0 and step != total_steps and not nonfinite_in_a_row:
                    speed.pause()
                    save_checkpoint(accelerator, out, step, epoch, batches_done, t.save_total_limit, skipped_steps, seen_embedding_rows)
                    saved_step = step
                    speed.resume()
                if step >= total_steps:
                    break
                if stop.agreed(accelerator):
                    log.stop_progress()
                    if saved_step != step:
                        save_checkpoint(accelerator, out, step, epoch, batches_done, t.save_total_limit, skipped_steps, seen_embedding_rows)
                    # The run's resolved recipe holds the command-line overrides and the output folder.
                    resume_command = f"rmtrain fit {out / 'recipe.yaml'} --resume"
                    if accelerator.num_processes > 1:
                        resume_command = f"accelerate launch <same options> -m {resume_command}"
                    log.info(f"interrupted at step {step}; checkpoint saved to {out / 'checkpoints' / f'checkpoint-{step}'}; resume with: {resume_command}")
                    accelerator.end_training()
                    raise SystemExit(128 + stop.signum)
            else:
                epoch, batches_done = epoch + 1, 0
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise ResourceError(out_of_memory_message(batch, t, step, max_tokens_per_forward)) from None
    finally:
        stop.restore()
        log.stop_progress()

    # Final evaluation and save ----------------------------------------------------------------
    if eval_dl is not None:
        last_eval, _ = score_pairs(accelerator, model, rm, eval_dl, t.center_rewards_coefficient)
        log.metrics("eval", step, last_eval)
        log.table(f"final eval ({len(eval_pairs)} pairs)", last_eval)
    save_final(accelerator, model, rm, recipe, out)
    info = {
        "complete": True,
        "num_processes": accelerator.num_processes,
        "steps": step,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs) if eval_pairs else 0,
        "max_tokens_per_forward": max_tokens_per_forward,  # resolved when the recipe says auto
        "final_eval": last_eval,
        "train": speed.totals(),
    }
    if is_main:
        (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info(f"saved {'adapter' if recipe.lora else 'model'} to {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return info


def check_engine(accelerator, t, log: RunLog) -> None:
    """Say when an FSDP/DeepSpeed launch config did not take; fill DeepSpeed's "auto" values from the recipe."""
    from accelerate.utils import DistributedType

    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "").lower() == "true"]
    if requested and accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # Accelerate enables FSDP and DeepSpeed only on GPUs (and other accelerators), never for CPU processes.
        log.warn(f"{requested[0]} config ignored: no GPU, so Accelerate runs plain data parallel ({accelerator.distributed_type.value})")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        fill_deepspeed_auto(accelerator.state.deepspeed_plugin.deepspeed_config, t)


def fill_deepspeed_auto(config: dict[str, Any], t) -> None:
    """DeepSpeed clips gradients itself and needs a micro-batch size, which length-grouped loaders do not
    expose (`batch_size` None): take both from the recipe where the DeepSpeed config says "auto"."""
    for key, value in (("train_micro_batch_size_per_gpu", t.per_device_batch_size), ("gradient_clipping", t.max_grad_norm or 0.0)):
        if config.get(key, "auto") == "auto":
            config[key] = value


class StopRequest:
    """SIGINT/SIGTERM while training: note it, so the loop ends after the current step with a checkpoint.

    Repeated signals change nothing (a launcher forwards the signal the terminal already sent to the whole
    process group); `kill -9` stops at once, and the newest complete checkpoint still resumes.
    """

    def __init__(self, log: RunLog):
        self.log = log
        self.signum = 0
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            self.log.info(f"{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint")

    def agreed(self, accelerator) -> bool:
        """True on every process once any process was signalled (all must save the same checkpoint)."""
        if accelerator.num_processes == 1:
            return bool(self.signum)
        signums = accelerator.gather(torch.tensor([self.signum], device=accelerator.device))
        self.signum = self.signum or int(signums.max())
        return bool(self.signum)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}


def sum_over_processes(accelerator, value: int) -> int:
    """`value` summed over all processes (no collective with one process)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), "sum")[0])


def nonfinite_message(limit: int, step: int, rows: list[int], recipe: Recipe, out: Path, saved_step: int) -> str:
    shown = ", ".join(map(str, rows[:20])) + (f", ... ({len(rows)} rows)" if len(rows) > 20 else "")
    kept = f"the last checkpoint ({out / 'checkpoints' / f'checkpoint-{saved_step}'}) is kept" if saved_step else "no checkpoint was written"
    return (
        f"train.max_nonfinite_steps: {limit} optimizer steps in a row (up to step {step}) had a non-finite loss or "
        f"gradient norm; last batch: rows {shown} of {recipe.data.train.path if recipe.data.train else 'train'}; {kept}. "
        "Lower train.learning_rate, check those rows, or use fp32 (train.bf16: false)"
    )


def choose_bf16(requested: bool | None) -> bool:
    """null: bf16 where the device supports it (CUDA); true on a device without bf16 is an error, not a
    silent fallback, so a run never trains in a precision other than the one asked for."""
    from accelerate.utils import is_bf16_available

    if requested is None:
        return torch.cuda.is_available() and is_bf16_available()
    if requested and not is_bf16_available():
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "this device"
        raise ResourceError(
            f"train.bf16: true, but {device} does not support bf16; set train.bf16: false (fp32), "
            "or null to use bf16 only where it is supported"
        )
    return requested


# How the CPU allocator words it (CUDA raises torch.OutOfMemoryError).
CPU_OUT_OF_MEMORY = ("out of memory", "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(text in str(error) for text in CPU_OUT_OF_MEMORY)


def out_of_memory_message(batch: dict | None, t, step: int, max_tokens_per_forward: int | None) -> str:
    if batch is None:
        return (
            f"out of memory before the first forward pass ran (train.per_device_batch_size: {t.per_device_batch_size}); "
            "lower train.per_device_batch_size or data.max_length"
        )
    pairs = len(batch["row"])
    rows, width = batch["input_ids"].shape
    tokens = rows * width
    where = (
        f"out of memory at step {step + 1} in a forward/backward pass of {pairs} pair(s), {tokens:,} tokens "
        f"({rows} rows x {width}; train.per_device_batch_size: {t.per_device_batch_size}, "
        f"train.max_tokens_per_forward: {t.max_tokens_per_forward or 'null'}"
        + (f" = {max_tokens_per_forward}" if t.max_tokens_per_forward == "auto" else "") + ")"
    )
    if pairs == 1:
        return f"{where}; a single pair does not fit: lower data.max_length or set train.gradient_checkpointing: true"
    return (
        f"{where}; set train.max_tokens_per_forward below {tokens} (same gradient, smaller passes), or lower "
        f"train.per_device_batch_size and raise train.gradient_accumulation_steps to keep "
        f"{t.per_device_batch_size * t.gradient_accumulation_steps} pairs per step"
    )


def check_output_dir(out: Path, resume: bool, overwrite: bool, log: RunLog) -> Path | None:
    """Refuse to clobber anything; return the checkpoint to resume from (or None). Changes nothing on disk."""
    is_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"train.output_dir: {out} exists and is not a folder")
    if is_run and not (resume or overwrite):
        raise RunDirError(
            f"train.output_dir: {out} already holds a run; pass --resume to continue it or --overwrite to replace it"
        )
    if out.is_dir() and not is_run and any(out.iterdir()):
        raise RunDirError(f"train.output_dir: {out} is not empty and holds no rmtrain run; choose another folder")
    existing = out if out.exists() else next(p for p in out.absolute().parents if p.exists())
    try:  # a real write: os.access says yes to root even where nothing can be created
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise RunDirError(
            f"train.output_dir: {out} is not writable ({error.strerror} in {existing}); choose a folder you can write to"
        ) from None
    checkpoint = latest_checkpoint(out, log) if resume else None
    if resume and checkpoint is None:
        log.info(f"--resume: no complete checkpoint in {out / 'checkpoints'}, starting from scratch")
    return checkpoint


def claim_output_dir(out: Path, overwrite: bool, resuming: bool) -> None:
    """Main process, once model and data have loaded: only now is an old run replaced (--overwrite)."""
    if overwrite and not resuming and out.is_dir():
        shutil.rmtree(out)
    elif not resuming:
        truncate_metrics_file(out / "metrics.jsonl", after_step=0)  # --resume without a checkpoint
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"train.output_dir: {out} is not writable ({error.strerror})") from None


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose state file was written, oldest first (one is only renamed into place when complete)."""
    root = out / "checkpoints"
    found = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()] if root.is_dir() else []
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(out: Path, log: RunLog | None = None) -> Path | None:
    """Newest complete checkpoint; anything half-written (a crash while saving) is named and passed over."""
    complete = complete_checkpoints(out)
    newest = complete[-1] if complete else None
    root = out / "checkpoints"
    if log is not None and root.is_dir():
        for path in sorted(root.iterdir()):
            if path not in complete and path.is_dir():
                log.info(f"--resume: ignoring {path}: incomplete (a save that did not finish)")
    return newest


def save_checkpoint(
    accelerator,
    out: Path,
    step: int,
    epoch: int,
    batches_in_epoch: int,
    limit: int | None,
    skipped_steps: int = 0,
    seen_embedding_rows: int | None = None,
) -> Path:
    """Model/adapter, optimizer, scheduler, RNG and data position, written under a temporary name and renamed."""
    root = out / "checkpoints"
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "skipped_steps": skipped_steps,
                     "seen_embedding_rows": seen_embedding_rows}
            (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    except Exception as error:
        raise_if_write_failed(error, f"checkpoint-{step}", tmp, out)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if limit:
            for old in complete_checkpoints(out)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, model, rm, recipe: Recipe, out: Path) -> None:
    """The final model (or adapter with its head) in `out`, plus `out/merged` when lora.merge is set.

    Files are written to a temporary folder first, then moved into place one by one.
    """
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if recipe.lora is None:
        restore_full_embedding(unwrapped)  # the trained rows back into one plain table
    # FSDP and DeepSpeed hold shards: gather full weights (a collective, every rank). PEFT's save_pretrained
    # keeps the adapter and head entries of a full state dict, so LoRA takes the same path.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = accelerator.get_state_dict(model) if recipe.lora is None or sharded else None
    if not accelerator.is_main_process:
        return
    max_length = recipe.data.max_length
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_model_folder(unwrapped, state_dict, rm.tokenizer, rm.fmt, max_length, tmp)
        shutil.copy(out / "recipe.yaml", tmp / "recipe.yaml")
    except Exception as error:
        raise_if_write_failed(error, "the final model", tmp, out)
        raise
    for item in tmp.iterdir():
        os.replace(item, out / item.name)
    tmp.rmdir()
    if recipe.lora is not None and recipe.lora.merge:
        merged_tmp = out / ".merged.tmp"
        shutil.rmtree(merged_tmp, ignore_errors=True)
        # Sharded parameters cannot be merged in place: merge the adapter just written, from disk.
        try:
            merged = load_saved(out)[0].model.merge_and_unload() if sharded else merged_copy(unwrapped)
            save_model_folder(merged, None, rm.tokenizer, rm.fmt, max_length, merged_tmp)
        except Exception as error:
            raise_if_write_failed(error, "the merged model", merged_tmp, out)
            raise
        shutil.rmtree(out / "merged", ignore_errors=True)
        os.replace(merged_tmp, out / "merged")


# Write failures as torch.save (RuntimeError), safetensors (SafetensorError) and plain Python (OSError) report them.
WRITE_FAILURES = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded", "file write failed")


def raise_if_write_failed(error: BaseException, what: str, tmp: Path, out: Path) -> None:
    """A save that failed for lack of space (or any OS write error) becomes one clear line; the partial
    folder is removed, and the newest complete checkpoint, which was never touched, is named."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
    elif any(pattern in str(error) for pattern in WRITE_FAILURES):
        reason, full = _first_line(error), True
    else:
        return
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(out)
    fix = "free space" if full else "fix the folder"
    kept = (
        f"the newest complete checkpoint {previous} is intact: {fix} and run again with --resume"
        if previous is not None
        else f"no checkpoint was written before it: {fix} and run again"
    )
    raise ResourceError(f"train.output_dir: could not write {what} in {out} ({reason}); {kept}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
