"""Batch layouts give the same rewards and gradients as the plain two-sequence forward (fp32, 1e-4),
on real models and real data; the length-grouped sampler keeps every pair once per epoch."""

import pytest
import torch

from rmtrain.attention import prefix_mask
from rmtrain.batching import (
    LengthGroupedBatchSampler,
    collate_packed,
    collate_plain,
    collate_shared_prefix,
    group_cost,
    group_shape,
)
from rmtrain.config import LoraConfig, ModelConfig
from rmtrain.layout import choose_layout
from rmtrain.groups import Group, tokenize_rows
from rmtrain.model import batch_rewards, load_reward_model
from tests.conftest import FULL, read_jsonl


def hh_pairs(rm, shared_data, n=6, max_length=160):
    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=40)
    pairs, _ = tokenize_rows(rows, "hh", rm.tokenizer, rm.fmt, max_length, "filter")
    return pairs[:n]


def rewards_and_grads(rm, batch):
    rm.model.zero_grad(set_to_none=True)
    chosen, rejected = batch_rewards(rm.model, rm, batch)[:, 0][batch["pair_index"]].unbind(1)
    weights = torch.linspace(0.5, 1.5, chosen.numel())
    ((chosen - 2 * rejected) * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in rm.model.named_parameters() if p.grad is not None}
    return torch.cat([chosen, rejected]).detach(), grads


def assert_same(rm, pairs, collates):
    reference, ref_grads = rewards_and_grads(rm, collate_plain(pairs, rm.fmt.pad_token_id))
    assert ref_grads
    for collate in collates:
        got, grads = rewards_and_grads(rm, collate(pairs, rm.fmt.pad_token_id))
        assert (got - reference).abs().max().item() < 1e-4, collate.__name__
        assert grads.keys() == ref_grads.keys()
        # Summation order differs between layouts: fp32 noise grows with a gradient's size (SmolLM2's reach 10).
        worst = max(((grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max().clamp(min=1)).item() for k in grads)
        assert worst < 1e-4, (collate.__name__, worst)


def shared_eager(pairs, pad):
    return collate_shared_prefix(pairs, pad, mask_format="float")


def packed_segments(groups, pad):
    return collate_packed(groups, pad, mask_format="segments")


def shared_segments(groups, pad):
    return collate_shared_prefix(groups, pad, mask_format="segments")


def lists_of_three(pairs):
    """Groups of three completions (a pair and the next pair's chosen): what segment attention computes."""
    return [Group.of(i, [p.sequence(0), p.sequence(1), pairs[(i + 1) % len(pairs)].sequence(0)], [(0, 1), (0, 2), (1, 2)])
            for i, p in enumerate(pairs)]


@pytest.mark.shared_data
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_tiny_qwen3_layouts_match_plain(tiny_qwen3, shared_data, lora):
    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3), LoraConfig(r=4, alpha=8) if lora else None)
    pairs = hh_pairs(rm, shared_data)
    # HH pairs share the whole conversation up to the last answer: the prefix is long.
    assert sum(group_cost(p, "shared_prefix") for p in pairs) < 0.75 * sum(group_cost(p, "packed") for p in pairs)
    assert_same(rm, pairs, [collate_shared_prefix, collate_packed])
    # padding_free under sdpa: each packed sequence attended on its own (no dense [tokens x tokens] mask).
    assert choose_layout(rm, share_prefix=False, padding_free=True)[:2] == ("packed", "segments")
    assert_same(rm, pairs, [packed_segments])


@pytest.mark.shared_data
def test_tiny_qwen3_eager_attention_float_mask(tiny_qwen3, shared_data):
    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3, init_kwargs={"attn_implementation": "eager"}))
    assert_same(rm, hh_pairs(rm, shared_data, n=3), [shared_eager])


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="a minute on 2 cores (GGUF load, every layout twice); the tiny Qwen3's layouts run in make test; RMTRAIN_FULL=1 runs it")
def test_smollm2_layouts_match_plain_with_and_without_lora(smollm2, shared_data):
    path, gguf = smollm2
    rm = load_reward_model(ModelConfig(name_or_path=path, gguf_file=gguf))
    pairs = hh_pairs(rm, shared_data, n=3, max_length=128)
    assert_same(rm, pairs, [collate_shared_prefix])
    # Lists (and served groups) on a Llama: segment attention, switched on after its check on the model itself.
    assert choose_layout(rm, True, False)[1] == "segments"
    assert_same(rm, lists_of_three(pairs), [shared_segments])
    from rmtrain.model import apply_lora, head_module

    rm.model = apply_lora(rm.model, LoraConfig(r=4, alpha=8), rm.head_name, gradient_checkpointing=False)
    rm.head = head_module(rm.model, rm.head_name)
    assert_same(rm, pairs, [collate_shared_prefix])
    assert_same(rm, lists_of_three(pairs), [shared_segments])


def pair(chosen: list[int], rejected: list[int], row: int = 0) -> Group:
    return Group.of(row, [chosen, rejected], [(0, 1)])


def test_shared_prefix_when_one_side_is_a_prefix_of_the_other():
    pairs = [pair([5, 6, 7], [5, 6, 7, 8, 9])]
    batch = collate_shared_prefix(pairs, pad_token_id=0)
    # Each side keeps its own reward token: the shared prefix stops one before the shorter end.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 4]]
    assert batch["reward_index"].tolist() == [2, 5]
    mask = prefix_mask(batch["segment_ids"], "bool")[0, 0]
    assert not mask[3, 2] and mask[3, 1] and mask[5, 3]


def test_shared_prefix_of_three_completions_each_blind_to_the_others():
    # A group of three (a list): prefix [1, 2], completions [3], [4, 5], [6]; rewards at each completion's end.
    group = Group.of(0, [[1, 2, 3], [1, 2, 4, 5], [1, 2, 6]], [(0, 1), (0, 2), (1, 2)])
    assert group.prefix == [1, 2] and group.completions == [[3], [4, 5], [6]]
    batch = collate_shared_prefix([group], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 2, 3, 2]]
    assert batch["reward_index"].tolist() == [2, 4, 5]
    assert batch["pair_index"].tolist() == [[0, 1], [0, 2], [1, 2]]
    mask = prefix_mask(batch["segment_ids"], "bool")[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],  # the second completion sees the prefix and itself, not the first completion
        [1, 1, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ]
    assert batch["real_tokens"].item() == 3 + 4 + 3  # every sequence in full


def test_length_grouped_sampler_covers_every_pair_once_and_reshuffles():
    costs = [((i * 37) % 101) + 1 for i in range(200)]
    sampler = LengthGroupedBatchSampler([(c, 1) for c in costs], batch_size=8, seed=1, mega_batch=25)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(200))
    # Within a batch lengths are close: far less padding than batches in random order.
    padded = sum(max(costs[i] for i in b) * len(b) for b in first)
    random_order = [list(range(i, i + 8)) for i in range(0, 200, 8)]
    padded_random = sum(max(costs[i] for i in b) * len(b) for b in random_order)
    assert padded < 1.1 * sum(costs) < padded_random
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_token_budget_caps_padded_tokens():
    costs = [10] * 20 + [100] * 5
    sampler = LengthGroupedBatchSampler([(c, 1) for c in costs], batch_size=4, seed=0, max_tokens=200)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(25))
    for b in batches:
        assert max(costs[i] for i in b) * len(b) <= 200
    assert max(len(b) for b in batches) >= 19  # short pairs share a batch (one joins the last long pair)


def test_token_counts_by_hand():
    from rmtrain.batching import token_counts

    pairs = [
        pair([1, 2, 3, 4], [1, 2, 5], 0),  # prefix 2 -> unique 5
        pair([7, 8], [9, 8, 6, 6, 6, 6], 1),  # prefix 0 -> unique 8
    ]
    def one_batch(layout):
        return LengthGroupedBatchSampler([group_shape(p, layout) for p in pairs], batch_size=2, seed=0, layout=layout)

    assert token_counts(pairs, one_batch("plain"), "plain") == (2 * 2 * 6, 15, 13)  # 4 rows padded to 6
    assert token_counts(pairs, one_batch("packed"), "packed") == (15, 15, 13)
    assert token_counts(pairs, one_batch("shared_prefix"), "shared_prefix") == (2 * 8, 15, 13)  # 2 rows padded to 8


def test_split_by_tokens_respects_budget_and_keeps_every_pair():
    from rmtrain.batching import split_by_tokens

    pairs = [pair([1] * n, [2] * n, i) for i, n in enumerate([3, 9, 5, 2, 9])]
    # plain costs 2 * n: 6, 18, 10, 4, 18; longest first, padded to the widest of each chunk.
    chunks = split_by_tokens(pairs, "plain", max_tokens=36)
    assert [[p.row for p in c] for c in chunks] == [[1, 4], [2, 0, 3]]  # 18*2 = 36; then 10*3 = 30
    # packed pays each pair's own tokens: 18 + 18 > 30, 10 + 6 + 4 = 20.
    assert [[p.row for p in c] for c in split_by_tokens(pairs, "packed", max_tokens=30)] == [[1], [4, 2], [0, 3]]
    # A pair over budget on its own still gets a pass; no budget: one pass.
    assert [len(c) for c in split_by_tokens(pairs, "plain", max_tokens=16)] == [1, 1, 1, 2]
    assert split_by_tokens(pairs, "plain", max_tokens=None) == [pairs]


def test_length_grouped_steps_hold_the_same_pairs_at_any_world_size():
    """Through Accelerate's own sharding: 2 processes x 4 pairs see, step by step, the pairs of 1 process x 8."""
    from accelerate.data_loader import BatchSamplerShard

    costs = [((i * 37) % 101) + 1 for i in range(83)]  # 83 pairs: a short last step of 3
    one = list(LengthGroupedBatchSampler([(c, 1) for c in costs], batch_size=8, seed=3))
    two = LengthGroupedBatchSampler([(c, 1) for c in costs], batch_size=4, seed=3, num_processes=2)
    shards = [list(BatchSamplerShard(two, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(one)
    for step, pairs in enumerate(one):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(pairs)
        assert shards[0][step] and shards[1][step]  # the short last step is split, not padded with repeats


def test_plain_batches_hold_the_same_pairs_at_any_world_size_except_the_short_last_step():
    """`train.batching: plain` is Accelerate's sharding of a shuffled loader (seedable sampler, as `fit` sets
    it): 2 x 4 pairs per step are the pairs of 1 x 8, except the short last step, which Accelerate fills with
    repeated pairs (README, Multi-GPU)."""
    import torch
    from accelerate.data_loader import prepare_data_loader

    from rmtrain.batching import collate_for, training_loader

    pairs = [pair([1, 2, 3 + i % 5], [1, 4], i) for i in range(42)]

    def steps(batch_size: int, num_processes: int, rank: int) -> list[list[int]]:
        torch.manual_seed(42)  # fit's set_seed: the seedable sampler starts from torch's initial seed
        loader, _ = training_loader(pairs, "plain", collate_for("plain", 0, "bool"), batch_size, 42, length_grouped=False,
                                    max_tokens_per_batch=None, max_tokens_per_forward=None, num_processes=num_processes)
        sharded = prepare_data_loader(loader, num_processes=num_processes, process_index=rank, put_on_device=False,
                                      use_seedable_sampler=True)
        return [passes[0]["row"].tolist() for passes in sharded]

    one = steps(8, 1, 0)
    two = [steps(4, 2, rank) for rank in (0, 1)]
    assert len(one) == len(two[0]) == len(two[1]) == 6
    for step in range(5):
        assert sorted(two[0][step] + two[1][step]) == sorted(one[step])
    assert len(one[5]) == 2 and len(two[0][5] + two[1][5]) == 8  # 2 pairs, padded to 8 with repeats
    assert set(one[5]) <= set(two[0][5] + two[1][5])


def test_workers_collate_the_same_batches_in_the_same_order():
    """`train.dataloader_workers`: batches collated in worker processes are the main process's, batch for batch."""
    from rmtrain.batching import collate_for, training_loader

    pairs = [pair([1, 2, 3 + i % 5], [1, 4] + [9] * (i % 3), i) for i in range(20)]

    def batches(workers: int) -> list[list[list[int]]]:
        loader, sampler = training_loader(pairs, "shared_prefix", collate_for("shared_prefix", 0, "bool"), 4, 42, length_grouped=True,
                                          max_tokens_per_batch=None, max_tokens_per_forward=12, num_processes=1, workers=workers)
        return [[p["input_ids"].tolist() for p in passes] for passes in loader]

    assert batches(2) == batches(0) and len(batches(0)) == 5
