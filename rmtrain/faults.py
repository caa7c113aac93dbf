"""What can go wrong while training, and what is said then: a signal to stop, out of memory, non-finite steps."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import torch

from rmtrain.config import Recipe, TrainConfig, sources
from rmtrain.log import RunLog


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


def nonfinite_message(limit: int, step: int, rows: list[tuple[int, int]], recipe: Recipe, out: Path, saved_step: int) -> str:
    """`rows`: (source index, 1-based row) of the last batch's pairs."""
    paths = [source.path for source in sources(recipe.data, "train")]
    parts = []
    for index, path in enumerate(paths):
        numbers = sorted({row for source, row in rows if source == index})
        if numbers:
            shown = ", ".join(map(str, numbers[:20])) + (f", ... ({len(numbers)} rows)" if len(numbers) > 20 else "")
            parts.append(f"rows {shown} of {path}")
    kept = f"the last checkpoint ({out / 'checkpoints' / f'checkpoint-{saved_step}'}) is kept" if saved_step else "no checkpoint was written"
    return (
        f"train.max_nonfinite_steps: {limit} optimizer steps in a row (up to step {step}) had a non-finite loss or "
        f"gradient norm; last batch: {'; '.join(parts)}; {kept}. "
        "Lower train.learning_rate, check those rows, or use fp32 (train.bf16: false)"
    )


# How the CPU allocator words it (CUDA raises torch.OutOfMemoryError).
CPU_OUT_OF_MEMORY = ("out of memory", "DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(text in str(error) for text in CPU_OUT_OF_MEMORY)


def out_of_memory_message(batch: dict | None, t: TrainConfig, step: int, max_tokens_per_forward: int | None) -> str:
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


def interrupted_message(step: int, out: Path, num_processes: int) -> str:
    # The run's resolved recipe holds the command-line overrides and the output folder.
    command = f"rmtrain fit {out / 'recipe.yaml'} --resume"
    if num_processes > 1:
        command = f"accelerate launch <same options> -m {command}"
    return f"interrupted at step {step}; checkpoint saved to {out / 'checkpoints' / f'checkpoint-{step}'}; resume with: {command}"
