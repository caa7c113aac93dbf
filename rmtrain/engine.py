"""The Accelerator of a run: precision, the engine a launch config asked for, and collectives of plain numbers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rmtrain.config import Recipe, TrainConfig
from rmtrain.errors import ResourceError, UserError, first_line, require_extra
from rmtrain.log import RunLog


def make_accelerator(t: TrainConfig, out: Path):
    """(accelerator, bf16) for a training run; its trackers (`train.report_to`) write under `out/trackers`."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration

    bf16 = choose_bf16(t.bf16)
    accelerator = Accelerator(
        # How long a process waits in a collective for the others (a checkpoint or best model written by rank 0; torch's
        # default is 10 minutes for NCCL): transformers' Trainer default, `ddp_timeout`.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout))],
        log_with=list(t.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "trackers")),
        # Without an accelerator, `accelerate launch --multi_gpu` still starts N processes; cpu=True makes
        # them one gloo group (MULTI_CPU) instead of N independent runs writing the same folder.
        cpu=not torch.accelerator.is_available(),
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    return accelerator, bf16


# The package each tracker of train.report_to needs, and the rmtrain extra that installs it.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def check_trackers(t: TrainConfig) -> None:
    for tracker in t.report_to:
        require_extra(tracker, (TRACKER_PACKAGES[tracker],), f"train.report_to: {tracker}")


def start_trackers(accelerator, recipe: Recipe, out: Path) -> None:
    """Accelerate's trackers, with the resolved recipe as hyperparameters (flat `section.key` names; values a
    tracker cannot hold as such, lists and None, as text). The run is named `train.run_name` or the folder."""
    t = recipe.train
    if not t.report_to:
        return
    name = t.run_name or out.name
    config = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(recipe.to_dict()).items()}
    init = {"wandb": {"name": name, "dir": str(out)}, "mlflow": {"run_name": name}, "trackio": {"name": name}}
    try:
        accelerator.init_trackers("rmtrain", config=config, init_kwargs={k: v for k, v in init.items() if k in t.report_to})
    except Exception as error:  # each tracker raises its own types; what matters is which one and why
        for folder in ("trackers", "wandb"):  # what a tracker may have begun to write; the run has not started
            shutil.rmtree(out / folder, ignore_errors=True)
        raise UserError(f"train.report_to: {', '.join(t.report_to)}: a tracker did not start: {first_line(error)}") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"learning_rate": 1e-4}} -> {"train.learning_rate": 1e-4} (empty sections stay, as {})."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def inference_accelerator():
    """The Accelerator of eval, score and export: the accelerator if there is one, else the CPU."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.accelerator.is_available())


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


def is_sharded(accelerator) -> bool:
    """FSDP or DeepSpeed: parameters (or their optimizer state) live in shards across processes."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_engine(accelerator, t: TrainConfig, log: RunLog) -> None:
    """Say when an FSDP/DeepSpeed launch config did not take; fill DeepSpeed's "auto" values from the recipe."""
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "").lower() == "true"]
    if requested and not is_sharded(accelerator):
        # Accelerate enables FSDP and DeepSpeed only on GPUs (and other accelerators), never for CPU processes.
        log.warn(f"{requested[0]} config ignored: no GPU, so Accelerate runs plain data parallel ({accelerator.distributed_type.value})")
    if is_deepspeed(accelerator):
        fill_deepspeed_auto(accelerator.state.deepspeed_plugin.deepspeed_config, t)


def fill_deepspeed_auto(config: dict[str, Any], t: TrainConfig) -> None:
    """DeepSpeed clips gradients itself and needs a micro-batch size, which length-grouped loaders do not
    expose (`batch_size` None): take both from the recipe where the DeepSpeed config says "auto"."""
    for key, value in (("train_micro_batch_size_per_gpu", t.per_device_batch_size), ("gradient_clipping", t.max_grad_norm or 0.0)):
        if config.get(key, "auto") == "auto":
            config[key] = value


def sum_over_processes(accelerator, value: int) -> int:
    """`value` summed over all processes (no collective with one process)."""
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), "sum")[0])
