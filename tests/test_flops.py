"""rmtrain.flops against numbers computed by hand, brute-force pair counts, the model's own weights and torch's
FLOP counter."""

import math

import pytest
import torch

from rmtrain.flops import (
    PEAK_BF16_TFLOPS,
    attention_flops_per_pair,
    attention_pairs,
    matmul_flops_per_token,
    mfu,
    peak_flops,
    training_flops,
)


def tiny_qwen3_config(attn: str = "sdpa"):
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_labels=1, pad_token_id=0)
    config._attn_implementation = attn
    return config


def tiny_qwen3(attn: str = "sdpa"):
    from transformers import Qwen3ForSequenceClassification

    torch.manual_seed(0)
    return Qwen3ForSequenceClassification(tiny_qwen3_config(attn))


def test_tiny_qwen3_by_hand():
    # hidden 128, 4 query heads and 2 kv heads of 32, MLP 256 (gated: gate, up, down), 2 layers, one-logit head.
    q, k, v, o = 128 * 4 * 32, 128 * 2 * 32, 128 * 2 * 32, 4 * 32 * 128  # 16384, 8192, 8192, 16384
    mlp = 3 * 128 * 256  # 98304
    per_layer = q + k + v + o + mlp  # 147456
    assert matmul_flops_per_token(tiny_qwen3_config()) == 2 * (2 * per_layer + 128) == 590080
    # q.k and (weights).v: 2 x 32 FLOPs each, 4 heads, 2 layers.
    assert attention_flops_per_pair(tiny_qwen3_config()) == 4 * 32 * 4 * 2 == 1024
    assert training_flops(10, 55, tiny_qwen3_config()) == 3 * (10 * 590080 + 55 * 1024)


def test_head_dim_from_hidden_and_bert_like_mlp():
    from transformers import BertConfig

    # No head_dim, no kv heads, an ungated MLP: q, k, v, o all hidden x hidden, then up and down.
    bert = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
    assert matmul_flops_per_token(bert) == 2 * (6 * (4 * 384 * 384 + 2 * 384 * 1536) + 384)
    assert attention_flops_per_pair(bert) == 4 * 32 * 12 * 6


def allowed_pairs_brute_force(prefix_len: int, completion_lens: list[int]) -> int:
    """Count (query, key) positions of a row `prefix + c_1 + ... + c_K` where the query may see the key: causal,
    and a completion's token sees the prefix and its own completion only."""
    owner = [-1] * prefix_len + [i for i, c in enumerate(completion_lens) for _ in range(c)]  # -1: the prefix
    return sum(
        1
        for q in range(len(owner))
        for k in range(q + 1)
        if owner[k] == -1 or owner[k] == owner[q]
    )


@pytest.mark.parametrize("prefix_len, completion_lens", [(0, [1]), (0, [9]), (5, [3, 4]), (4, [1, 6, 2]), (1, [1, 1]), (7, [2, 2, 2, 5])])
def test_attention_pairs_brute_force(prefix_len, completion_lens):
    assert attention_pairs(prefix_len, completion_lens) == allowed_pairs_brute_force(prefix_len, completion_lens)


def test_attention_pairs_plain_sequence():
    assert [attention_pairs(0, [n]) for n in (1, 2, 3, 10)] == [1, 3, 6, 55]


def test_matmul_flops_are_twice_the_linear_weights():
    """Per token, 2 x the weights of every Linear module of the layers plus the score head (no embedding)."""
    model = tiny_qwen3()
    linear = {name + ".weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = sum(p.numel() for n, p in model.named_parameters() if n in linear)
    assert any(n.startswith("score") for n in linear) and not any("embed" in n for n in linear)
    assert matmul_flops_per_token(model.config) == 2 * weights
    tokens = 37
    assert tokens * matmul_flops_per_token(model.config) == 2 * weights * tokens


def counted(model, tokens: int, backward: bool = False, math_sdpa: bool = False) -> dict[str, int]:
    """torch's FLOP counter on one sequence of `tokens` tokens: {"matmul": mm + addmm, "attention": the rest}."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(1, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH) if math_sdpa else nullcontext(), counter:
        if backward:
            model(input_ids=ids).logits.sum().backward()
        else:
            with torch.no_grad():
                model(input_ids=ids)
    ops = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    matmul = ops.pop("mm", 0) + ops.pop("addmm", 0)
    assert counter.get_total_flops() == matmul + sum(ops.values())
    return {"matmul": matmul, "attention": sum(ops.values())}


L = 13


def test_flop_counter_eager_forward():
    """Eager attention multiplies the full L x L score matrix and masks it afterwards: the counter sees L*L pairs
    (our MFU count, L(L+1)/2, is what causal attention needs)."""
    config = tiny_qwen3_config()
    got = counted(tiny_qwen3("eager"), L)
    assert got["matmul"] == L * matmul_flops_per_token(config)
    assert got["attention"] == L * L * attention_flops_per_pair(config)
    assert attention_pairs(0, [L]) == L * (L + 1) // 2


def test_flop_counter_sdpa_forward():
    """SDPA: the counter's formula for its CUDA kernels counts a causal call as the full L x L square too (math
    backend here, which decomposes into the same products). The CPU's fused SDPA kernel is not in the counter's
    registry, so by default on CPU it counts no attention at all: only the matmuls match then."""
    config = tiny_qwen3_config()
    model = tiny_qwen3("sdpa")
    math_backend = counted(model, L, math_sdpa=True)
    assert math_backend == {"matmul": L * matmul_flops_per_token(config), "attention": L * L * attention_flops_per_pair(config)}
    default = counted(model, L)
    assert default["matmul"] == L * matmul_flops_per_token(config)
    assert default["attention"] in (0, L * L * attention_flops_per_pair(config))


def test_flop_counter_training_is_three_forwards():
    """Forward + backward: each matmul's backward is two matmuls of its size (input and weight gradients), so the
    counter's training FLOPs are training_flops (3x forward) for L*L pairs. The embedding's gradient is an index
    add, not a matmul, and nothing is counted for it on either side."""
    config = tiny_qwen3_config()
    got = counted(tiny_qwen3("eager"), L, backward=True)
    assert got["matmul"] + got["attention"] == training_flops(L, L * L, config)
    assert got["matmul"] == 3 * L * matmul_flops_per_token(config)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert peak_flops("NVIDIA H100 NVL", None) == 835e12
    assert peak_flops("NVIDIA H200", None) == 989e12
    assert peak_flops("NVIDIA GH200 480GB", None) == 989e12
    assert peak_flops("NVIDIA B200", None) == 2250e12
    assert peak_flops("NVIDIA GB200", None) == 2500e12  # not the B200's figure
    assert peak_flops("NVIDIA A100-SXM4-80GB", None) == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe", None) == 312e12
    assert peak_flops("NVIDIA A10", None) == 125e12
    assert peak_flops("NVIDIA A10G", None) is None  # not an A10, not in the table
    assert peak_flops("NVIDIA L40S", None) == 362e12
    assert peak_flops("NVIDIA L4", None) == 121e12
    assert peak_flops("AMD Instinct MI300X", None) == 1307e12
    assert peak_flops("cpu", None) is None
    assert peak_flops("Some New GPU", 123.5) == 123.5e12
    assert peak_flops("NVIDIA H100 80GB HBM3", 500) == 500e12  # the override wins
    assert all(v > 0 for v in PEAK_BF16_TFLOPS.values())


def test_mfu():
    assert mfu(989e12, 2.0, 989e12) == 0.5
    assert mfu(1e12, 1.0, None) is None
    assert mfu(1e12, 0.0, 1e12) is None
    assert math.isclose(mfu(3 * 590080 * 1000, 0.5, 312e12), 3 * 590080 * 1000 / 0.5 / 312e12)


def test_batches_count_the_work_of_their_layout_and_the_log_turns_it_into_flops_per_second():
    """What the training log's GFLOP/s (CPU) and MFU (GPU) are made of: each collated batch carries the model's tokens
    and causal query-key pairs as its layout computes them (the prompt once in a shared-prefix row)."""
    from rmtrain.batching import collate_plain, collate_shared_prefix, model_work
    from rmtrain.groups import Group
    from rmtrain.flops import reward_model_training_flops, training_flops
    from rmtrain.log import Throughput

    group = Group.of(0, [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7, 8]], [(0, 1)])  # prefix of 3, completions of 2 and 3
    assert collate_shared_prefix([group], 0)["model_work"] == (3 + 2 + 3, 6 + (2 * 3 + 3) + (3 * 3 + 6))
    assert collate_plain([group], 0)["model_work"] == (5 + 6, 15 + 21) == model_work([group], "plain")
    config = tiny_qwen3_config()
    # An encoder's plain rows attend both ways: every pair of a sequence, sum L^2 = 25 + 36.
    assert reward_model_training_flops(config, True, 11, 36) == training_flops(11, 25 + 36, config)
    assert reward_model_training_flops(config, False, 11, 36) == training_flops(11, 36, config)

    speed = Throughput(peak_flops=2e12)
    speed.window["seconds"] = 2.0
    speed.add(pairs=1, real_tokens=11, computed_tokens=8, flops=1e12)
    rates = speed.take_window()
    assert rates["gflops_per_s"] == pytest.approx(500.0) and rates["mfu"] == pytest.approx(0.25)
    assert "mfu" not in Throughput().totals()  # no peak (a CPU): GFLOP/s only
