"""The Accelerator of a run: precision, the engine a launch config asked for, and collectives of plain numbers."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from rmtrain.config import Recipe, TrainConfig
from rmtrain.errors import ResourceError, UserError, first_line, require_extra
from rmtrain.log import RunLog


def make_accelerator(t: TrainConfig, out: Path):
    """(accelerator, bf16) for a training run; its trackers (`train.report_to`) write under `out/trackers`."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    bf16 = choose_bf16(t.bf16)
    # DeepSpeed runs on CPU processes (its CPU accelerator, over gloo), but Accelerate drops it under cpu=True; gloo is
    # named for it, or Accelerate would count one process.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    cpu = not torch.accelerator.is_available() and not deepspeed
    launched_on_cpu = not torch.accelerator.is_available() and os.environ.get("LOCAL_RANK") is not None
    backend = "gloo" if launched_on_cpu else None
    accelerator = Accelerator(
        # How long a process waits in a collective for the others (a checkpoint or best model written by rank 0; torch's
        # default is 10 minutes for NCCL): transformers' Trainer default, `ddp_timeout`.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.ddp_timeout), backend=backend)],
        log_with=list(t.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "trackers")),
        # Without an accelerator, `accelerate launch --multi_gpu` still starts N processes; cpu=True makes
        # them one gloo group (MULTI_CPU) instead of N independent runs writing the same folder.
        cpu=cpu,
        mixed_precision="bf16" if bf16 else "no",
        # FSDP2 reduce-scatters every batch (and rmtrain every pass): gradients stay sharded. Under no_sync each would
        # be held unsharded, at the full model's size.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps, sync_each_batch=fsdp_requested()),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    enable_fsdp_on_cpu(accelerator)
    if is_fsdp(accelerator) and bf16:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # FSDP2's mixed precision is its parameter cast (no autocast); gradients are averaged in fp32.
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return accelerator, bf16


def fsdp_requested() -> bool:
    """The launch config asks for FSDP (`accelerate launch` exports its settings as ACCELERATE_USE_FSDP, FSDP_*)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def enable_fsdp_on_cpu(accelerator) -> bool:
    """Honour an FSDP launch config on CPU processes (gloo), where Accelerate drops it silently (it enables FSDP only
    for accelerator processes): the state is promoted as Accelerate promotes a multi-GPU one, with the plugin the
    launch config describes, so every FSDP2 path of Accelerate (prepare, no_sync, clipping, state dicts, sharded
    checkpoints) runs as on GPUs. This is how rmtrain's FSDP2 training is tested without GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return False
    plugin = FullyShardedDataParallelPlugin()  # from the launch config's FSDP_* variables, as Accelerator() reads them
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def shard_head_in_fp32(accelerator, rm) -> None:
    """FSDP2 with bf16 casts every parameter it gathers to bf16; the score head is made an FSDP unit of its own that
    keeps fp32 (rmtrain.model.run_in_fp32), before `prepare` wraps the rest."""
    if not (is_fsdp(accelerator) and accelerator.mixed_precision == "bf16"):
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    fully_shard(rm.head, mp_policy=policy, reshard_after_forward=accelerator.state.fsdp_plugin.reshard_after_forward)


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


@contextmanager
def unpartitioned_loading(accelerator) -> Iterator[None]:
    """Models loaded inside are whole: while Accelerate keeps a ZeRO-3 config registered, transformers builds every
    model partitioned over the processes (a collective), which rank 0 alone, merging the final adapter, cannot do."""
    if not is_zero3(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def is_zero3(accelerator) -> bool:
    """DeepSpeed ZeRO-3: parameters are partitioned across processes (from the load on, under Accelerate)."""
    return is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_engine(accelerator, t: TrainConfig, log: RunLog) -> None:
    """Say when an FSDP/DeepSpeed launch config did not take; fill DeepSpeed's "auto" values from the recipe."""
    requested = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
                 if os.environ.get(variable, "").lower() == "true"]
    if requested and not is_sharded(accelerator):
        log.warn(f"{requested[0]} config ignored: Accelerate runs {accelerator.distributed_type.value} (one process, or --cpu)")
    if is_deepspeed(accelerator):
        fill_deepspeed_auto(accelerator.state.deepspeed_plugin.deepspeed_config, t)
        check_deepspeed_version(log)
        # DeepSpeed steps its optimizer inside backward; torch's scheduler, stepped once per step after it, cannot see
        # that and warns of a step "before optimizer.step()" that is not.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


DEEPSPEED_SKIPS_NONFINITE = (0, 19, 8)
"""The first DeepSpeed whose optimizer skips a step with a non-finite gradient norm in fp32 and bf16, ZeRO-1 to 3
(`bf16.check_grad_overflow`, on by default since 0.19.3; fp32 and ZeRO-3 since 0.19.8); earlier ones apply it."""


def check_deepspeed_version(log: RunLog) -> None:
    from importlib.metadata import version

    found = version("deepspeed")
    numbers = tuple(int(part) for part in found.split("+")[0].split(".")[:3] if part.isdigit())
    if numbers < DEEPSPEED_SKIPS_NONFINITE:
        log.warn(
            f"DeepSpeed {found}: a step with a non-finite gradient is applied, not skipped (weights become NaN); "
            f"pip install 'deepspeed>={'.'.join(map(str, DEEPSPEED_SKIPS_NONFINITE))}'"
        )


def fill_deepspeed_auto(config: dict[str, Any], t: TrainConfig) -> None:
    """DeepSpeed clips gradients itself and needs a micro-batch size, which length-grouped loaders do not
    expose (`batch_size` None): take both from the recipe where the DeepSpeed config says "auto"."""
    for key, value in (("train_micro_batch_size_per_gpu", t.per_device_batch_size), ("gradient_clipping", t.max_grad_norm or 0.0)):
        if config.get(key, "auto") == "auto":
            config[key] = value


def total_over_processes(accelerator, value) -> torch.Tensor:
    """`value` (a number or a one-element tensor) summed over all processes, as a float tensor on the device: nothing
    waits for it until it is read."""
    tensor = torch.as_tensor(value, device=accelerator.device).reshape(1).double()
    return tensor[0] if accelerator.num_processes == 1 else accelerator.reduce(tensor, "sum")[0]


def sum_over_processes(accelerator, value) -> int:
    """`value` (a number or a one-element tensor) summed over all processes, read as an integer."""
    return int(total_over_processes(accelerator, value))
