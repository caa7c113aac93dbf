"""`rmtrain export`: a run folder -> a model folder that RL trainers load with plain transformers.

What the folder guarantees (and the fresh-process check after writing verifies):
- `AutoModelForSequenceClassification.from_pretrained(OUT)` is the reward model, LoRA merged (`--merge`),
  one-logit head (a run with `model.heads: K` gets the mean of its K heads: the ensemble's mean reward, exactly),
  `config.pad_token_id` set to a pad token that is never a real token (decoder heads read
  the rightmost non-pad token, so pad == EOS would move the reward token).
- `AutoTokenizer.from_pretrained(OUT)` tokenizes like training: chat template saved, and for decoders
  trained on plain text with an appended EOS the tokenizer's post-processor appends that EOS itself, so
  plain `tokenizer(prompt + response)` gives the training tokens.
- `reward_stats.json`: mean and std of the rewards over the check's pairs (`--data`, else the run's eval pairs,
  else pairs of its training data); `--normalize` folds them into the head so the folder's rewards are
  `(r - mean) / std`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtrain.config import DataSource
from rmtrain.errors import ExportError, ModelError
from rmtrain.groups import Group, tokenize_rows
from rmtrain.inference import prepare_inference, rewards_of
from rmtrain.log import RunLog
from rmtrain.model import RewardModel
from rmtrain.rows import check_single_shape
from rmtrain.saved import atomic_folder, folder_kind, load_saved, save_model_folder, scoring_max_length
from rmtrain.sources import read_rows
from rmtrain.splits import RunData
from rmtrain.tokenizer import TokenFormat, choose_pad_token, special_token_frame

STATS_FILE = "reward_stats.json"
CHECK_TOLERANCE = 1e-3
CHECK_PAIRS = 16


# --------------------------------------------------------------------------------------------------
# Reference pairs: the run's eval set (or --data), for the statistics and the check


TRAIN_REFERENCE_PAIRS = 512
"""Pairs of the training data that stand in for an eval set the run does not have."""


@dataclass
class Reference:
    """Pairs whose rewards define the statistics and the check, with the raw rows they index."""

    name: str
    what: str
    """Where they come from, for the console: "--data", "the run's eval pairs" or "the run's training data"."""
    rows: list[dict]
    """The rows of the (first) source the check reads whole texts of."""
    pairs: list[Group]
    """Tokenized as the run's eval was."""


def reference_pairs(run_dir: Path, data_path: str | None, rm: RewardModel, max_length: int) -> Reference | None:
    """--data, else the run's eval pairs (rmtrain.splits.RunData, as `rmtrain eval` reads them), else the first pairs
    of its training data; None for a folder that is not a run."""
    if data_path is not None:
        rows, name = read_rows(DataSource(path=data_path))
        check_single_shape(rows, name)
        pairs, _ = tokenize_rows(rows, name, rm.tokenizer, rm.fmt, max_length, "filter")
        return Reference(name, "--data", rows, pairs)
    if not (run_dir / "recipe.yaml").is_file():
        return None
    run = RunData(run_dir)
    sets = run.eval_sets(rm.tokenizer, rm.fmt)
    if sets:  # statistics over every source's pairs; the check re-reads whole rows of the first source
        return Reference(", ".join(s.name for s in sets), "the run's eval pairs", sets[0].rows, [g for s in sets for g in s.groups])
    train = run.train_pairs(rm.tokenizer, rm.fmt, TRAIN_REFERENCE_PAIRS)
    return Reference(train.name, f"the run has no eval set: the first {len(train.groups)} pairs of its training data", train.rows, train.groups)


def reward_statistics(rewards: torch.Tensor, name: str) -> dict[str, Any]:
    """Mean and std over the rewards of every completion (chosen and rejected, or a list's)."""
    rewards = rewards.double()
    std = rewards.std(unbiased=False).item()
    if not std > 0:
        raise ExportError(f"{name}: every reward is the same ({rewards[0].item():.6g}); cannot normalize by a zero std")
    return {"mean": rewards.mean().item(), "std": std, "num_rewards": rewards.numel(), "source": name}


# --------------------------------------------------------------------------------------------------
# Making the folder safe for plain transformers


def make_pad_safe(model: nn.Module, tokenizer, fmt: TokenFormat) -> TokenFormat:
    """A decoder's pad token must differ from EOS/BOS, and the config must name the tokenizer's pad."""
    if not fmt.is_encoder and (tokenizer.pad_token is None or tokenizer.pad_token in (tokenizer.eos_token, tokenizer.bos_token)):
        tokenizer.pad_token = choose_pad_token(tokenizer, None, is_encoder=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.pad_token_id = tokenizer.pad_token_id
    return TokenFormat(fmt.append_eos, tokenizer.pad_token_id, fmt.is_encoder)


def append_eos_in_tokenizer(tokenizer, eos: str) -> bool:
    """Make `tokenizer(text)` (special tokens on, the default) end with `eos`, as training's `text + eos` did.

    Only a fast tokenizer has a post-processor to change; returns False for others. The new tokens are
    checked against training's on a few texts.
    """
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    probes = ["hello", "Human: hi\n\nAssistant: hello there!", " two  spaces\nand a new line"]
    expected = [tokenizer(text + eos)["input_ids"] for text in probes]
    head, tail = special_token_frame(tokenizer)
    framed = tokenizer("hello")["input_ids"]
    leading, trailing = framed[:head], framed[len(framed) - tail :]
    tokens = [tokenizer.convert_ids_to_tokens(i) for i in leading] + ["$A"] + [eos] + [tokenizer.convert_ids_to_tokens(i) for i in trailing]
    specials = {tokenizer.convert_ids_to_tokens(i): i for i in leading + trailing} | {eos: tokenizer.convert_tokens_to_ids(eos)}
    previous = backend.post_processor
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(t if t == "$A" else f"{t}:0" for t in tokens),
        pair=" ".join(t if t == "$A" else f"{t}:0" for t in tokens) + " $B:1",
        special_tokens=list(specials.items()),
    )
    if [tokenizer(text)["input_ids"] for text in probes] != expected:
        backend.post_processor = previous
        return False
    return True


def score_linear(head: nn.Module, outputs: int = 1) -> nn.Linear:
    """The Linear layer that produces the rewards (the head itself, or its last Linear with `outputs` outputs)."""
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in head.modules() if isinstance(m, nn.Linear) and m.out_features == outputs]
    if not linears:
        raise ExportError(f"{type(head).__name__}: no Linear layer with {outputs} output(s) makes the reward")
    return linears[-1]


@torch.no_grad()
def mean_head(model: nn.Module, head_name: str) -> None:
    """K reward heads -> one, their mean: a mean of linear maps is a linear map, so the one logit of the folder is
    the heads' mean reward exactly (up to float rounding), and RL trainers that read one logit use it as it is."""
    heads = model.config.num_labels
    head = getattr(model, head_name)
    linear = score_linear(head, heads)
    mean = nn.Linear(linear.in_features, 1, bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
    mean.weight.copy_(linear.weight.mean(0, keepdim=True))
    if linear.bias is not None:
        mean.bias.copy_(linear.bias.mean(0, keepdim=True))
    if linear is head:
        setattr(model, head_name, mean)
    else:
        parent = next(m for m in head.modules() if any(child is linear for child in m.children()))
        name = next(n for n, child in parent.named_children() if child is linear)
        setattr(parent, name, mean)
    model.config.num_labels = 1


@torch.no_grad()
def fold_normalization(head: nn.Module, mean: float, std: float, model_name: str) -> None:
    """w' = w / std, b' = (b - mean) / std: the head then outputs (r - mean) / std."""
    linear = score_linear(head)
    check_head_has_bias(head, model_name)
    linear.weight.div_(std)
    linear.bias.sub_(mean).div_(std)


def check_head_has_bias(head: nn.Module, model_name: str, outputs: int = 1) -> None:
    if score_linear(head, outputs).bias is None:
        raise ExportError(
            f"--normalize: the score head of {model_name} has no bias, and plain transformers would drop an added one, "
            f"so the mean cannot be folded in; export without --normalize and subtract the mean of {STATS_FILE} "
            "(GRPO's group-relative advantages cancel it anyway)"
        )


# --------------------------------------------------------------------------------------------------
# The check: the folder in a fresh process, read the way an RL trainer reads it


def check_inputs(rows: list[dict], groups: list[Group]) -> list[dict]:
    """Inputs for rmtrain.plain_check: every completion of each group (chosen, rejected; or a list's), whole."""
    inputs = []
    for group in groups:
        row = rows[group.row]
        prompt = row.get("prompt")
        for response in row["completions"] if "completions" in row else (row["chosen"], row["rejected"]):
            if isinstance(response, list):
                inputs.append({"messages": (prompt or []) + response})
            else:
                inputs.append({"text": (prompt or "") + response})
    return inputs


def plain_transformers_rewards(folder: Path, inputs: list[dict]) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        sample = Path(tmp, "inputs.json")
        sample.write_text(json.dumps(inputs))
        result = subprocess.run(
            [sys.executable, "-m", "rmtrain.plain_check", str(folder), str(sample)],
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-3:])
        raise ExportError(f"export check: plain transformers could not score {folder}: {tail}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------


def export_model(
    run_dir: str,
    out_dir: str,
    merge: bool,
    normalize: bool = False,
    data_path: str | None = None,
    check: bool = True,
    check_pairs: int = CHECK_PAIRS,
    log: RunLog | None = None,
) -> dict[str, Any]:
    """Write the folder; returns what was measured: {"out", "stats" (or None), "check_max_abs_diff" (or None)}."""
    log = log or RunLog()
    out, run = Path(out_dir), Path(run_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"{out}: exists and is not empty; choose a new folder")
    kind = folder_kind(run, "run or model folder")
    if kind == "adapter" and not merge:
        raise ModelError(f"{run_dir}: is a LoRA adapter; pass --merge to write a plain model folder")
    if kind == "ensemble":
        raise ModelError(
            f"{run_dir}: an ensemble of separate models, which no one-model folder holds; score or serve it with rmtrain, "
            "or average runs from one base into one model (rmtrain average)"
        )
    # fp32: LoRA merged and rewards checked at full precision (the folder is written in fp32).
    rm, max_length = load_saved(run, dtype=torch.float32)
    max_length = scoring_max_length(None, max_length)
    model = rm.model
    is_adapter = hasattr(model, "merge_and_unload")

    if normalize:
        check_head_has_bias(rm.head, type(model.get_base_model() if is_adapter else model).__name__, rm.heads)
    reference = reference_pairs(run, data_path, rm, max_length)
    stats, check_sample = None, None
    if reference is not None:
        name, rows, pairs = reference.name, reference.rows, reference.pairs
        if not pairs:
            raise ExportError(f"{name}: no pairs left for the reward statistics (all filtered by length?)")
        inference = prepare_inference(rm, max_sequences=32)
        stats = reward_statistics(inference.aggregate(torch.cat(rewards_of(inference, pairs))), name) | {"pairs_from": reference.what}
        log.info(
            f"reward statistics over {stats['num_rewards']} rewards of {name} ({reference.what}): "
            f"mean {stats['mean']:.4f}, std {stats['std']:.4f}"
        )
        # The check reads whole texts, so it uses pairs that fit max_length untruncated.
        whole, _ = tokenize_rows(rows[: 4 * check_pairs], name, rm.tokenizer, rm.fmt, max_length, "filter")
        whole = [g for g in whole if len(g.completions) == len(rows[g.row].get("completions", "ab"))][:check_pairs]
        if whole:
            check_sample = (check_inputs(rows, whole), inference.aggregate(torch.cat(rewards_of(inference, whole))).double())
    if normalize and stats is None:
        raise ExportError(f"--normalize: {run_dir} is not a run (no recipe.yaml) and no --data was given; pass --data PAIRS.jsonl")
    if check and check_sample is None:
        raise ExportError(
            f"export check: no pairs to compare on ({run_dir} is not a run with data, or no pair fits max_length); "
            "pass --data PAIRS.jsonl, or --no-check"
        )

    if is_adapter:
        model = model.merge_and_unload()
    if rm.heads > 1:
        mean_head(model, rm.head_name)
        log.info(f"the {rm.heads} reward heads are exported as their mean, one head (the run folder scores them all)")
    fmt = make_pad_safe(model, rm.tokenizer, rm.fmt)
    folded_head = getattr(model, rm.head_name)
    if normalize:
        fold_normalization(folded_head, stats["mean"], stats["std"], type(model).__name__)
    eos_in_tokenizer = bool(fmt.append_eos) and append_eos_in_tokenizer(rm.tokenizer, fmt.append_eos)
    if fmt.append_eos and not eos_in_tokenizer:
        log.warn(
            f"the tokenizer cannot append {fmt.append_eos!r} itself (not a fast tokenizer): plain tokenizer(text) misses "
            "the EOS training appended, which the check below will show; append it to plain-text inputs yourself"
        )
    saved_fmt = TokenFormat(None if eos_in_tokenizer else fmt.append_eos, fmt.pad_token_id, fmt.is_encoder)

    format_extra = {"eos_added_by_tokenizer": fmt.append_eos if eos_in_tokenizer else None, "normalized": normalize}
    with atomic_folder(out) as tmp:
        save_model_folder(model, None, rm.tokenizer, saved_fmt, max_length, tmp, **format_extra)
        if stats is not None:
            (tmp / STATS_FILE).write_text(json.dumps(stats | {"folded_into_head": normalize}, indent=2) + "\n")
        try:
            worst = check_folder(tmp, check_sample if check else None, stats if normalize else None, log)
        except ExportError as error:  # the folder is kept for inspection
            failed = out.with_name(out.name + ".failed")
            shutil.rmtree(failed, ignore_errors=True)
            tmp.rename(failed)
            raise ExportError(f"{error}; {out} not written, the folder is kept in {failed}") from None
    log.info(f"exported {run_dir} to {out}")
    return {"out": out, "stats": stats, "check_max_abs_diff": worst}


def check_folder(tmp: Path, check_sample: tuple | None, folded_stats: dict | None, log: RunLog) -> float | None:
    """Plain transformers' rewards from the written folder vs rmtrain's from the run: the max abs difference."""
    worst = None
    if check_sample is not None:
        inputs, ours = check_sample
        if folded_stats is not None:
            ours = (ours - folded_stats["mean"]) / folded_stats["std"]
        theirs = torch.tensor(plain_transformers_rewards(tmp, inputs), dtype=torch.float64)
        worst = (theirs - ours).abs().max().item()
        line = f"export check: plain transformers vs rmtrain on {len(inputs)} rewards: max abs difference {worst:.2e}"
        if not worst <= CHECK_TOLERANCE:
            raise ExportError(f"{line} > {CHECK_TOLERANCE:g}")
        log.info(line + f" (limit {CHECK_TOLERANCE:g})")
    return worst
