"""Model, tokenizer and LoRA set-up, reward read-out, and saving/loading reward-model folders."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtrain.config import LoraConfig, ModelConfig
from rmtrain.data import TokenFormat
from rmtrain.loss import last_token_index

# Written next to a saved model: how rmtrain turned text into ids, so eval/score reproduce it exactly.
FORMAT_FILE = "rmtrain_format.json"


class ModelError(ValueError):
    """A model, tokenizer or LoRA setting that cannot work, with the recipe key to fix."""


@dataclass
class RewardModel:
    model: nn.Module
    """The HF sequence-classification model (possibly a PEFT model)."""
    tokenizer: Any
    fmt: TokenFormat
    head: nn.Module
    """The module producing per-token scores (decoders) or the pooled logit (encoders)."""
    head_name: str


# --------------------------------------------------------------------------------------------------
# Only the embedding rows the training data uses go to the optimizer


class SeenRowsEmbedding(nn.Module):
    """An input embedding whose rows of `seen_ids` are one trainable parameter, read over a frozen copy of
    the whole table (which unseen tokens, such as new words in eval data, keep reading).

    With weight decay 0, full AdamW leaves a row exactly unchanged while it has never had a gradient (zero
    moments give a zero update), and a row whose token never occurs in the training data never has one. So
    training only the seen rows is the same training, while the optimizer step, the gradient clipping and the
    embedding backward touch a fraction of the table: tiny Qwen3's 151,936 x 128 embedding is 97% of its
    weights, and HH's training pairs use about a tenth of its rows.
    """

    def __init__(self, embedding: nn.Embedding, seen_ids: torch.Tensor):
        super().__init__()
        weight = embedding.weight.detach()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = embedding.padding_idx
        # Parameters, not buffers: DDP would broadcast buffers from rank 0 before every forward.
        self.frozen = nn.Parameter(weight, requires_grad=False)
        self.seen_weight = nn.Parameter(weight[seen_ids].clone())
        self.seen_ids = seen_ids
        self.row_of = torch.full((self.num_embeddings,), -1, dtype=torch.long)
        self.row_of[seen_ids] = torch.arange(len(seen_ids))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.row_of.device != input_ids.device:
            self.row_of = self.row_of.to(input_ids.device)
        rows = self.row_of[input_ids]
        seen = (rows >= 0).unsqueeze(-1)
        # Unseen tokens (eval data, padding) read the frozen table; no branch, so no host sync on a GPU.
        trained = nn.functional.embedding(rows.clamp(min=0), self.seen_weight)
        return torch.where(seen, trained, nn.functional.embedding(input_ids, self.frozen))

    def full_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding holding the trained rows, for saving."""
        weight = self.frozen.detach().clone()
        weight[self.seen_ids.to(weight.device)] = self.seen_weight.detach().to(weight.dtype)
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        embedding.weight = nn.Parameter(weight)
        return embedding


def train_seen_rows_only(model: nn.Module, token_ids: torch.Tensor, weight_decay: float) -> str | None:
    """Replace the input embedding by a `SeenRowsEmbedding` over `token_ids` (every id the training batches
    can hold). Returns the pre-flight note, or None when it does not apply (frozen or tied embedding, a
    subclass of nn.Embedding with its own forward, weight decay, or no row to spare)."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return None
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return None
    total = embedding.num_embeddings
    if weight_decay != 0:
        return f"embedding: all {total:,} rows optimized (train.weight_decay moves rows without gradients too)"
    seen_ids = torch.unique(token_ids)
    if embedding.padding_idx is not None:  # that row never gets a gradient
        seen_ids = seen_ids[seen_ids != embedding.padding_idx]
    if len(seen_ids) >= total:
        return None
    model.set_input_embeddings(SeenRowsEmbedding(embedding, seen_ids))
    return (
        f"embedding: {len(seen_ids):,} of {total:,} rows occur in the training data and are optimized; "
        "the others would get exactly zero updates (train.embedding_rows: all optimizes them anyway)"
    )


def seen_rows_count(model: nn.Module) -> int | None:
    """Rows `train_seen_rows_only` gave the optimizer, or None when all are trained (or none)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return len(embedding.seen_ids) if isinstance(embedding, SeenRowsEmbedding) else None


def restore_full_embedding(model: nn.Module) -> None:
    """Undo `train_seen_rows_only`: a plain nn.Embedding with the trained rows, so the model saves as usual."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, SeenRowsEmbedding):
        model.set_input_embeddings(embedding.full_embedding())


# --------------------------------------------------------------------------------------------------
# How many tokens one forward pass may hold


CPU_ACTIVATION_BUDGET = 2**29
"""Bytes of activations an automatic pass may keep on the CPU (RAM is shared with everything else).
On an accelerator the budget is an eighth of its memory. Half a GiB, from `make bench` on MiniLM (2 cores):
passes of 1024 / 2048 / 4096 / 8192 tokens trained at 5.56 / 5.95 / 5.5-5.7 / 5.63 pairs/s with peak RSS
1.51 / 2.02 / 2.7 / 2.98 GiB; small passes stay in cache, and since only the seen embedding rows are
trained an extra pass costs little."""


def activation_bytes_per_token(config, dtype_bytes: int, gradient_checkpointing: bool) -> int | None:
    """Rough bytes of activations a training forward keeps per token, or None if the config lacks the sizes.

    Per layer and token a transformer block keeps about 8 hidden-size vectors (norm inputs, q/k/v, attention
    output, residuals) and 4 intermediate-size vectors (the MLP's inputs and outputs) for the backward.
    With gradient checkpointing only each layer's input is kept, plus one layer recomputed at a time.
    Attention scores are not counted: SDPA and flash kernels do not keep them.
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
    if not hidden or not layers:
        return None
    intermediate = getattr(c, "intermediate_size", None) or 4 * hidden
    per_layer = 8 * hidden + 4 * intermediate
    vectors = layers * hidden + per_layer if gradient_checkpointing else layers * per_layer
    return dtype_bytes * vectors


def auto_tokens_per_forward(config, bf16: bool, gradient_checkpointing: bool, device: torch.device) -> tuple[int, str]:
    """`max_tokens_per_forward: auto`: the largest power of two whose estimated activations fit the budget
    (`CPU_ACTIVATION_BUDGET`, or an eighth of the accelerator's memory), and a note saying how it was chosen.

    A fixed token count would be the wrong unit: a token of MiniLM (6 layers, hidden 384) keeps about 13x the
    activations of a token of tiny Qwen3 (2 layers, hidden 128), and a 7B model's many times more.
    """
    budget = CPU_ACTIVATION_BUDGET
    if device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory // 8
    per_token = activation_bytes_per_token(config, 2 if bf16 else 4, gradient_checkpointing)
    if per_token is None:
        return 8192, "auto: the model config gives no hidden_size/num_hidden_layers, 8192"
    tokens = max(256, 2 ** int(math.log2(max(budget / per_token, 1))))
    note = f"auto: ~{per_token / 1024:.0f} KiB of activations per token, {budget / 2**30:.1f} GiB per pass"
    return tokens, note


def inference_tokens_per_forward(model: nn.Module, device: torch.device) -> int:
    """`auto` for eval and score: as training without gradient checkpointing (an inference forward keeps
    nothing, but a batch's activations still pass through memory at once), in the model's dtype."""
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    return auto_tokens_per_forward(model.config, bf16, False, device)[0]


# --------------------------------------------------------------------------------------------------
# Loading


def is_encoder_config(config) -> bool:
    """Bidirectional encoders (BERT, RoBERTa, DeBERTa, ...) pool their own token; decoders use the last one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _from_pretrained_kwargs(mc: ModelConfig) -> dict[str, Any]:
    kwargs = dict(mc.init_kwargs)
    if mc.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if mc.gguf_file:
        kwargs["gguf_file"] = mc.gguf_file
    return kwargs


def load_tokenizer(mc: ModelConfig, is_encoder: bool):
    from transformers import AutoTokenizer

    # A bad template file fails before the tokenizer is loaded.
    chat_template = read_chat_template(mc.chat_template_path) if mc.chat_template_path else None
    kwargs = {k: v for k, v in _from_pretrained_kwargs(mc).items() if k in ("revision", "trust_remote_code", "gguf_file")}
    tokenizer = AutoTokenizer.from_pretrained(mc.name_or_path, **kwargs)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if mc.eos_token:
        if mc.eos_token not in tokenizer.get_vocab():
            raise ModelError(f"model.eos_token: {mc.eos_token!r} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = mc.eos_token
    tokenizer.pad_token = choose_pad_token(tokenizer, mc.pad_token, is_encoder)
    tokenizer.padding_side = "right"
    return tokenizer


def read_chat_template(path: str) -> str:
    source = Path(path)
    if source.is_file():
        try:
            template = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ModelError(
                f"model.chat_template_path: {path} is not UTF-8 text, so neither a Jinja file nor a tokenizer folder"
            ) from None
        check_chat_template(template, path)
        return template
    if source.is_dir():
        from transformers import AutoTokenizer

        try:
            template = AutoTokenizer.from_pretrained(str(source)).chat_template
        except Exception:  # transformers raises many types here; what matters is that it found no tokenizer
            raise ModelError(
                f"model.chat_template_path: {path} is a folder but holds no tokenizer transformers can load; "
                "give a Jinja chat template file or a tokenizer folder"
            ) from None
        if not template:
            raise ModelError(
                f"model.chat_template_path: the tokenizer in {path} has no chat template; give one that has, or a Jinja file"
            )
        return template
    raise ModelError(f"model.chat_template_path: {path}: no such file or folder (expected a Jinja file or a tokenizer folder)")


def check_chat_template(template: str, path: str) -> None:
    """A Jinja file that compiles the way apply_chat_template compiles it, and renders `messages`."""
    import jinja2
    import jinja2.meta

    try:
        try:
            # The environment apply_chat_template uses (its extensions, e.g. {% generation %}, parse).
            from transformers.utils.chat_template_utils import _compile_jinja_template

            environment = _compile_jinja_template(template).environment
        except ImportError:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        variables = jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError as error:
        raise ModelError(
            f"model.chat_template_path: {path}: line {error.lineno}: not a valid Jinja template ({error.message}); "
            "fix the template, or give a tokenizer folder whose chat template to use"
        ) from None
    if "messages" not in variables:
        raise ModelError(
            f"model.chat_template_path: {path} is not a chat template (it never reads 'messages'); "
            "give a Jinja chat template file or a tokenizer folder"
        )


def choose_pad_token(tokenizer, requested: str | None, is_encoder: bool) -> str:
    """A pad token that never stands for a real token of a decoder's input.

    transformers' decoder heads read the reward at the rightmost token that is not `pad_token_id`; with
    pad == eos (SmolLM2, Llama) the appended EOS would be skipped once the folder is reloaded. rmtrain
    itself reads the last real token from the attention mask, but the saved folder must agree with it.
    """
    vocab = tokenizer.get_vocab()
    if requested is not None:
        if requested not in vocab:
            raise ModelError(f"model.pad_token: {requested!r} is not in the tokenizer's vocabulary")
        if not is_encoder and requested in (tokenizer.eos_token, tokenizer.bos_token):
            raise ModelError(
                f"model.pad_token: {requested!r} is also the EOS/BOS token; pick a token the data never uses "
                "so that plain transformers reads the reward at the same token as rmtrain"
            )
        return requested
    current = tokenizer.pad_token
    if is_encoder:
        if current is None:
            raise ModelError("model.pad_token: the tokenizer has no pad token; set one from its vocabulary")
        return current
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    if current is not None and current not in taken:
        return current
    template = tokenizer.chat_template or ""
    preferred = ["<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<unk>"]
    specials = [t for t in preferred if t in vocab] + sorted(
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if str(t) not in preferred
    )
    for token in specials:
        if token not in taken and token not in template:
            return token
    raise ModelError(
        "model.pad_token: the tokenizer's pad token is its EOS/BOS token and no spare special token was found; "
        "set model.pad_token to a token your data never uses"
    )


def clear_gguf_quantization(model: nn.Module) -> None:
    """GGUF checkpoints are dequantized to float on load, yet transformers still flags the model as
    quantized, which blocks training and `save_pretrained`. The weights are plain floats: drop the flags."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def find_head_name(model: nn.Module, is_encoder: bool) -> str:
    for name in (("classifier", "score") if is_encoder else ("score", "classifier")):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ModelError(f"{type(model).__name__}: no reward head named 'score' or 'classifier' found")


def load_reward_model(
    mc: ModelConfig,
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
) -> RewardModel:
    """Base model with a one-logit head (+ LoRA), its tokenizer, and the text format it is trained on."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = _from_pretrained_kwargs(mc)
    local = Path(mc.name_or_path).expanduser()
    looks_local = mc.name_or_path.startswith((".", "/", "~")) or mc.name_or_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise ModelError(f"model.name_or_path: {mc.name_or_path}: no such folder; give a local model folder or a Hub id")
    if mc.gguf_file:
        check_gguf_file(mc.gguf_file, local if local.is_dir() else None)
    config_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code", "gguf_file")}
    try:
        config = AutoConfig.from_pretrained(mc.name_or_path, **config_kwargs)
    except (OSError, ValueError) as error:
        if local.is_dir():
            raise ModelError(f"model.name_or_path: cannot load {mc.name_or_path!r}: {_first_line(error)}") from None
        raise ModelError(
            f"model.name_or_path: {mc.name_or_path!r} is not a local folder and cannot be fetched from the Hub "
            f"({_hub_problem(error)}); give a local model folder, or fix the Hub id and make the Hub reachable"
        ) from None
    is_encoder = is_encoder_config(config)
    tokenizer = load_tokenizer(mc, is_encoder)

    model = AutoModelForSequenceClassification.from_pretrained(mc.name_or_path, num_labels=1, **kwargs)
    clear_gguf_quantization(model)
    model.config.pad_token_id = tokenizer.pad_token_id
    if mc.eos_token:
        model.config.eos_token_id = tokenizer.eos_token_id
    if mc.disable_dropout:
        disable_dropout(model)
    head_name = find_head_name(model, is_encoder)

    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if lora is not None:
        model = apply_lora(model, lora, head_name, gradient_checkpointing)
        if mc.disable_dropout:
            disable_dropout(model)

    fmt = TokenFormat(
        append_eos=None if is_encoder or tokenizer.eos_token is None else tokenizer.eos_token,
        pad_token_id=tokenizer.pad_token_id,
        is_encoder=is_encoder,
    )
    return RewardModel(model, tokenizer, fmt, head_module(model, head_name), head_name)


def check_gguf_file(gguf_file: str, folder: Path | None) -> None:
    # transformers needs the gguf package to read the file; without it the load fails deep inside transformers.
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(
            f"model.gguf_file: reading {gguf_file} needs the 'gguf' package, which is not installed; "
            "pip install gguf (or install rmtrain[models]), or give a safetensors model folder instead"
        )
    if folder is not None and not (folder / gguf_file).is_file():
        present = sorted(p.name for p in folder.glob("*.gguf"))
        raise ModelError(
            f"model.gguf_file: {gguf_file} is not in {folder} "
            f"(.gguf files there: {', '.join(present) if present else 'none'})"
        )


def _hub_problem(error: BaseException) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline: HF_HUB_OFFLINE is set and it is not in the local cache"
    return _first_line(error)


def apply_lora(model: nn.Module, lora: LoraConfig, head_name: str, gradient_checkpointing: bool) -> nn.Module:
    import peft

    if lora.init_from:
        model = peft.PeftModel.from_pretrained(model, lora.init_from, is_trainable=True)
    else:
        modules_to_save = lora.modules_to_save if lora.modules_to_save is not None else [head_name]
        names = {name.split(".")[-1] for name, _ in model.named_modules() if name}
        for key, wanted in (("modules_to_save", modules_to_save), ("target_modules", lora.target_modules)):
            if wanted == "all-linear":
                continue
            missing = [w for w in ([wanted] if isinstance(wanted, str) else wanted) if w not in names]
            if missing:
                raise ModelError(
                    f"lora.{key}: {', '.join(missing)} names no module of {type(model).__name__} "
                    f"(some module names: {', '.join(sorted(n for n in names if not n.isdigit())[:12])})"
                )
        config = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            modules_to_save=modules_to_save,
        )
        model = peft.get_peft_model(model, config)
    if gradient_checkpointing:
        # With frozen embeddings the checkpointed blocks' inputs need grads or nothing flows back.
        model.enable_input_require_grads()
    return model


def head_module(model: nn.Module, head_name: str) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, head_name)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# --------------------------------------------------------------------------------------------------
# Reading rewards


def sequence_rewards(
    model: nn.Module,
    head: nn.Module,
    is_encoder: bool,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    reward_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """One reward per sequence.

    Encoders: the model's own pooled logit ([CLS]), exactly as transformers computes it.
    Decoders: the head's per-token score at each sequence's reward token: `reward_index` into the
    flattened [rows * width] scores (see rmtrain.batching), or else the last real token of each row
    found from the 2D attention mask. Never found by searching for the pad id (pad == eos breaks that).
    The forward still goes through `model` so DDP/FSDP wrappers see it; a hook captures the head's
    per-token output.
    """
    if is_encoder:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        handle.remove()
    token_scores = captured[-1][..., 0]  # [rows, width]
    if reward_index is None:
        last = last_token_index(attention_mask)
        return token_scores[torch.arange(token_scores.shape[0], device=token_scores.device), last]
    return token_scores.reshape(-1)[reward_index]


def batch_rewards(model: nn.Module, rm: "RewardModel", batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards in float32 for a batch built by rmtrain.batching."""
    rewards = sequence_rewards(
        model,
        rm.head,
        rm.fmt.is_encoder,
        batch["input_ids"],
        batch.get("attention_mask"),
        batch.get("position_ids"),
        batch.get("reward_index"),
    )
    chosen, rejected = rewards.float().chunk(2)
    return chosen, rejected


# --------------------------------------------------------------------------------------------------
# Saving and loading folders


def save_format(directory: str | Path, fmt: TokenFormat, max_length: int) -> None:
    payload = fmt.to_dict() | {"max_length": max_length}
    Path(directory, FORMAT_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def load_saved(path: str | Path, dtype: torch.dtype | None = None) -> tuple[RewardModel, int | None]:
    """A model folder (full or LoRA adapter) written by rmtrain or plain transformers, ready to score.

    Returns the model and the max_length it was trained with (None if unknown).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: no such model folder")
    saved_format = json.loads((path / FORMAT_FILE).read_text()) if (path / FORMAT_FILE).is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if (path / "adapter_config.json").is_file():
        model = _load_adapter(path, dtype)
        config = model.get_base_model().config
    elif (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
    else:
        raise ModelError(f"{path}: neither a model folder (config.json) nor a LoRA adapter (adapter_config.json)")
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
    return RewardModel(model, tokenizer, fmt, head_module(model, head_name), head_name), saved_format.get("max_length")


def _load_adapter(path: Path, dtype: torch.dtype | None) -> nn.Module:
    """Rebuild the base exactly as the run loaded it (recipe.yaml of the run, e.g. a gguf file), then the adapter."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from rmtrain.config import load_recipe

    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file():
        mc = load_recipe(recipe_file).model
        base = AutoModelForSequenceClassification.from_pretrained(
            mc.name_or_path, num_labels=1, **_from_pretrained_kwargs(mc) | ({"dtype": dtype} if dtype else {})
        )
        clear_gguf_quantization(base)
    else:
        adapter = json.loads((path / "adapter_config.json").read_text())
        base = AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"], num_labels=1, dtype=dtype)
    from transformers import AutoTokenizer

    base.config.pad_token_id = AutoTokenizer.from_pretrained(str(path)).pad_token_id
    return peft.PeftModel.from_pretrained(base, str(path))


def save_model_folder(
    model: nn.Module, state_dict: dict | None, tokenizer, fmt: TokenFormat, max_length: int, directory: str | Path
) -> None:
    """Write the model (or adapter + head), tokenizer and text format into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    save_format(directory, fmt, max_length)


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain transformers model with LoRA weights folded in (the input is left untouched)."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
