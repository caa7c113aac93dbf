"""Recipe: YAML -> plain dataclasses, one per concern.

`load_recipe()` checks the whole file before anything heavy is imported or loaded, and reports every
problem at once, each with its YAML path (`train.learning_rate: ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rmtrain.errors import RecipeError


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hub id or local folder of the base model (required)."""
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    """Forwarded to `from_pretrained` (dtype, attn_implementation, revision, ...). `num_labels` is always 1."""
    trust_remote_code: bool = False
    gguf_file: str | None = None
    """A .gguf file inside `name_or_path` to load (dequantized to float weights)."""
    chat_template_path: str | None = None
    """A Jinja file, or a tokenizer folder whose chat template to use."""
    eos_token: str | None = None
    pad_token: str | None = None
    disable_dropout: bool = True
    heads: int = 1
    """Reward heads on the one trunk, each its own seeded init, trained in the same forward: an ensemble at the cost of
    one model (rmtrain.ensemble reads it); 1: a single reward model."""

    def source_kwargs(self) -> dict[str, Any]:
        """What config, tokenizer and weights are read with: revision, trust_remote_code, gguf_file."""
        kwargs = {k: v for k, v in self.init_kwargs.items() if k == "revision"}
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Everything `from_pretrained` of the model gets (`init_kwargs` plus the source keys)."""
        return dict(self.init_kwargs) | self.source_kwargs()


@dataclass
class DataSource:
    path: str = ""
    """Local json/jsonl/parquet/csv file or folder, or a Hub dataset id."""
    split: str = "train"
    name: str | None = None
    """Hub dataset config name."""
    columns: dict[str, str | None] = field(default_factory=dict)
    """Maps this source's column names onto prompt/chosen/rejected/margin (pairs) or completions/scores/ranks
    (lists), e.g. {question: prompt}; null drops a column (e.g. {margin: null} to train without the file's margins)."""
    where: dict[str, Any] = field(default_factory=dict)
    """Keep only rows whose columns equal these values, e.g. {split: train_sample}."""
    limit: int | None = None
    """Use only the first N rows (after `skip`)."""
    skip: int = 0
    """Skip the first N rows."""
    weight: float = 1.0
    """In a mixture: how many of this source's rows an epoch draws (0.5 a seeded random half, 2 every row twice)."""


@dataclass
class DataConfig:
    train: DataSource | list[DataSource] | None = None
    """A source, or a list of sources (a mixture)."""
    eval: DataSource | list[DataSource] | None = None
    """A source, or a list of sources (each reported on its own too)."""
    eval_fraction: float | None = None
    """Hold out this fraction of train as the eval set (when `eval` is not given)."""
    max_length: int = 1024
    truncation: Literal["filter", "truncate"] = "filter"
    """filter: drop a pair if either side is longer than max_length (TRL). truncate: cut from the left."""
    num_proc: int | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    """Defaults to the model's reward head (`score` for decoders, `classifier` for BERT-like encoders)."""
    init_from: str | None = None
    """An existing PEFT reward-model adapter folder to continue training."""
    merge: bool = False
    """Also write a merged full model to `output_dir/merged`."""


@dataclass
class KeepBest:
    metric: Literal["accuracy", "loss", "bestofk_regret"] = "accuracy"
    """accuracy: higher is better; loss (Bradley-Terry): lower is better; bestofk_regret (ranked lists with scores: the
    normalized regret of the completion the model ranks first, rmtrain.diagnostics.best_of_k): lower is better."""

    @property
    def lower_is_better(self) -> bool:
        return self.metric in ("loss", "bestofk_regret")

    @property
    def needs_lists(self) -> bool:
        """The metric exists only where the eval set holds ranked lists."""
        return self.metric == "bestofk_regret"


@dataclass
class TrainConfig:
    output_dir: str = ""
    learning_rate: float = 1e-4
    per_device_batch_size: int = 8
    """Rows per device per batch: pairs, or ranked lists."""
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int | None = None
    """Optimizer steps; overrides num_epochs when set."""
    warmup_ratio: float = 0.0
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial", "inverse_sqrt"
    ] = "linear"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 42
    bf16: bool | None = None
    """null: bf16 on CUDA, fp32 on CPU."""
    gradient_checkpointing: bool = True
    activation_offloading: bool = False
    center_rewards_coefficient: float | None = None
    list_loss: Literal["bradley_terry", "plackett_luce"] = "bradley_terry"
    """Ranked lists: Bradley-Terry over every pair with different scores, or the listwise Plackett-Luce loss."""
    list_weighting: Literal["pair", "list"] = "pair"
    """Bradley-Terry on lists: every pair weighs the same (as training on the binarized pairs), or every list
    (its pairs averaged, as InstructGPT)."""
    list_margins: bool = False
    """Bradley-Terry on lists: each pair's margin is its score difference."""
    batching: Literal["plain", "length_grouped"] = "length_grouped"
    """length_grouped: batches of similar length (shuffled mega-batches), so little padding is computed."""
    max_tokens_per_batch: int | None = None
    """Instead of a fixed pair count: as many pairs per batch as fit this many computed tokens (padding included)."""
    max_tokens_per_forward: int | Literal["auto"] | None = "auto"
    """Compute each batch in forward/backward passes of at most this many tokens: same gradient, bounded
    activation memory (evaluation batches are cut to it too). auto: the largest power of two whose estimated
    activations fit half a GiB on the CPU (an eighth of an accelerator's memory). null: the whole batch in one pass."""
    embedding_rows: Literal["seen", "all"] = "seen"
    """seen: only the input-embedding rows of tokens in the training data go to the optimizer (with weight
    decay 0 the others would get exactly zero updates, so the training is the same, with a cheaper step).
    all: every row, as TRL."""
    padding_free: bool = False
    """Decoders: all sequences of a batch in one row, position ids restarting (varlen attention on CUDA)."""
    share_prefix: bool = True
    """Decoders: one sequence prompt + completions per row, the prompt computed once."""
    prefix_attention: Literal["segments", "mask"] = "segments"
    """How the shared prefix's attention is computed: each sequence on its own (segments, checked on the model
    first, else the mask), or one 4D mask over the whole row."""
    logging_steps: int = 10
    eval_steps: int | None = None
    """Evaluate every N optimizer steps (and always at the end when there is an eval set)."""
    eval_batch_size: int | None = None
    """Pairs per device for evaluation; defaults to per_device_batch_size."""
    save_steps: int | None = None
    save_total_limit: int | None = 2
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped (no update); this many in a row stop the run."""
    keep_best: KeepBest | None = None
    """Keep the model of the best eval as output_dir/best, e.g. {metric: accuracy}."""
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = field(default_factory=list)
    """Trackers (Accelerate's) that get the recipe and the train/eval metrics; each is an extra: rmtrain[wandb]."""
    run_name: str | None = None
    """The run's name in the trackers; defaults to the output folder's name."""
    peak_tflops: float | None = None
    """The GPU's peak bf16 TFLOP/s for the MFU in the log; null: from rmtrain's table of data-centre GPUs."""
    dataloader_workers: int | None = None
    """Processes that collate batches while the device computes; null: 2 with a CUDA device, 0 on the CPU (whose
    cores compute)."""
    head_bootstrap: bool = False
    """With model.heads >= 2: each head weighs each training row by its own Poisson(1) draw (a bootstrap without copying data)."""
    ddp_timeout: int = 1800
    """Seconds a process waits in a collective for the others (several processes), as transformers' Trainer."""


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sources(data: DataConfig, split: str) -> list[DataSource]:
    """data.train or data.eval as a list of sources ([] when absent)."""
    value = getattr(data, split)
    return [] if value is None else value if isinstance(value, list) else [value]


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, collecting every problem.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return origin.__name__
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Return `value` checked (and mildly coerced: int -> float) against type `tp`, or record a problem."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1 and dataclasses.is_dataclass(real[0]):  # optional section: report its own problems
            return _convert(value, real[0], path, problems)
        if any(dataclasses.is_dataclass(o) for o in real):  # a section or a list of sections: by the value's shape
            wanted = next((o for o in real if dataclasses.is_dataclass(o)), None) if isinstance(value, dict) else \
                next((o for o in real if typing.get_origin(o) is list), None) if isinstance(value, list) else None
            if wanted is not None:
                return _convert(value, wanted, path, problems)
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            converted = _convert(value, option, path, trial)
            if not trial:
                return converted
        problems.append(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        return None
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        problems.append(f"{path}: expected one of {_type_name(tp)}, got {_describe(value)}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return None
        return _build(tp, value, path, problems)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_describe(value)}")
            return None
        return [_convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {_describe(value)}")
            return None
        return {_convert(k, key_tp, f"{path}", problems): _convert(v, val_tp, f"{path}.{k}", problems) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept what Python reads as a float.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    problems.append(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    return None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _build(cls: type, values: dict[str, Any], path: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
            problems.append(f"{where}: unknown key{hint}")
            continue
        kwargs[key] = _convert(value, hints[key], where, problems)
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _accepts_none(hints[k])})


def _accepts_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# --------------------------------------------------------------------------------------------------
# Values that type-check but cannot work.

COLUMN_TARGETS = ("prompt", "chosen", "rejected", "margin", "completions", "scores", "ranks", None)


def _not_finite(section: Any, path: str) -> list[str]:
    """YAML's .inf and .nan type-check as floats; no float key of a recipe can use them."""
    found = []
    for f in dataclasses.fields(section) if dataclasses.is_dataclass(section) else ():
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            found.append(f"{path}.{f.name}: must be a finite number, got {value}")
    return found


def _validate(recipe: Recipe, problems: list[str]) -> None:
    m, d, t, lora = recipe.model, recipe.data, recipe.train, recipe.lora
    for path, section in (("data", d), ("lora", lora), ("train", t)):
        problems.extend(_not_finite(section, path))

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    check(bool(m.name_or_path), "model.name_or_path: required (a Hub id or a local model folder)")
    if "num_labels" in m.init_kwargs:
        problems.append("model.init_kwargs.num_labels: a reward model's outputs are its heads; remove this key (model.heads: K for an ensemble)")
    check(m.heads >= 1, f"model.heads: must be >= 1, got {m.heads}")
    check(not t.head_bootstrap or m.heads >= 2, "train.head_bootstrap: needs model.heads >= 2 (each head its own bootstrap sample)")
    check(not t.head_bootstrap or t.list_loss == "bradley_terry",
          "train.head_bootstrap: weights pairs, so it needs train.list_loss: bradley_terry")
    check(d.train is not None, "data.train: required (a mapping with at least `path`)")
    for split in ("train", "eval"):
        listed = isinstance(getattr(d, split), list)
        check(not listed or bool(getattr(d, split)), f"data.{split}: an empty list; give a source or a list of sources")
        for i, source in enumerate(sources(d, split)):
            name = f"{split}[{i}]" if listed else split
            problems.extend(_not_finite(source, f"data.{name}"))
            if not isinstance(source, DataSource):  # an item that is no mapping: already reported while building
                continue
            check(bool(source.path), f"data.{name}.path: required (a local file or folder, or a Hub dataset id)")
            for column, target in source.columns.items():
                check(
                    target in COLUMN_TARGETS,
                    f"data.{name}.columns.{column}: maps onto '{target}', expected "
                    f"{', '.join(t for t in COLUMN_TARGETS if t)} or null",
                )
            check(source.skip >= 0, f"data.{name}.skip: must be >= 0, got {source.skip}")
            check(source.limit is None or source.limit > 0, f"data.{name}.limit: must be > 0, got {source.limit}")
            check(source.weight > 0, f"data.{name}.weight: must be > 0, got {source.weight}")
            check(split == "train" or source.weight == 1, f"data.{name}.weight: weights mix training data; eval sources are scored whole")
    if d.eval_fraction is not None:
        check(0 < d.eval_fraction < 1, f"data.eval_fraction: must be between 0 and 1, got {d.eval_fraction}")
        check(d.eval is None, "data.eval_fraction: give either data.eval or data.eval_fraction, not both")
    check(d.max_length >= 8, f"data.max_length: must be at least 8, got {d.max_length}")
    check(d.num_proc is None or d.num_proc >= 1, f"data.num_proc: must be >= 1, got {d.num_proc}")

    if lora is not None:
        check(lora.r >= 1, f"lora.r: must be >= 1, got {lora.r}")
        check(lora.alpha > 0, f"lora.alpha: must be > 0, got {lora.alpha}")
        check(0 <= lora.dropout < 1, f"lora.dropout: must be in [0, 1), got {lora.dropout}")
        check(lora.target_modules != [], "lora.target_modules: an empty list; name modules, or all-linear")

    check(bool(t.output_dir), "train.output_dir: required (where the run is written)")
    check(t.learning_rate > 0, f"train.learning_rate: must be > 0, got {t.learning_rate}")
    check(t.per_device_batch_size >= 1, f"train.per_device_batch_size: must be >= 1, got {t.per_device_batch_size}")
    check(t.gradient_accumulation_steps >= 1, f"train.gradient_accumulation_steps: must be >= 1, got {t.gradient_accumulation_steps}")
    check(t.num_epochs > 0, f"train.num_epochs: must be > 0, got {t.num_epochs}")
    check(t.max_steps is None or t.max_steps >= 1, f"train.max_steps: must be >= 1, got {t.max_steps}")
    check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    check(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    for key in ("adam_beta1", "adam_beta2"):
        check(0 <= getattr(t, key) < 1, f"train.{key}: must be in [0, 1), got {getattr(t, key)}")
    check(t.adam_epsilon >= 0, f"train.adam_epsilon: must be >= 0, got {t.adam_epsilon}")
    check(0 <= t.seed < 2**32, f"train.seed: must be in [0, 2^32), got {t.seed}")
    check(t.max_grad_norm is None or t.max_grad_norm > 0, f"train.max_grad_norm: must be > 0 or null, got {t.max_grad_norm}")
    check(
        t.max_tokens_per_batch is None or t.max_tokens_per_batch >= 16,
        f"train.max_tokens_per_batch: must be >= 16, got {t.max_tokens_per_batch}",
    )
    check(
        t.max_tokens_per_forward in (None, "auto") or t.max_tokens_per_forward >= 16,
        f"train.max_tokens_per_forward: must be >= 16, auto or null, got {t.max_tokens_per_forward}",
    )
    check(t.logging_steps >= 1, f"train.logging_steps: must be >= 1, got {t.logging_steps}")
    check(t.eval_steps is None or t.eval_steps >= 1, f"train.eval_steps: must be >= 1, got {t.eval_steps}")
    check(t.eval_batch_size is None or t.eval_batch_size >= 1, f"train.eval_batch_size: must be >= 1, got {t.eval_batch_size}")
    check(t.save_steps is None or t.save_steps >= 1, f"train.save_steps: must be >= 1, got {t.save_steps}")
    check(t.save_total_limit is None or t.save_total_limit >= 1, f"train.save_total_limit: must be >= 1, got {t.save_total_limit}")
    check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps: must be >= 1, got {t.max_nonfinite_steps}")
    check(
        t.center_rewards_coefficient is None or t.center_rewards_coefficient >= 0,
        f"train.center_rewards_coefficient: must be >= 0, got {t.center_rewards_coefficient}",
    )
    check(t.eval_steps is None or d.eval is not None or d.eval_fraction is not None,
          "train.eval_steps: set, but there is no eval set (add data.eval or data.eval_fraction)")
    check(t.keep_best is None or d.eval is not None or d.eval_fraction is not None,
          "train.keep_best: set, but there is no eval set to pick the best by (add data.eval or data.eval_fraction)")
    check(len(set(t.report_to)) == len(t.report_to), f"train.report_to: a tracker is named twice: {t.report_to}")
    check(t.ddp_timeout >= 1, f"train.ddp_timeout: must be >= 1 (seconds), got {t.ddp_timeout}")
    check(t.peak_tflops is None or t.peak_tflops > 0, f"train.peak_tflops: must be > 0, got {t.peak_tflops}")
    check(t.dataloader_workers is None or t.dataloader_workers >= 0, f"train.dataloader_workers: must be >= 0, got {t.dataloader_workers}")


# --------------------------------------------------------------------------------------------------
# Loading.


def apply_override(tree: dict[str, Any], override: str) -> str | None:
    """Apply `a.b.c=value` (value parsed as YAML) to `tree`; return a problem or None."""
    if "=" not in override:
        return f"override '{override}': expected key.sub=value"
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        return f"override '{override}': expected key.sub=value"
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            return f"override '{override}': {key} is not a mapping"
        node = child
    node[keys[-1]] = value
    return None


def parse_recipe(tree: Any, source: str = "<recipe>") -> Recipe:
    problems: list[str] = []
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise RecipeError(source, [f"expected a mapping of sections (model, data, lora, train), got {_describe(tree)}"])
    recipe = _build(Recipe, tree, "", problems)
    _validate(recipe, problems)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `key.sub=value` overrides, and check everything (raises RecipeError)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise RecipeError(source, ["no such file" if not path.exists() else "not a file"])
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        reason = getattr(error, "problem", None) or str(error)
        raise RecipeError(source, [f"YAML syntax error at {where}{reason}; check the indentation, colons and brackets there"]) from None
    except UnicodeDecodeError as error:
        raise RecipeError(source, [f"not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    if tree is None:
        tree = {}
    problems = [p for p in (apply_override(tree, o) for o in overrides or []) if p] if isinstance(tree, dict) else []
    if problems:
        raise RecipeError(source, problems)
    return parse_recipe(tree, source)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
