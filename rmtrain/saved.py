"""The saved-folder contract: what a finished run or an export holds, writing it, and loading it back to score.

A folder is a full model (`config.json` + weights) or a LoRA adapter with its trained head
(`adapter_config.json`), plus the tokenizer and `rmtrain_format.json` (how text became ids). Plain
transformers loads a full folder as it is; rmtrain loads both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rmtrain.errors import ModelError, first_line
from rmtrain.model import RewardModel, clear_gguf_quantization, find_head_name, head_module, is_encoder_config, run_in_fp32
from rmtrain.tokenizer import TokenFormat, read_format, save_format


def folder_kind(path: Path, what: str = "model folder") -> str:
    """"model" or "adapter"; anything else is a one-line error naming the folder and what it holds instead."""
    if not path.is_dir():
        why = f"no such {what}" if not path.exists() else f"is a file, not a {what}"
        raise ModelError(f"{path}: {why}; give a finished run or a model folder")
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file():
        return "model"
    if (path / "checkpoints").is_dir() or (path / "recipe.yaml").is_file():
        why = "a run that has not finished (no final model yet); let it finish, or resume it with rmtrain fit --resume"
    elif (path / "training_state.json").is_file():
        why = "a training checkpoint (for --resume), not a model; use the run's folder once it has finished"
    else:
        why = "neither a model folder (config.json) nor a LoRA adapter (adapter_config.json); give a finished run or a model folder"
    raise ModelError(f"{path}: {why}")


def save_model_folder(
    model: nn.Module, state_dict: dict | None, tokenizer, fmt: TokenFormat, max_length: int, directory: str | Path,
    dtype: torch.dtype | None = None, **extra
) -> None:
    """Write the model (or adapter + head), tokenizer and text format into `directory`.

    `dtype`: a full model's weights are written in it (training keeps fp32 master weights of a model loaded in
    bf16; its folder is bf16, as loaded). An adapter is written as it is: the base stays the one it was loaded over.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cast = dtype is not None and not hasattr(model, "peft_config") and dtype != model.dtype
    if cast:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in (state_dict if state_dict is not None else model.state_dict()).items()}
    model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
    if cast:  # save_pretrained writes the dtype of the model's parameters; the files hold `dtype`
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(directory))
    save_format(directory, fmt, max_length, **extra)


def load_saved(path: str | Path, dtype: torch.dtype | None = None) -> tuple[RewardModel, int | None]:
    """A model folder (full or LoRA adapter) written by rmtrain or plain transformers, ready to score.

    Returns the model and the max_length it was trained with (None if unknown).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    kind = folder_kind(path)
    saved_format = read_format(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types; what matters is that there is no tokenizer
        raise ModelError(f"{path}: holds a model but no tokenizer transformers can load ({first_line(error)})") from None
    try:
        if kind == "adapter":
            model = _load_adapter(path, dtype)
            config = model.get_base_model().config
        else:
            config = AutoConfig.from_pretrained(str(path))
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # a base model that moved, an offline Hub, a bad config
        what = "its base model (recipe.yaml or adapter_config.json)" if kind == "adapter" else "the model"
        raise ModelError(f"{path}: cannot load {what}: {first_line(error)}") from None
    is_encoder = saved_format.get("is_encoder", is_encoder_config(config))
    if tokenizer.pad_token is None:
        raise ModelError(f"{path}: the tokenizer has no pad token")
    fmt = TokenFormat(
        append_eos=saved_format.get("append_eos", None if is_encoder else tokenizer.eos_token),
        pad_token_id=tokenizer.pad_token_id,
        is_encoder=is_encoder,
    )
    model.eval()
    head_name = find_head_name(model.get_base_model() if hasattr(model, "get_base_model") else model, is_encoder)
    head = head_module(model, head_name)
    weights_dtype = (model.get_base_model() if hasattr(model, "get_base_model") else model).dtype
    run_in_fp32(head)  # as in training: the rewards of a bf16 folder are read by an fp32 head
    autocast = weights_dtype if weights_dtype in (torch.bfloat16, torch.float16) else None
    return RewardModel(model, tokenizer, fmt, head, head_name, weights_dtype, autocast), saved_format.get("max_length")


def _load_adapter(path: Path, dtype: torch.dtype | None) -> nn.Module:
    """Rebuild the base exactly as the run loaded it (recipe.yaml of the run, e.g. a gguf file), then the adapter."""
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmtrain.config import load_recipe

    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file():
        mc = load_recipe(recipe_file).model
        name, source = mc.name_or_path, "recipe.yaml model.name_or_path"
        kwargs = mc.from_pretrained_kwargs() | ({"dtype": dtype} if dtype else {})
    else:
        name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        source, kwargs = "adapter_config.json base_model_name_or_path", {"dtype": dtype}
    if not name or (name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir()):
        raise ModelError(f"{path}: its base model {name!r} ({source}) is not there; put it back, or fix that path")
    base = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kwargs)
    if recipe_file.is_file():
        clear_gguf_quantization(base)
    base.config.pad_token_id = AutoTokenizer.from_pretrained(str(path)).pad_token_id
    return peft.PeftModel.from_pretrained(base, str(path))


def merged_from_disk(folder: Path) -> nn.Module:
    """The adapter in `folder` merged into its base in fp32 (one rounding when written in the base's dtype, not a
    bf16 sum of a bf16-rounded update), loaded on the CPU: the training model, sharded or not, is left as it is."""
    return load_saved(folder, dtype=torch.float32)[0].model.merge_and_unload()
