"""`rmtrain export`: a run folder -> a plain transformers model folder (LoRA merged on request)."""

from __future__ import annotations

import shutil
from pathlib import Path

from rmtrain.model import ModelError, load_saved, save_model_folder


def export_model(run_dir: str, out_dir: str, merge: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out}: exists and is not empty; choose a new folder")
    rm, max_length = load_saved(run_dir)
    model = rm.model
    is_adapter = hasattr(model, "merge_and_unload")
    if is_adapter and not merge:
        raise ModelError(f"{run_dir}: is a LoRA adapter; pass --merge to write a plain model folder")
    if is_adapter:
        model = model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(model, None, rm.tokenizer, rm.fmt, max_length or 1024, tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
