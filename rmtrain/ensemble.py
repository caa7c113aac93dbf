"""`rmtrain ensemble`: K finished runs or model folders made into one folder that rmtrain scores as an ensemble (one
reward per member; rmtrain.aggregate reads them out). The members must read text the same way (tokenizer and token
format) and share an architecture; LoRA adapters on one base keep that base once. The checks that folders read text
alike, and where a run started from, are here too: `rmtrain average` refuses what they refuse.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from rmtrain.errors import DataError, ModelError, first_line
from rmtrain.log import RunLog
from rmtrain.saved import (
    ENSEMBLE_FILE,
    SavedText,
    atomic_folder,
    folder_kind,
    load_adapter_base,
    load_saved,
    load_saved_text,
    merged_in_fp32,
)
from rmtrain.tokenizer import save_format

FORMAT_KEYS = ("append_eos", "pad_token_id", "is_encoder", "eos_in_tokenizer")


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise DataError(f"--out: {out} exists; pass --overwrite to replace it, or choose another folder")
    if not out.parent.is_dir():
        raise DataError(f"--out: {out}: folder {out.parent} does not exist; create it or pick another path")


def member_folders(paths: list[str], command: str) -> list[tuple[Path, str]]:
    """Each folder and its kind ("model" or "adapter"); an ensemble is not a member (give its members)."""
    folders = []
    for path in map(Path, paths):
        kind = folder_kind(path, "run or model folder")
        if kind == "ensemble":
            raise ModelError(f"{path}: is an ensemble already; give {command} its members instead")
        folders.append((path, kind))
    return folders


def check_same_text(first: Path, first_text: SavedText, other: Path, other_text: SavedText) -> None:
    """Members score the same token ids only if they read text alike: one tokenizer (vocabulary, special tokens, chat
    template) and one token format (EOS appended, pad, encoder or decoder)."""
    a, b = first_text.tokenizer, other_text.tokenizer
    differences = [
        name for name, x, y in (
            ("vocabulary", a.get_vocab(), b.get_vocab()),
            ("special tokens", a.all_special_tokens, b.all_special_tokens),
            ("chat template", a.chat_template, b.chat_template),
        ) if x != y
    ]
    differences += [f"token format ({key})" for key in FORMAT_KEYS if getattr(first_text.fmt, key) != getattr(other_text.fmt, key)]
    if differences:
        raise ModelError(
            f"{other}: reads text differently from {first} ({', '.join(differences)} differ{'s' if len(differences) == 1 else ''}); "
            "members must share a tokenizer and token format (runs of one base model, or folders exported alike)"
        )


def base_of(path: Path) -> dict[str, Any] | None:
    """Where a run's weights started: its recipe's model (name or resolved folder; revision, gguf file) and heads;
    None for a folder that is not a run (no recipe.yaml)."""
    from rmtrain.config import load_recipe

    if not (path / "recipe.yaml").is_file():
        return None
    model = load_recipe(path / "recipe.yaml").model
    local = Path(model.name_or_path).expanduser()
    name = str(local.resolve()) if local.is_dir() else model.name_or_path
    return {"name_or_path": name, **model.source_kwargs(), "heads": model.heads}


def architecture_of(path: Path, kind: str) -> str:
    from transformers import AutoConfig

    if kind == "adapter":
        base = base_of(path)
        name = base["name_or_path"] if base else json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    else:
        name = str(path)
    try:
        return AutoConfig.from_pretrained(name).model_type
    except Exception as error:  # noqa: BLE001 -- a missing base, a bad config.json: one line
        raise ModelError(f"{path}: cannot read its model's config ({name}): {first_line(error)}") from None


def make_ensemble(members: list[str], out_dir: str, overwrite: bool = False, log: RunLog | None = None) -> Path:
    """Write the ensemble folder: the shared tokenizer and format, `rmtrain_ensemble.json`, and `member-i/` folders (a
    full model each, or adapters beside one `base/`)."""
    log = log or RunLog()
    out = Path(out_dir)
    if len(members) < 2:
        raise DataError("rmtrain ensemble: give two or more members (finished runs or model folders)")
    check_output(out, overwrite)
    folders = member_folders(members, "rmtrain ensemble")
    if out.resolve() in {p.resolve() for p, _ in folders}:
        raise DataError(f"--out: {out} is one of the members; choose another folder")
    texts = [load_saved_text(p) for p, _ in folders]
    for (path, _), text in zip(folders[1:], texts[1:]):
        check_same_text(folders[0][0], texts[0], path, text)
    kinds = {p: architecture_of(p, kind) for p, kind in folders}
    if len(set(kinds.values())) > 1:
        (a, ka), (b, kb) = next((x, y) for x, y in zip(kinds.items(), list(kinds.items())[1:]) if x[1] != y[1])
        raise ModelError(f"{b}: a {kb} model, while {a} is a {ka} model; the members of an ensemble share an architecture")
    bases = [base_of(p) if kind == "adapter" else None for p, kind in folders]
    shared_base = all(kind == "adapter" for _, kind in folders) and bases[0] is not None and all(b == bases[0] for b in bases)
    lengths = [t.max_length for t in texts]
    max_length = max(lengths) if all(lengths) else None

    with atomic_folder(out) as tmp:
        texts[0].tokenizer.save_pretrained(str(tmp))
        extra = {k: v for k, v in texts[0].format_extra.items() if k in ("eos_added_by_tokenizer",)}
        save_format(tmp, texts[0].fmt, max_length, **extra)
        manifest: dict[str, Any] = {"members": [], "base": "base" if shared_base else None}
        if shared_base:
            write_base(folders[0][0], texts[0], tmp / "base")
        for i, ((path, kind), text) in enumerate(zip(folders, texts)):
            folder = tmp / f"member-{i}"
            if shared_base:
                copy_files(path, folder, ("adapter_config.json", "adapter_model.safetensors"))
            elif kind == "model":
                copy_files(path, folder, ("config.json",), ("*.safetensors", "*.safetensors.index.json"))
            else:  # an adapter among full models, or on a base of its own: merged into a full model
                rm, _ = load_saved(path, text=text)
                merged_in_fp32(rm.model).to(rm.weights_dtype).save_pretrained(str(folder), safe_serialization=True)
            manifest["members"].append({"folder": folder.name, "from": str(path.resolve())})
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    how = "adapters on one base, stored once" if shared_base else "full models"
    log.info(f"ensemble of {len(folders)} members ({how}) written to {out}")
    return out


def write_base(adapter_run: Path, text: SavedText, target: Path) -> None:
    """The base the adapters were trained over, as the run loaded it (recipe.yaml), written once in its own dtype."""
    base = load_adapter_base(adapter_run, None, text.format_extra.get("heads", 1))
    base.save_pretrained(str(target), safe_serialization=True)


def copy_files(source: Path, target: Path, names: tuple[str, ...], patterns: tuple[str, ...] = ()) -> None:
    target.mkdir(parents=True)
    files = [source / n for n in names] + [f for p in patterns for f in sorted(source.glob(p))]
    for file in files:
        if not file.is_file():
            raise ModelError(f"{source}: {file.name} is missing; give a finished run or a complete model folder")
        shutil.copy2(file, target / file.name)
