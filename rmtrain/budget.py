"""How many tokens one forward pass may hold (`max_tokens_per_forward: auto`), from the model's size."""

from __future__ import annotations

import math

import torch
from torch import nn


CPU_ACTIVATION_BUDGET = 2**29
"""Bytes of activations an automatic pass may keep on the CPU, where RAM is shared with everything else
(on an accelerator: `accelerator_activation_budget`). Half a GiB was the fastest of the budgets measured, because
small passes stay in cache (docs/benchmarks.md)."""


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


def accelerator_activation_budget(total_bytes: int, held_bytes: int) -> int:
    """Bytes of activations a pass may keep on an accelerator with `total_bytes`, of which the weights, gradients
    and optimizer state hold `held_bytes`: a quarter of what is left, leaving room for the estimate's error, the
    allocator's fragmentation and the kernels' workspace. At least a sixty-fourth of the memory, so that a model
    filling its device still runs (in small passes) rather than being refused here."""
    return max((total_bytes - held_bytes) // 4, total_bytes // 64)


def held_bytes(model: nn.Module, shards: int = 1) -> int:
    """What training keeps per device besides activations: trainable parameters in fp32 with their gradient and
    AdamW's two moments (16 bytes each), frozen ones at their own size; divided over `shards` (FSDP, ZeRO-3)."""
    total = sum(16 * p.numel() if p.requires_grad else p.numel() * p.element_size() for p in model.parameters())
    return total // max(shards, 1)


def auto_tokens_per_forward(config, bf16: bool, gradient_checkpointing: bool, device: torch.device, held: int = 0) -> tuple[int, str]:
    """`max_tokens_per_forward: auto`: the largest power of two whose estimated activations fit the budget
    (`CPU_ACTIVATION_BUDGET`, or on an accelerator a share of the memory the training state, `held` bytes, leaves),
    and a note saying how it was chosen.

    A fixed token count would be the wrong unit: what a token keeps grows with the model's width and depth.
    """
    budget = CPU_ACTIVATION_BUDGET
    if device.type == "cuda":
        budget = accelerator_activation_budget(torch.cuda.get_device_properties(device).total_memory, held)
    per_token = activation_bytes_per_token(config, 2 if bf16 else 4, gradient_checkpointing)
    if per_token is None:
        return 8192, "auto: the model config gives no hidden_size/num_hidden_layers, 8192"
    tokens = max(256, 2 ** int(math.log2(max(budget / per_token, 1))))
    note = f"auto: ~{per_token / 1024:.0f} KiB of activations per token, {budget / 2**30:.1f} GiB per pass"
    return tokens, note


INFERENCE_MIN_TOKENS = 2048
"""The least `auto` gives inference: a prompt with its completions (a pair, a list, a served group) must fit one
pass, or the prompt is computed again for every chunk of its completions."""


def inference_tokens_per_forward(model: nn.Module, device: torch.device) -> int:
    """`auto` for eval, score and serve: as training without gradient checkpointing, in the model's dtype, and at
    least `INFERENCE_MIN_TOKENS`. Training's estimate counts every layer's activations, which an inference forward
    never holds at once (it keeps one layer's), so it can take the floor without leaving the memory budget."""
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return max(INFERENCE_MIN_TOKENS, auto_tokens_per_forward(model.config, bf16, False, device, weights)[0])
