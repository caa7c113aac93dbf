"""Model FLOPs of reward-model training, for model FLOPs utilization (MFU).

MFU is the FLOP/s a run achieves on the computation the model needs, divided by the device's peak: the FLOPs are
those of the model's definition, not of what a kernel happens to do (PaLM, Chowdhery et al. 2022, appendix B).
So padding and masked-out attention blocks count for nothing, and gradient checkpointing's recomputed forward is
not counted either: it is a cost of the run, which MFU is meant to show, not work the model needs.

Training FLOPs are counted as forward x 3 (the backward computes gradients of activations and of weights, each
as costly as the forward), with two parts per forward:

- the dense matmuls, per token: 2 x (weights of the attention projections and of the MLP, in every layer, plus the
  one-logit score head), since a token multiplies every weight once (a multiply and an add). The input embedding
  is a lookup, not a matmul; norms, activations and rotary embeddings are elementwise and left out;
- attention, per query-key pair a layout computes: QK^T and AV, 2 x head_dim FLOPs each, in every head and layer.
  Which pairs a row needs depends on its layout (`attention_pairs`): a plain sequence is causal over itself; in
  rmtrain's shared-prefix row `prompt + c_1 + ... + c_K` the prompt is computed once, each completion against the
  prompt and itself.

Pure functions of a transformers config (or anything with its attributes); nothing heavy is imported.
"""

from __future__ import annotations

import math
import re

# Encoders whose MLP is two matrices (up, down); every other model is taken as gated (gate, up, down: SwiGLU
# in Llama, Qwen, Mistral, SmolLM; GeGLU in Gemma).
UNGATED_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "deberta", "deberta-v2", "albert"}
)


def _text(config):
    """The language model's part of a config (multimodal configs hold it in a sub-config)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _sizes(config) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, layers, heads, kv heads, head_dim) of a config."""
    c = _text(config)
    hidden, heads = c.hidden_size, c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    return hidden, c.intermediate_size, c.num_hidden_layers, heads, kv_heads, head_dim


def is_gated(config) -> bool:
    """Whether the MLP has a gate matrix (three matrices) or not (two, BERT-like encoders)."""
    return getattr(_text(config), "model_type", None) not in UNGATED_MODEL_TYPES


def matmul_flops_per_token(config) -> int:
    """Forward FLOPs of one token through the dense matmuls: 2 x the weights it multiplies.

    Per layer: q and o (heads x head_dim wide), k and v (kv heads x head_dim wide: grouped-query attention shares
    them), and the MLP (3 matrices when gated, else 2); then the one-logit score head. Biases, norms and the
    embedding lookup are left out (a few FLOPs per token against millions).
    """
    hidden, intermediate, layers, heads, kv_heads, head_dim = _sizes(config)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    mlp = (3 if is_gated(config) else 2) * hidden * intermediate
    return 2 * (layers * (attention + mlp) + hidden)  # + the score head: hidden -> 1


def attention_flops_per_pair(config) -> int:
    """Forward FLOPs of one query-key pair over all heads and layers: q.k (2 x head_dim) and its weight times v
    (2 x head_dim). Every query head counts; grouped-query attention shares keys, not products."""
    _, _, layers, heads, _, head_dim = _sizes(config)
    return 4 * head_dim * heads * layers


def attention_pairs(prefix_len: int, completion_lens: list[int]) -> int:
    """Query-key pairs of a shared-prefix row as rmtrain computes it: the prefix causally over itself, once
    (P(P+1)/2), then each completion of length C against the whole prefix and causally over itself
    (C*P + C(C+1)/2). A plain sequence of length L is `attention_pairs(0, [L])` = L(L+1)/2. (Causal decoders: a
    bidirectional encoder's sequence needs L*L pairs.)"""
    p = prefix_len
    return p * (p + 1) // 2 + sum(c * p + c * (c + 1) // 2 for c in completion_lens)


def reward_model_training_flops(config, is_encoder: bool, tokens: int, causal_pairs: int) -> int:
    """`training_flops` of a run whose batches hold `tokens` tokens and `causal_pairs` query-key pairs counted causally
    (rmtrain.batching.model_work); a bidirectional encoder's sequences (plain rows) need every pair: sum L^2 =
    2 x sum L(L+1)/2 - sum L."""
    return training_flops(tokens, 2 * causal_pairs - tokens if is_encoder else causal_pairs, config)


def training_flops(tokens: int, pairs: int, config) -> int:
    """FLOPs of training on `tokens` tokens whose layout computes `pairs` query-key pairs: forward + backward
    = 3 x forward. Gradient checkpointing's recomputation is not counted (MFU, not hardware FLOPs)."""
    return 3 * (tokens * matmul_flops_per_token(config) + pairs * attention_flops_per_pair(config))


# Dense bf16 tensor-core peaks in TFLOP/s, per GPU as torch sees it. Sources: NVIDIA's datasheets and product pages
# (A10, A100, L4, L40, L40S, H100 SXM / PCIe / NVL, H200 SXM / NVL, GH200, HGX B200, GB200 NVL72), which print the
# 2:4-sparsity figure with a footnote: the dense peak is half of it (H100 SXM "1,979 teraFLOPS*" -> 989); AMD's
# Instinct MI300X and MI325X specification pages (1,307.4 dense, 2,614.9 with sparsity). Keys are matched in this
# order, as whole words of `torch.cuda.get_device_name()`, case-insensitive: "NVIDIA H100 80GB HBM3" is the SXM
# part, "NVIDIA H100 PCIe" the PCIe card; "A10" matches neither "A100" nor "A10G", nor "B200" "GB200".
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM5
    "H200 NVL": 835.0,
    "H200": 989.0,  # SXM
    "GH200": 989.0,
    "GB200": 2500.0,
    "B200": 2250.0,  # HGX B200
    "A100": 312.0,  # SXM and PCIe alike
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "MI325X": 1307.0,
    "MI300X": 1307.0,
}


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of a device: `override_tflops` (TFLOP/s) when given, else the first `PEAK_BF16_TFLOPS` key found
    as a whole word in `device_name`; None for a device not in the table (a CPU, an unlisted GPU)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name or "", re.IGNORECASE):
            return tflops * 1e12
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Achieved FLOP/s as a fraction of `peak` FLOP/s; None without a peak or a positive, finite time."""
    if peak is None or peak <= 0 or not seconds or seconds <= 0 or not math.isfinite(seconds):
        return None
    return flops / seconds / peak
