"""The run folder: refusing to clobber it, checkpoints and resuming from them, and the final save.

Nothing is left half-written: checkpoints, the best model and the final model are written under a temporary
name and renamed into place (the final model's files one by one into the run folder, once all are written),
and a write that fails (a full disk) removes its partial folder and names the newest complete checkpoint,
which was never touched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import torch

from rmtrain.config import Recipe, sources
from rmtrain.embedding import plain_state_dict, restore_full_embedding
from rmtrain.engine import is_sharded, unpartitioned_loading
from rmtrain.errors import RecipeError, ResourceError, RunDirError, first_line
from rmtrain.log import RunLog, truncate_metrics_file
from rmtrain.saved import atomic_folder, load_saved, merged_in_fp32, put_in_place, save_model_folder, temporary_folder

RUN_MARKERS = ("recipe.yaml", "run_info.json", "metrics.jsonl", "checkpoints")
STATE_FILE = "training_state.json"
RUN_INFO_FILE = "run_info.json"


@dataclass
class TrainState:
    """Where training stands: what a checkpoint records beside the model, optimizer, schedule and RNG."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    """Steps skipped since the last kept one (a run stops at train.max_nonfinite_steps; a checkpoint is only taken at 0)."""
    seen_embedding_rows: int | None = None
    """How many embedding rows train (`train.embedding_rows: seen`), None for all: a resume must match."""
    best_step: int | None = None
    best_value: float | None = None
    """`train.keep_best`: the step and metric value of the model in out/best."""

    @classmethod
    def read(cls, checkpoint: Path) -> "TrainState":
        saved = json.loads((checkpoint / STATE_FILE).read_text())
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


# --------------------------------------------------------------------------------------------------
# The output folder


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
    if not resume:
        return None
    checkpoint = latest_checkpoint(out, log)
    if checkpoint is None:
        held = "holds no run" if not is_run else f"holds no complete checkpoint in {out / 'checkpoints'}"
        raise RunDirError(
            f"train.output_dir: --resume, but {out} {held} to resume from; run without --resume to start "
            "(or with --overwrite to replace what is there)"
        )
    return checkpoint


def claim_output_dir(out: Path, overwrite: bool, resuming: bool) -> None:
    """Main process, once model and data have loaded: only now is an old run replaced (--overwrite)."""
    if overwrite and not resuming and out.is_dir():
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"train.output_dir: {out} is not writable ({error.strerror})") from None


def write_run_info(out: Path, info: dict[str, Any]) -> None:
    (out / RUN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# Checkpoints


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


def save_checkpoint(accelerator, out: Path, state: TrainState, limit: int | None) -> Path:
    """Model/adapter, optimizer, scheduler, RNG and `state`, written by every process into a temporary folder the
    main one then puts in place."""
    final = out / "checkpoints" / f"checkpoint-{state.step}"
    tmp = final.parent / f".{final.name}.tmp"
    with write_failures(f"checkpoint-{state.step}", out, tmp):
        if accelerator.is_main_process:
            temporary_folder(final)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state)) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        put_in_place(tmp, final)
        if limit:
            for old in complete_checkpoints(out)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, out: Path, checkpoint: Path, seen_embedding_rows: int | None, embedding_rows: str) -> TrainState:
    """Restore model, optimizer, scheduler and RNG from `checkpoint`, after checking it fits this run."""
    state = TrainState.read(checkpoint)
    if state.seen_embedding_rows != seen_embedding_rows:
        raise RunDirError(
            f"{checkpoint}: trained {state.seen_embedding_rows or 'all'} embedding rows, this run's training data "
            f"gives {seen_embedding_rows or 'all'} (train.embedding_rows: {embedding_rows}); resume with the data and "
            "settings the run started with"
        )
    accelerator.load_state(str(checkpoint))
    if accelerator.is_main_process:
        truncate_metrics_file(out / "metrics.jsonl", state.step)
    return state


# --------------------------------------------------------------------------------------------------
# The final model


def save_final(accelerator, model, rm, recipe: Recipe, out: Path) -> None:
    """The final model (or adapter with its head) in `out`, plus `out/merged` when lora.merge is set.

    Files are written to a temporary folder first, then moved into place one by one.
    """
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    if recipe.lora is None:
        restore_full_embedding(unwrapped)  # the trained rows back into one plain table
    # FSDP and DeepSpeed hold shards: gather full weights (a collective, every rank). PEFT's save_pretrained
    # keeps the adapter and head entries of a full state dict, so LoRA takes the same path.
    sharded = is_sharded(accelerator)
    state_dict = accelerator.get_state_dict(model) if recipe.lora is None or sharded else None
    if not accelerator.is_main_process:
        return
    max_length = recipe.data.max_length
    with write_failures("the final model", out), atomic_folder(out, merge_into=True) as tmp:
        save_model_folder(unwrapped, state_dict, rm.tokenizer, rm.fmt, max_length, tmp, dtype=rm.weights_dtype)
        shutil.copy(out / "recipe.yaml", tmp / "recipe.yaml")
    if recipe.lora is not None and recipe.lora.merge:  # merged in fp32 on the CPU, written in the base's dtype
        with write_failures("the merged model", out), atomic_folder(out / "merged") as tmp:
            if sharded:  # its parameters are shards: the adapter just written, over a base loaded whole
                with unpartitioned_loading(accelerator):
                    peft_model = load_saved(out, dtype=torch.float32)[0].model
            else:  # training is over: the model itself, on the CPU
                peft_model = unwrapped
            save_model_folder(merged_in_fp32(peft_model), None, rm.tokenizer, rm.fmt, max_length, tmp, dtype=rm.weights_dtype)


class BestModel:
    """`train.keep_best`: after each eval, the model goes to `out/best` when its metric is the best so far."""

    def __init__(self, recipe: Recipe, out: Path):
        self.recipe, self.out = recipe, out
        keep = recipe.train.keep_best
        self.metric = keep.metric if keep else None
        self.lower_is_better = bool(keep and keep.lower_is_better)
        if keep is not None and keep.needs_lists and not eval_set_has_lists(recipe):
            # Before the first step: otherwise the run would train to its first eval and find no such metric.
            raise RecipeError("train.keep_best", [
                f"metric {keep.metric} is measured on ranked lists (rows with 'completions' and 'scores' or 'ranks'), and this "
                "run's eval set holds pairs only; keep the best by accuracy or loss (then rerun with --overwrite)"])

    def consider(self, accelerator, model, rm, state: TrainState, metrics: dict) -> None:
        """Keep the model if `metrics` are the best so far (the record lives in `state`, so a resume keeps it)."""
        if self.metric is None:
            return
        value, best = metrics[self.metric], state.best_value
        if best is None or (value < best if self.lower_is_better else value > best):
            save_best(accelerator, model, rm, self.recipe, self.out)
            state.best_step, state.best_value = state.step, value

    def info(self, state: TrainState) -> dict | None:
        if self.metric is None:
            return None
        return {"step": state.best_step, "metric": self.metric, "value": state.best_value, "folder": str(self.out / "best")}


def eval_set_has_lists(recipe: Recipe) -> bool:
    """Whether the run's eval set (data.eval, or the rows data.eval_fraction holds out of data.train) holds ranked
    lists: the sources' rows read again, as fit read them."""
    from rmtrain.rows import row_kind
    from rmtrain.sources import read_rows

    split = "eval" if recipe.data.eval is not None else "train"
    return any(row_kind(row) == "lists" for source in sources(recipe.data, split) for row in read_rows(source)[0])


def save_best(accelerator, model, rm, recipe: Recipe, out: Path) -> None:
    """The model as it is now, as `out/best`: a plain model folder like the final one (or the adapter and its head),
    written under a temporary name and renamed over the previous best."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = None
    if recipe.lora is None or is_sharded(accelerator):
        state_dict = plain_state_dict(unwrapped, accelerator.get_state_dict(model))  # a collective under FSDP/DeepSpeed
    if accelerator.is_main_process:
        with write_failures("the best model", out), atomic_folder(out / "best") as tmp:
            save_model_folder(unwrapped, state_dict, rm.tokenizer, rm.fmt, recipe.data.max_length, tmp, dtype=rm.weights_dtype)
            # As in the final folder: an adapter is loaded over the base the recipe names (a gguf file, a revision).
            shutil.copy(out / "recipe.yaml", tmp / "recipe.yaml")
    accelerator.wait_for_everyone()


# Write failures as torch.save (RuntimeError), safetensors (SafetensorError) and plain Python (OSError) report them.
WRITE_FAILURES = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded", "file write failed")


@contextmanager
def write_failures(what: str, out: Path, tmp: Path | None = None) -> Iterator[None]:
    """A save that fails for lack of space (or any OS write error) becomes one clear line naming the newest complete
    checkpoint, which was never touched (`tmp`: a partial folder to remove first; `atomic_folder` removes its own)."""
    try:
        yield
    except Exception as error:
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        elif any(pattern in str(error) for pattern in WRITE_FAILURES):
            reason, full = first_line(error), True
        else:
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        fix = "free space" if full else "fix the folder"
        kept = (
            f"the newest complete checkpoint {previous} is intact: {fix} and run again with --resume"
            if previous is not None
            else f"no checkpoint was written before it: {fix} and run again"
        )
        raise ResourceError(f"train.output_dir: could not write {what} in {out} ({reason}); {kept}") from None
