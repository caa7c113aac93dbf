"""The saved-folder contract: what a finished run or an export holds, writing it, and loading it back to score.

A folder is a full model (`config.json` + weights), a LoRA adapter with its trained head (`adapter_config.json`),
or a member ensemble (`rmtrain_ensemble.json`: member folders, and the base once when they are adapters on one base;
written by rmtrain.ensemble), plus the tokenizer and `rmtrain_format.json` (how text became ids). Plain transformers
loads a full folder as it is; rmtrain loads all three.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from rmtrain.errors import ModelError, first_line
from rmtrain.model import (
    Member,
    Members,
    RewardModel,
    clear_gguf_quantization,
    find_head_name,
    head_kwargs,
    head_module,
    heads_of,
    is_encoder_config,
    run_in_fp32,
)
from rmtrain.tokenizer import TokenFormat, read_format, save_format


ENSEMBLE_FILE = "rmtrain_ensemble.json"


def folder_kind(path: Path, what: str = "model folder") -> str:
    """"model", "adapter" or "ensemble"; anything else is a one-line error naming the folder and what it holds instead."""
    if not path.is_dir():
        why = f"no such {what}" if not path.exists() else f"is a file, not a {what}"
        raise ModelError(f"{path}: {why}; give a finished run or a model folder")
    if (path / ENSEMBLE_FILE).is_file():
        return "ensemble"
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


def temporary_folder(target: Path, inside: bool = False) -> Path:
    """An empty folder to write `target` into: `.NAME.tmp` beside it, or `.partial.tmp` inside it (`inside`: for files
    that join a folder that already exists)."""
    tmp = target / ".partial.tmp" if inside else target.parent / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def put_in_place(tmp: Path, target: Path, merge_into: bool = False) -> None:
    """`tmp`, written whole, takes `target`'s place by a rename (`merge_into`: its files are moved into the existing
    `target` one by one, as the final model joins its run folder): nothing is ever half-written under `target`'s name."""
    if merge_into:
        for item in tmp.iterdir():
            os.replace(item, target / item.name)
        tmp.rmdir()
        return
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


@contextmanager
def atomic_folder(target: Path, merge_into: bool = False) -> Iterator[Path]:
    """A folder to write `target` into, put in place when the block ends and removed if it raises: the one
    write-then-rename of run folders, checkpoints, best, merged and exported models."""
    tmp = temporary_folder(target, inside=merge_into)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    put_in_place(tmp, target, merge_into)


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
    heads = heads_of(model)  # an adapter's base is rebuilt with them (its config.json is not in the folder)
    save_format(directory, fmt, max_length, **({"heads": heads} if heads > 1 else {}) | extra)


DEFAULT_MAX_LENGTH = 1024


def scoring_max_length(requested: int | None, trained: int | None) -> int:
    """The max_length texts are cut to: the one asked for, else the one the model was trained with, else 1024."""
    return requested or trained or DEFAULT_MAX_LENGTH


@dataclass
class SavedText:
    """How a saved folder turns text into ids: its tokenizer, token format and trained max_length (None if unknown);
    loaded before the weights, so that data is read and tokenized before the model takes its time to load."""

    tokenizer: Any
    fmt: TokenFormat
    max_length: int | None
    format_extra: dict[str, Any]
    """The rest of rmtrain_format.json (e.g. export's `eos_added_by_tokenizer`)."""


def load_saved_text(path: str | Path) -> SavedText:
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    kind = folder_kind(path)
    saved_format = read_format(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as error:  # transformers raises many types; what matters is that there is no tokenizer
        raise ModelError(f"{path}: holds a model but no tokenizer transformers can load ({first_line(error)})") from None
    if tokenizer.pad_token is None:
        raise ModelError(f"{path}: the tokenizer has no pad token")
    is_encoder = saved_format.get("is_encoder")
    if is_encoder is None:  # a folder plain transformers wrote (an adapter always has rmtrain's format)
        try:
            is_encoder = kind == "model" and is_encoder_config(AutoConfig.from_pretrained(str(path)))
        except Exception as error:  # noqa: BLE001 -- a bad config.json: one line
            raise ModelError(f"{path}: cannot read config.json: {first_line(error)}") from None
    fmt = TokenFormat(
        append_eos=saved_format.get("append_eos", None if is_encoder else tokenizer.eos_token),
        pad_token_id=tokenizer.pad_token_id,
        is_encoder=is_encoder,
        eos_in_tokenizer=saved_format.get("eos_added_by_tokenizer"),
    )
    return SavedText(tokenizer, fmt, saved_format.get("max_length"), saved_format)


def load_saved(path: str | Path, dtype: torch.dtype | None = None, text: SavedText | None = None) -> tuple[RewardModel, int | None]:
    """A model folder (full or LoRA adapter) written by rmtrain or plain transformers, ready to score (`text`: its
    tokenizer side, when loaded already). Returns the model and the max_length it was trained with (None if unknown).
    """
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    kind = folder_kind(path)
    text = text or load_saved_text(path)
    if kind == "ensemble":
        return _load_members(path, dtype, text), text.max_length
    try:
        if kind == "adapter":
            model = _load_adapter(path, dtype, text.format_extra.get("heads", 1))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    except Exception as error:  # noqa: BLE001 -- a truncated weights file, a moved base model, an offline Hub: one line
        what = "its base model (recipe.yaml or adapter_config.json)" if kind == "adapter" else "the model"
        raise ModelError(f"{path}: cannot load {what}: {first_line(error)}") from None
    model.eval()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head_name = find_head_name(base, text.fmt.is_encoder)
    head = head_module(model, head_name)
    weights_dtype = base.dtype
    run_in_fp32(head)  # as in training: the rewards of a bf16 folder are read by an fp32 head
    autocast = weights_dtype if weights_dtype in (torch.bfloat16, torch.float16) else None
    return RewardModel(model, text.tokenizer, text.fmt, head, head_name, weights_dtype, autocast), text.max_length


def _load_adapter(path: Path, dtype: torch.dtype | None, heads: int = 1) -> nn.Module:
    import peft

    return peft.PeftModel.from_pretrained(load_adapter_base(path, dtype, heads), str(path))


def load_adapter_base(path: Path, dtype: torch.dtype | None, heads: int = 1) -> nn.Module:
    """An adapter's base rebuilt exactly as the run loaded it (recipe.yaml of the run, e.g. a gguf file; else
    adapter_config.json's base), with its `heads` and the adapter folder's pad token."""
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
    base = AutoModelForSequenceClassification.from_pretrained(name, **kwargs, **head_kwargs(heads))
    if recipe_file.is_file():
        clear_gguf_quantization(base)
    base.config.pad_token_id = AutoTokenizer.from_pretrained(str(path)).pad_token_id
    return base


def read_manifest(path: Path) -> dict[str, Any]:
    """An ensemble folder's rmtrain_ensemble.json: {"members": [{"folder", "from"}, ...], "base": folder or null}."""
    try:
        manifest = json.loads((path / ENSEMBLE_FILE).read_text())
        folders = [path / m["folder"] for m in manifest["members"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(f"{path / ENSEMBLE_FILE}: not an ensemble manifest rmtrain wrote ({first_line(error)})") from None
    for folder in folders + ([path / manifest["base"]] if manifest.get("base") else []):
        if not folder.is_dir():
            raise ModelError(f"{path}: its member folder {folder.name} is missing; write the ensemble again (rmtrain ensemble)")
    return manifest


def _load_members(path: Path, dtype: torch.dtype | None, text: SavedText) -> RewardModel:
    """Every member, each with its own head; adapters on one base load the base once, each adapter by its name."""
    import peft
    from transformers import AutoModelForSequenceClassification

    manifest = read_manifest(path)
    members = []
    try:
        if manifest.get("base"):
            base = AutoModelForSequenceClassification.from_pretrained(str(path / manifest["base"]), dtype=dtype)
            model = None
            for m in manifest["members"]:
                if model is None:
                    model = peft.PeftModel.from_pretrained(base, str(path / m["folder"]), adapter_name=m["folder"])
                else:
                    model.load_adapter(str(path / m["folder"]), adapter_name=m["folder"])
            model.eval()
            head_name = find_head_name(base, text.fmt.is_encoder)
            members = [Member(model, head_module(model, head_name), m["folder"]) for m in manifest["members"]]
            models = [model]
        else:
            models = [AutoModelForSequenceClassification.from_pretrained(str(path / m["folder"]), dtype=dtype).eval() for m in manifest["members"]]
            head_name = find_head_name(models[0], text.fmt.is_encoder)
            members = [Member(model, head_module(model, head_name)) for model in models]
    except Exception as error:  # noqa: BLE001 -- a truncated weights file, a missing file: one line
        raise ModelError(f"{path}: cannot load its members: {first_line(error)}") from None
    for head in {id(m.head): m.head for m in members}.values():
        run_in_fp32(head)
    weights_dtype = next(models[0].parameters()).dtype
    autocast = weights_dtype if weights_dtype in (torch.bfloat16, torch.float16) else None
    return RewardModel(Members(models), text.tokenizer, text.fmt, members[0].head, head_name, weights_dtype, autocast, members)


def merged_in_fp32(model: nn.Module) -> nn.Module:
    """A LoRA model's adapter folded into its base in fp32 on the CPU (one rounding when written in the base's dtype,
    not a bf16 sum of a bf16-rounded update); `model` is merged in place, and is no use as a PEFT model after."""
    return model.to("cpu", torch.float32).merge_and_unload()
