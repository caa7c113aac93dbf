"""`rmtrain fit`: set-up, then the training loop, top to bottom in one function."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from rmtrain.config import Recipe, dump_recipe
from rmtrain.batching import choose_layout, make_dataloader, token_counts
from rmtrain.data import load_pairs, read_splits
from rmtrain.evaluate import first_occurrences, gather_pairs, score_pairs
from rmtrain.log import RunLog, Throughput, truncate_metrics_file
from rmtrain.loss import pair_stats, reward_loss
from rmtrain.model import batch_rewards, load_reward_model, merged_copy, save_model_folder

RUN_MARKERS = ("recipe.yaml", "run_info.json", "metrics.jsonl", "checkpoints")
STATE_FILE = "training_state.json"


class RunDirError(ValueError):
    """The output folder cannot be used as asked (exists without --resume/--overwrite, not writable, ...)."""


class ResourceError(ValueError):
    """The machine cannot do what the recipe asks: out of memory, disk full, no bf16."""


def fit(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
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
    train_dl, length_sampler = make_dataloader(
        train_pairs, layout, rm.fmt.pad_token_id, mask_format, t.per_device_batch_size, t.seed,
        shuffle=True, length_grouped=t.batching == "length_grouped", max_tokens=t.max_tokens_per_batch,
    )
    eval_dl = None
    if eval_pairs:
        # Longest first: similar lengths share a batch, and memory peaks at once, not late.
        eval_dl, _ = make_dataloader(
            eval_pairs, layout, rm.fmt.pad_token_id, mask_format, t.eval_batch_size or t.per_device_batch_size, t.seed,
            shuffle=False, length_grouped=True,
        )
    line = f"batches: {layout} layout, {t.batching} order" + (f", {t.max_tokens_per_batch} tokens per batch" if t.max_tokens_per_batch else "")
    if length_sampler is not None:
        computed, real, unique = token_counts(train_pairs, length_sampler, layout)
        line += f"; tokens per epoch: {computed:,} computed, {real:,} real ({computed / real:.2f}x), {unique:,} unique"
    log.info(line)

    # Optimizer, schedule ----------------------------------------------------------------------
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
    step, epoch, batches_done = 0, 0, 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
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
    seen_rows: set[int] = set()  # pairs counted this epoch: repeats that even out DDP batches are not
    speed = Throughput()
    real_tokens = computed_tokens = 0  # this process's, summed across processes when logged
    last_eval: dict[str, float] | None = None
    batch: dict[str, torch.Tensor] | None = None  # named by an out-of-memory error
    model.train()
    log.start_progress(total_steps, completed=step)
    speed.resume()
    try:
        while step < total_steps:
            train_dl.set_epoch(epoch)
            if length_sampler is not None:
                length_sampler.set_epoch(epoch)
            seen_rows = set() if batches_done == 0 else seen_rows
            batches = accelerator.skip_first_batches(train_dl, batches_done) if batches_done else train_dl
            for batch in batches:
                with accelerator.accumulate(model), offload:
                    chosen, rejected = batch_rewards(model, rm, batch)
                    per_pair = reward_loss(chosen, rejected, batch.get("margin"), t.center_rewards_coefficient)
                    accelerator.backward(per_pair.mean())
                    if accelerator.sync_gradients and t.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                batches_done += 1
                real_tokens += int(batch["real_tokens"])
                computed_tokens += batch["input_ids"].numel()
                for key, value in zip(window, gather_pairs(accelerator, chosen.detach(), rejected.detach(), per_pair.detach(), row=batch["row"])):
                    window[key].append(value)
                if not accelerator.sync_gradients:
                    continue

                scheduler.step()
                step += 1
                log.advance()
                if step % t.logging_steps == 0 or step == total_steps:
                    counts = accelerator.reduce(torch.tensor([real_tokens, computed_tokens], device=accelerator.device), "sum")
                    pairs = {k: torch.cat(v) for k, v in window.items()}
                    first = first_occurrences(pairs["row"], seen_rows).to(pairs["chosen"].device)
                    speed.add(int(first.sum()), int(counts[0]), int(counts[1]))
                    values = pair_stats(pairs["chosen"][first], pairs["rejected"][first], pairs["loss"][first])
                    values |= {"learning_rate": scheduler.get_last_lr()[0], **speed.take_window()}
                    values["epoch"] = epoch + batches_done / len(train_dl)
                    log.metrics("train", step, values)
                    window = {k: [] for k in window}
                    real_tokens = computed_tokens = 0
                if eval_dl is not None and t.eval_steps and step % t.eval_steps == 0 and step != total_steps:
                    speed.pause()
                    last_eval, _ = score_pairs(accelerator, model, rm, eval_dl, t.center_rewards_coefficient)
                    log.metrics("eval", step, last_eval)
                    speed.resume()
                if t.save_steps and step % t.save_steps == 0 and step != total_steps:
                    speed.pause()
                    save_checkpoint(accelerator, out, step, epoch, batches_done, t.save_total_limit)
                    speed.resume()
                if step >= total_steps:
                    break
            else:
                epoch, batches_done = epoch + 1, 0
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise ResourceError(out_of_memory_message(batch, t, step)) from None
    finally:
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
        "final_eval": last_eval,
        "train": speed.totals(),
    }
    if is_main:
        (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info(f"saved {'adapter' if recipe.lora else 'model'} to {out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return info


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


def out_of_memory_message(batch: dict | None, t, step: int) -> str:
    if batch is None:
        return (
            f"out of memory before the first micro-batch ran (train.per_device_batch_size: {t.per_device_batch_size}); "
            "lower train.per_device_batch_size or data.max_length"
        )
    pairs = len(batch["row"])
    rows, width = batch["input_ids"].shape
    size = (
        f"train.max_tokens_per_batch: {t.max_tokens_per_batch}"
        if t.max_tokens_per_batch
        else f"train.per_device_batch_size: {t.per_device_batch_size}"
    )
    return (
        f"out of memory at step {step + 1}: a micro-batch of {pairs} pairs ({size}), {rows * width:,} tokens "
        f"({rows} rows x {width}); lower train.per_device_batch_size and raise train.gradient_accumulation_steps "
        f"to keep {pairs * t.gradient_accumulation_steps} pairs per step, or set train.max_tokens_per_batch "
        f"below {rows * width} (or lower data.max_length)"
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
    checkpoint = latest_checkpoint(out) if resume else None
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


def latest_checkpoint(out: Path) -> Path | None:
    """Newest checkpoint whose state file was written (a checkpoint is only renamed into place when complete)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    complete = [p for p in root.glob("checkpoint-*") if (p / STATE_FILE).is_file() and p.name.split("-")[-1].isdigit()]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def save_checkpoint(accelerator, out: Path, step: int, epoch: int, batches_in_epoch: int, limit: int | None) -> Path:
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
            state = {"step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch}
            (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    except Exception as error:
        raise_if_write_failed(error, f"checkpoint-{step}", tmp, out)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if limit:
            done = sorted(
                (p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                key=lambda p: int(p.name.split("-")[-1]),
            )
            for old in done[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(accelerator, model, rm, recipe: Recipe, out: Path) -> None:
    """The final model (or adapter with its head) in `out`, plus `out/merged` when lora.merge is set.

    Files are written to a temporary folder first, then moved into place one by one.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model) if recipe.lora is None else None  # every rank: FSDP/ZeRO-3 gather
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
        try:
            save_model_folder(merged_copy(unwrapped), None, rm.tokenizer, rm.fmt, max_length, merged_tmp)
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
