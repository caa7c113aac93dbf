"""The reward model: loading it with a one-logit head (and LoRA), and reading rewards from its forward."""

from __future__ import annotations

import contextlib
import importlib.util
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmtrain.attention import KEYWORD, attention_is_segmented, last_layer_at, prefix_mask
from rmtrain.config import LoraConfig, ModelConfig
from rmtrain.errors import ModelError, first_line
from rmtrain.loss import last_token_index
from rmtrain.tokenizer import TokenFormat, load_tokenizer

@dataclass
class RewardModel:
    model: nn.Module
    """The HF sequence-classification model (possibly a PEFT model)."""
    tokenizer: Any
    fmt: TokenFormat
    head: nn.Module
    """The module producing per-token scores (decoders) or the pooled logit (encoders)."""
    head_name: str
    weights_dtype: torch.dtype = torch.float32
    """The dtype the weights were loaded in, and the one saved folders are written in."""
    autocast_dtype: torch.dtype | None = None
    """Inference of a folder stored in bf16/fp16: the forward runs under autocast in that dtype (fit's eval computed
    so); None: no autocast of its own (training: the Accelerator's mixed precision decides)."""

    members: list["Member"] = field(default_factory=list)
    """A member ensemble's models (rmtrain.ensemble), whose rewards are its columns; empty: `model` is the one model."""

    @property
    def heads(self) -> int:
        """Rewards per sequence: the heads on the trunk (`model.heads`), or every member's heads."""
        return sum(heads_of(m.model) for m in self.members) if self.members else heads_of(self.model)


def heads_of(model: nn.Module) -> int:
    """The reward heads of a transformers model (its `num_labels`); 1 for a model without a config."""
    return int(getattr(getattr(model, "config", None), "num_labels", 1) or 1)


@dataclass
class Member:
    """One model of a member ensemble: what its forward goes through, its head, and the PEFT adapter to switch to
    first when members are adapters on one base (that PeftModel is then every member's `model`)."""

    model: nn.Module
    head: nn.Module
    adapter: str | None = None


class Members(nn.Module):
    """A member ensemble's models in one module, so that moving it, `eval()` and `accelerator.prepare` take them all;
    `config` is the first member's (sizes for the token budget)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.config = models[0].config


# --------------------------------------------------------------------------------------------------
# Loading


def is_encoder_config(config) -> bool:
    """Bidirectional encoders (BERT, RoBERTa, DeBERTa, ...) pool their own token; decoders use the last one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


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


def load_text_side(mc: ModelConfig, max_length: int | None = None) -> tuple[Any, TokenFormat]:
    """The tokenizer and the token format a recipe's model reads text with (loaded before the weights, so that data is
    tokenized, and its mistakes reported, before the model takes its time to load); `max_length` (data.max_length)
    is checked against the positions the model has."""
    from transformers import AutoConfig

    local = Path(mc.name_or_path).expanduser()
    looks_local = mc.name_or_path.startswith((".", "/", "~")) or mc.name_or_path.count("/") > 1
    if looks_local and not local.is_dir():
        raise ModelError(f"model.name_or_path: {mc.name_or_path}: no such folder; give a local model folder or a Hub id")
    if mc.gguf_file:
        check_gguf_file(mc.gguf_file, local if local.is_dir() else None)
    try:
        config = AutoConfig.from_pretrained(mc.name_or_path, **mc.source_kwargs())
    except (OSError, ValueError) as error:
        if local.is_dir():
            raise ModelError(f"model.name_or_path: cannot load {mc.name_or_path!r}: {first_line(error)}") from None
        raise ModelError(
            f"model.name_or_path: {mc.name_or_path!r} is not a local folder and cannot be fetched from the Hub "
            f"({_hub_problem(error)}); give a local model folder, or fix the Hub id and make the Hub reachable"
        ) from None
    is_encoder = is_encoder_config(config)
    positions = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "max_position_embeddings", None)
    if max_length is not None and positions and max_length > positions:
        raise ModelError(
            f"data.max_length: {max_length} is longer than the {positions} positions {mc.name_or_path} has "
            f"(max_position_embeddings); set data.max_length: {positions} or lower"
        )
    tokenizer = load_tokenizer(mc, is_encoder)
    fmt = TokenFormat(
        append_eos=None if is_encoder or tokenizer.eos_token is None else tokenizer.eos_token,
        pad_token_id=tokenizer.pad_token_id,
        is_encoder=is_encoder,
    )
    return tokenizer, fmt


def load_reward_model(
    mc: ModelConfig,
    lora: LoraConfig | None = None,
    gradient_checkpointing: bool = False,
    text: tuple[Any, TokenFormat] | None = None,
) -> RewardModel:
    """Base model with a one-logit head (+ LoRA), its tokenizer, and the text format it is trained on (`text`: the
    tokenizer side, when `load_text_side` loaded it already)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer, fmt = text or load_text_side(mc)
    is_encoder = fmt.is_encoder
    kwargs = mc.from_pretrained_kwargs()
    if lora is not None and lora.init_from:
        check_adapter_folder(lora.init_from)
    model = AutoModelForSequenceClassification.from_pretrained(mc.name_or_path, **kwargs, **head_kwargs(mc.heads))
    clear_gguf_quantization(model)
    weights_dtype = model.dtype
    if lora is None and weights_dtype != torch.float32:
        # fp32 master weights: AdamW adding lr-sized updates to bf16 weights rounds most of them away (bf16 keeps
        # 8 bits of mantissa; at lr 1e-5 an update is ~1e-5 of the weight). Autocast (train.bf16) still computes in
        # bf16; the saved folder is written in the loaded dtype. LoRA trains fp32 adapters over the frozen base.
        model.float()
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

    head = head_module(model, head_name)
    run_in_fp32(head)
    return RewardModel(model, tokenizer, fmt, head, head_name, weights_dtype)


def head_kwargs(heads: int) -> dict[str, Any]:
    """`from_pretrained` keywords for a model with `heads` outputs. K > 1 heads start fresh (each row of the head its
    own random init): a checkpoint's own one-logit head has another shape, and is not loaded."""
    if heads == 1:
        return {"num_labels": 1}
    return {"id2label": {i: f"HEAD_{i}" for i in range(heads)}, "ignore_mismatched_sizes": True}


def run_in_fp32(head: nn.Module) -> None:
    """The score head holds fp32 weights and computes in fp32 even under bf16 autocast or over bf16 weights (as
    OpenRLHF's compute_fp32_loss and NeMo's force_head_dtype): its input is upcast and autocast is off inside it,
    so reward differences smaller than bf16's resolution (about 1% of the reward) are not rounded away. In fp32
    this changes nothing."""
    head.float()
    head.forward = types.MethodType(_fp32_forward, head)  # bound: a deepcopy of the model binds its own head


def _fp32_forward(self: nn.Module, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    with torch.autocast(hidden.device.type, enabled=False):
        return type(self).forward(self, hidden.float(), *args, **kwargs)


def check_adapter_folder(init_from: str) -> Path:
    folder = Path(init_from).expanduser()
    if not (folder / "adapter_config.json").is_file():
        what = "no such folder" if not folder.exists() else "not a PEFT adapter folder (no adapter_config.json)"
        raise ModelError(
            f"lora.init_from: {init_from}: {what}; give the folder of a LoRA run (or of its adapter), "
            "or remove lora.init_from to start a new adapter"
        )
    return folder


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
    return first_line(error)


def apply_lora(model: nn.Module, lora: LoraConfig, head_name: str, gradient_checkpointing: bool) -> nn.Module:
    import peft

    if lora.init_from:
        try:
            model = peft.PeftModel.from_pretrained(model, str(check_adapter_folder(lora.init_from)), is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as error:
            raise ModelError(f"lora.init_from: {lora.init_from}: cannot load onto {type(model).__name__}: {first_line(error)}") from None
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
    segments: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The rewards of each sequence, [sequences, heads] (one column per reward head).

    Encoders: the model's own pooled logits ([CLS]), exactly as transformers computes them.
    Decoders: the head's per-token score at each sequence's reward token: `reward_index` into the
    flattened [rows * width] scores (see rmtrain.batching), or else the last real token of each row
    found from the 2D attention mask. Never found by searching for the pad id (pad == eos breaks that).
    `segments`: a shared-prefix batch for rmtrain.attention (then there is no attention mask).
    The forward still goes through `model` so DDP/FSDP wrappers see it; a hook captures the head's
    per-token output.
    """
    if is_encoder:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        extra = {} if segments is None else {KEYWORD: segments}
        if segments is not None:
            if not attention_is_segmented(model):
                # Its attention would ignore the segments and attend across the whole row: wrong, and silently.
                raise RuntimeError("a shared-prefix batch without a mask for a model not switched to segment attention")
            # A 4D "mask" goes to the attention as it is: transformers builds none (its packed-sequence mask over
            # the whole row would be rows x rows), and segment attention reads the segments instead.
            attention_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
        # Scoring (no gradients): the last layer's per-token work is done at the reward tokens only.
        at_rewards = reward_index is not None and not torch.is_grad_enabled()
        with last_layer_at(model, reward_index) if at_rewards else contextlib.nullcontext():
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra)
    finally:
        handle.remove()
    token_scores = captured[-1]  # [rows, width, heads]
    if reward_index is None:
        last = last_token_index(attention_mask)
        return token_scores[torch.arange(token_scores.shape[0], device=token_scores.device), last]
    return token_scores.reshape(-1, token_scores.shape[-1])[reward_index]


def batch_rewards(model: nn.Module, rm: "RewardModel", batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards in float32 of every sequence of a batch built by rmtrain.batching, group by group: [sequences, heads]."""
    device = batch["input_ids"].device.type
    mask = prefix_mask(batch["segment_ids"], batch["mask_kind"]) if "segment_ids" in batch else batch.get("attention_mask")
    inputs = (batch["input_ids"], mask, batch.get("position_ids"), batch.get("reward_index"), batch.get("segments"))
    with torch.autocast(device, rm.autocast_dtype) if rm.autocast_dtype else contextlib.nullcontext():
        if not rm.members:
            return sequence_rewards(model, rm.head, rm.fmt.is_encoder, *inputs).float()
        columns = []
        for member in rm.members:  # one forward each, through the members' own modules (inference: no wrapper to see it)
            if member.adapter is not None:
                member.model.set_adapter(member.adapter)
            columns.append(sequence_rewards(member.model, member.head, rm.fmt.is_encoder, *inputs).float())
        return torch.cat(columns, 1)
