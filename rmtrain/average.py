"""`rmtrain average`: runs fine-tuned from one base averaged into one model (weight averaging, WARM: Ramé et al. 2024,
arXiv 2401.12187). LoRA runs are merged first (in fp32), then every weight is averaged; the folder is a plain model
that AutoModelForSequenceClassification loads, so it scores, serves, exports and drives GRPO as any run does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rmtrain.ensemble import base_of, check_output, check_same_text, member_folders
from rmtrain.errors import DataError, ModelError
from rmtrain.log import RunLog
from rmtrain.saved import atomic_folder, load_saved, load_saved_text, merged_in_fp32, save_model_folder


def average_weights(weights: list[float] | None, runs: int) -> list[float]:
    """`--weights` (any non-negative numbers, one per run, normalized to sum to 1), else equal weights."""
    if weights is None:
        return [1 / runs] * runs
    if len(weights) != runs:
        raise DataError(f"--weights: {len(weights)} weight{'s' if len(weights) != 1 else ''} for {runs} runs; give one per run")
    if any(not w >= 0 for w in weights) or not sum(weights) > 0:
        raise DataError(f"--weights: {weights}: each must be >= 0 and at least one > 0")
    return [w / sum(weights) for w in weights]


def average_runs(runs: list[str], out_dir: str, weights: list[float] | None = None, overwrite: bool = False,
                 log: RunLog | None = None) -> Path:
    """Write the averaged model into `out_dir`: sum_i w_i * theta_i over the runs' (merged) weights, accumulated in
    float64 and written in the runs' dtype."""
    log = log or RunLog()
    out = Path(out_dir)
    if not runs:
        raise DataError("rmtrain average: give one or more finished runs")
    check_output(out, overwrite)
    folders = member_folders(runs, "rmtrain average")
    shares = average_weights(weights, len(folders))
    bases = []
    for path, _ in folders:
        base = base_of(path)
        if base is None:
            raise ModelError(f"{path}: not a run (no recipe.yaml), so where its weights started is unknown; average finished runs")
        bases.append(base)
    for (path, _), base in zip(folders[1:], bases[1:]):
        if base != bases[0]:
            what = ", ".join(f"{k} {base[k]!r} vs {bases[0][k]!r}" for k in base if base[k] != bases[0][k])
            raise ModelError(f"{path}: fine-tuned from another start than {folders[0][0]} ({what}); average runs of one base")
    texts = [load_saved_text(p) for p, _ in folders]
    for (path, _), text in zip(folders[1:], texts[1:]):
        check_same_text(folders[0][0], texts[0], path, text)

    total: dict[str, torch.Tensor] = {}
    model, dtype = None, None
    for (path, kind), text, share in zip(folders, texts, shares):
        rm, _ = load_saved(path, text=text)
        dtype = dtype or rm.weights_dtype
        model = merged_in_fp32(rm.model) if kind == "adapter" else rm.model.float()
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                total[name] = total.get(name, 0) + share * tensor.double()
            else:
                total.setdefault(name, tensor)
    state = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in total.items()}
    lengths = [t.max_length for t in texts]
    with atomic_folder(out) as tmp:
        save_model_folder(model, state, texts[0].tokenizer, texts[0].fmt, max(lengths) if all(lengths) else None, tmp, dtype=dtype,
                          averaged_from=[str(p.resolve()) for p, _ in folders], average_weights=shares)
    log.info(f"average of {len(folders)} runs (weights {', '.join(f'{w:.3g}' for w in shares)}) written to {out}")
    return out
