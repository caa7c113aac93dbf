"""Batches of tokenized groups that compute only the tokens that matter.

Three layouts of a batch of groups (a pair is a group of two), all read the same way: the model returns
one score per token (decoders) and `reward_index` picks, in the flattened [rows * width] scores, the reward
token of every sequence, group by group; `pair_index` then names each pair's (better, worse) rewards.

- plain: every sequence its own right-padded row (what TRL does with chosen and rejected).
- packed (padding-free): every sequence of the batch in one row; position ids restart per sequence,
  which transformers turns into a block-diagonal causal mask (varlen kernels with flash attention).
- shared prefix (decoders): one row per group, `prefix + c_1 + ... + c_K`, where each completion continues
  the prefix's positions and sees neither of the other completions (a 4D attention mask). Under causal
  attention the prefix tokens, at those positions, have the same hidden states in every sequence, so
  rewards and gradients are those of the K separate sequences.

Every layout reports `real_tokens` as the tokens of all sequences in full (what TRL's batches hold without
padding), so `computed / real` below 1 measures what prefix sharing saves.

Then: the length-grouped batch sampler for training (shuffled mega-batches, each sorted by length) with an
optional token budget per batch; passes (a training batch computed in forward/backward passes of at most
`max_tokens_per_forward` tokens, so activation memory is bounded whatever the batch size); and the one
way inference batches are built (`inference_loader`): longest first, bounded in sequences, tokens and padding.
"""

from __future__ import annotations

import random
from dataclasses import replace
from functools import partial
from typing import Any, Iterator

import torch

from rmtrain import attention
from rmtrain.groups import Group
from rmtrain.flops import attention_pairs

Shape = tuple[int, int]
"""(width, rows) a group adds to a batch: a padded batch computes max(width) * sum(rows) tokens."""


def group_shape(group: Group, layout: str) -> Shape:
    lengths = group.lengths()
    if layout == "shared_prefix":
        return len(group.prefix) + sum(len(c) for c in group.completions), 1
    if layout == "packed":
        return sum(lengths), 1
    return max(lengths), len(lengths)  # plain: each sequence padded to the widest of the batch


def group_cost(group: Group, layout: str) -> int:
    """Tokens a group computes on its own under `layout` (the key length grouping sorts by)."""
    width, rows = group_shape(group, layout)
    return width * rows


def model_work(groups: list[Group], layout: str) -> tuple[int, int]:
    """(tokens, causal query-key pairs) the model needs for `groups` in `layout`, padding left out: with a shared
    prefix the prompt once, each completion against it and itself; otherwise every sequence whole (rmtrain.flops)."""
    tokens = pairs = 0
    for g in groups:
        if layout == "shared_prefix":
            tokens += len(g.prefix) + sum(len(c) for c in g.completions)
            pairs += attention_pairs(len(g.prefix), [len(c) for c in g.completions])
        else:
            tokens += sum(g.lengths())
            pairs += sum(attention_pairs(0, [n]) for n in g.lengths())
    return tokens, pairs


def computed_tokens(shapes: list[Shape], layout: str) -> int:
    """Tokens a batch of groups with these shapes computes: packed rows pay their own, padded rows the widest."""
    if not shapes:
        return 0
    if layout == "packed":
        return sum(width * rows for width, rows in shapes)
    return max(width for width, _ in shapes) * sum(rows for _, rows in shapes)


# --------------------------------------------------------------------------------------------------
# Collating


PAIR_KEY = 1 << 32
"""A pair's key is its group's key (uid, else row) * PAIR_KEY + its index in the group: unique across pairs and lists."""


def targets(groups: list[Group]) -> dict[str, Any]:
    """What the loss needs of a batch besides its rewards (which come group by group, completion by completion):

    pair_index [pairs, 2] (better, worse) into the rewards; row and key of each pair; margin (the data's
    margin column, pair files), score_margin (score differences, lists); pair_weight (1 / pairs of its row),
    in_list (the pair's row has 3 or more completions); per sequence: its score, its group, in_list; and
    num_pairs, num_groups (rows with a pair), num_completions.
    """
    index, rows, keys, margins, score_margins, weights, pair_in_list = [], [], [], [], [], [], []
    scores, sequence_group, sequence_in_list = [], [], []
    start = 0
    for number, g in enumerate(groups):
        k = len(g.completions)
        index.extend((start + better, start + worse) for better, worse in g.pairs)
        rows.extend([g.row] * len(g.pairs))
        keys.extend(g.key * PAIR_KEY + p for p in range(len(g.pairs)))
        margins.extend(g.margins or [0.0] * len(g.pairs))
        own = g.scores if g.scores is not None else [float(k - i) for i in range(k)]  # a pair: chosen above rejected
        score_margins.extend(own[better] - own[worse] for better, worse in g.pairs)
        weights.extend([1.0 / max(len(g.pairs), 1)] * len(g.pairs))
        pair_in_list.extend([k > 2] * len(g.pairs))
        scores.extend(own)
        sequence_group.extend([number] * k)
        sequence_in_list.extend([k > 2] * k)
        start += k
    batch: dict[str, Any] = {
        "pair_index": torch.tensor(index, dtype=torch.long).reshape(-1, 2),
        "row": torch.tensor(rows, dtype=torch.long),
        "pair_key": torch.tensor(keys, dtype=torch.long),
        "score_margin": torch.tensor(score_margins, dtype=torch.float32),
        "pair_weight": torch.tensor(weights, dtype=torch.float32),
        "pair_in_list": torch.tensor(pair_in_list, dtype=torch.bool),
        "sequence_score": torch.tensor(scores, dtype=torch.float32),
        "sequence_group": torch.tensor(sequence_group, dtype=torch.long),
        "sequence_in_list": torch.tensor(sequence_in_list, dtype=torch.bool),
        "num_pairs": len(index),
        "num_groups": sum(1 for g in groups if g.pairs),
        "num_completions": start,
    }
    if any(g.margins is not None for g in groups):
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
    return batch


def collate_plain(groups: list[Group], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Every sequence its own right-padded row, group by group, for a single forward pass."""
    sequences = [g.sequence(i) for g in groups for i in range(len(g.completions))]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "reward_index": torch.tensor([i * width + len(s) - 1 for i, s in enumerate(sequences)], dtype=torch.long),
        "real_tokens": torch.tensor(sum(len(s) for s in sequences)),
        "model_work": model_work(groups, "plain"),
    }
    return batch | targets(groups)


def collate_packed(groups: list[Group], pad_token_id: int, mask_format: str = "bool") -> dict[str, torch.Tensor]:
    """All sequences in a single row with restarting position ids (no padding at all).

    Flash attention reads the sequences from the position ids (varlen kernels). SDPA would get a dense
    [tokens x tokens] mask for the row from transformers (4 GiB at 65,536 tokens): with `mask_format` "segments"
    each sequence is attended on its own by segment attention instead (a shared-prefix row with no prefix).
    """
    if mask_format == "segments":
        return _collate_segments([replace(g, prefix=[], completions=[g.sequence(i) for i in range(len(g.completions))]) for g in groups])
    ids: list[int] = []
    positions: list[int] = []
    ends = []
    for g in groups:
        for i in range(len(g.completions)):
            seq = g.sequence(i)
            ids.extend(seq)
            positions.extend(range(len(seq)))
            ends.append(len(ids) - 1)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "reward_index": torch.tensor(ends, dtype=torch.long),
        "real_tokens": torch.tensor(len(ids)),
        "model_work": model_work(groups, "packed"),
    }
    return batch | targets(groups)


def collate_shared_prefix(groups: list[Group], pad_token_id: int, mask_format: str = "bool") -> dict[str, torch.Tensor]:
    """One row per group: prefix + c_1 + ... + c_K, each completion blind to the others, positions continued.

    mask_format: "segments" (rmtrain.attention: each sequence attended on its own, no mask; used for batches
    with a row of three or more completions, which then all go into one row without padding, since nothing
    attends across them; other batches get the SDPA mask), "bool" (a 4D mask, True = may attend; SDPA) or
    "float" (0 / dtype-min additive; eager attention). The mask is carried as `segment_ids` (0 the prefix, k the
    k-th completion, -1 padding) and built on the model's device (`attention.prefix_mask`): a row of width W
    sends W numbers, not W x W.
    """
    if mask_format == "segments" and all(len(g.completions) <= 2 for g in groups):
        mask_format = "bool"  # pairs: the mask costs about what segments cost, without the gathering
    if mask_format == "segments":
        return _collate_segments(groups)
    width = max(group_shape(g, "shared_prefix")[0] for g in groups)
    size = len(groups)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((size, width), dtype=torch.long)
    segment_ids = torch.full((size, width), -1, dtype=torch.long)  # the 4D mask is built from these on the device
    ends = []
    real = 0
    for row, g in enumerate(groups):
        n = len(g.prefix)
        total = n + sum(len(c) for c in g.completions)
        input_ids[row, :total] = torch.tensor(g.prefix + [t for c in g.completions for t in c], dtype=torch.long)
        position_ids[row, :total] = torch.tensor(_positions(g), dtype=torch.long)
        segment_ids[row, :n] = 0
        start = n
        for number, c in enumerate(g.completions, start=1):
            end = start + len(c)
            segment_ids[row, start:end] = number
            ends.append(row * width + end - 1)
            real += n + len(c)
            start = end
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "mask_kind": mask_format,
        "reward_index": torch.tensor(ends, dtype=torch.long),
        "real_tokens": torch.tensor(real),
        "model_work": model_work(groups, "shared_prefix"),
    }
    return batch | targets(groups)


def _positions(g: Group) -> list[int]:
    """The prefix's positions, then each completion's, continuing the prefix's."""
    n = len(g.prefix)
    return list(range(n)) + [p for c in g.completions for p in range(n, n + len(c))]


def _collate_segments(groups: list[Group]) -> dict[str, torch.Tensor]:
    """Every group in one row, back to back (no padding), for segment attention: the segments say what attends to what."""
    ids, positions, ends, bases = [], [], [], []
    real = 0
    for g in groups:
        bases.append(len(ids))
        ids.extend(g.prefix + [t for c in g.completions for t in c])
        positions.extend(_positions(g))
        end = bases[-1] + len(g.prefix)
        for c in g.completions:
            end += len(c)
            ends.append(end - 1)
            real += len(g.prefix) + len(c)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "reward_index": torch.tensor(ends, dtype=torch.long),
        "real_tokens": torch.tensor(real),
        "segments": attention.segments(groups, bases),
        "model_work": model_work(groups, "shared_prefix"),
    }
    return batch | targets(groups)


def collate_for(layout: str, pad_token_id: int, mask_format: str):
    """The collate function of a layout."""
    if layout == "shared_prefix":
        return partial(collate_shared_prefix, pad_token_id=pad_token_id, mask_format=mask_format)
    if layout == "packed":
        return partial(collate_packed, pad_token_id=pad_token_id, mask_format=mask_format)
    return partial(collate_plain, pad_token_id=pad_token_id)


# --------------------------------------------------------------------------------------------------
# Training: batches, and passes of bounded tokens


def split_by_tokens(groups: list[Group], layout: str, max_tokens: int | None) -> list[list[Group]]:
    """A batch's groups (longest first) in consecutive chunks of at most `max_tokens` computed tokens each.

    A group longer than the budget on its own gets a chunk of its own.
    """
    if max_tokens is None:
        return [groups]
    shaped = sorted(((group_shape(g, layout), g) for g in groups), key=lambda item: -item[0][0] * item[0][1])
    chunks: list[list[Group]] = []
    current: list[Group] = []
    shapes: list[Shape] = []
    for shape, group in shaped:
        if current and computed_tokens(shapes + [shape], layout) > max_tokens:
            chunks.append(current)
            current, shapes = [], []
        current.append(group)
        shapes.append(shape)
    chunks.append(current)
    return chunks


def completion_chunks(group: Group, layout: str, max_tokens: int) -> list[list[int]]:
    """A row's completion indices in consecutive chunks, each with the prefix within `max_tokens` (at least one
    completion per chunk)."""
    chunks: list[list[int]] = [[]]
    for i in range(len(group.completions)):
        if chunks[-1] and group_cost(group.chunk(chunks[-1] + [i]), layout) > max_tokens:
            chunks.append([])
        chunks[-1].append(i)
    return chunks


def collate_passes(groups: list[Group], collate, layout: str, max_tokens: int | None) -> list[dict[str, Any]]:
    """One training batch as a list of passes, each run through its own forward and backward.

    A list (3 or more completions) longer than the budget on its own becomes one pass of `chunks`: collated
    chunks of its completions, each with the prompt, and the whole list's targets (`train.backward_in_chunks`).
    """
    passes = []
    for part in split_by_tokens(groups, layout, max_tokens):
        group = part[0]
        if max_tokens and len(part) == 1 and len(group.completions) > 2 and group_cost(group, layout) > max_tokens:
            chunks = [collate([group.chunk(indices)]) for indices in completion_chunks(group, layout, max_tokens)]
            passes.append({"chunks": chunks, "model_work": model_work([group], layout)} | targets([group]))
        else:
            passes.append(collate(part))
    return passes


class LengthGroupedBatchSampler:
    """Batches of similar length in random order.

    Each epoch: shuffle (seed + epoch), cut into mega-batches of `mega_batch` batches, sort each by
    length, cut into batches (of `batch_size` groups, or as many as fit `max_tokens` computed tokens),
    then shuffle the batch order, so training order stays random while padding nearly vanishes.

    With `num_processes` > 1 (fixed batch size), the batches above are global batches of
    `num_processes * batch_size` groups, each emitted as `num_processes` consecutive per-process parts;
    Accelerate's sharding hands part i of every global batch to process i. So every optimizer step sees
    the same groups whatever the number of processes (1 x 2B or 2 x B). With `max_tokens` the budget is
    per process, so batches are cut per process as with one process.
    """

    def __init__(
        self,
        shapes: list[Shape],
        batch_size: int,
        seed: int,
        max_tokens: int | None = None,
        mega_batch: int = 50,
        num_processes: int = 1,
        layout: str = "plain",
    ):
        self.shapes = shapes
        self.costs = [width * rows for width, rows in shapes]
        self.layout = layout
        self.groups_per_batch = batch_size
        # Accelerate reads `batch_size` to shard; None tells it batches vary in size (a short last part,
        # token budgets), so it shards batch by batch instead of dropping groups with a short batch.
        self.batch_size = None
        self.seed = seed
        self.max_tokens = max_tokens
        self.mega_batch = mega_batch
        self.num_processes = 1 if max_tokens is not None else num_processes
        self.epoch = 0
        self._batches: list[list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches = None

    def _build(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.shapes)))
        rng.shuffle(order)
        global_size = self.groups_per_batch * self.num_processes
        span = global_size * self.mega_batch
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            mega = sorted(order[start : start + span], key=lambda i: -self.costs[i])
            batches.extend(self._cut(mega, global_size))
        rng.shuffle(batches)
        if self.num_processes == 1:
            return batches
        parts: list[list[int]] = []
        for batch in batches:
            # A short last global batch is split as evenly as it goes (no part left empty).
            n = min(self.num_processes, len(batch))
            bounds = [round(i * len(batch) / n) for i in range(n + 1)]
            parts.extend(batch[bounds[i] : bounds[i + 1]] for i in range(n))
        return parts

    def _cut(self, ordered: list[int], size: int) -> list[list[int]]:
        if self.max_tokens is None:
            return [ordered[i : i + size] for i in range(0, len(ordered), size)]
        batches: list[list[int]] = []
        current: list[int] = []
        for index in ordered:
            # What the batch would compute if this group joined (padding included in padded layouts).
            if current and computed_tokens([self.shapes[i] for i in current + [index]], self.layout) > self.max_tokens:
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def batches(self) -> list[list[int]]:
        if self._batches is None:
            self._batches = self._build()
        return self._batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


def training_loader(
    groups: list[Group],
    layout: str,
    collate,
    batch_size: int,
    seed: int,
    *,
    length_grouped: bool,
    max_tokens_per_batch: int | None,
    max_tokens_per_forward: int | None,
    num_processes: int,
    workers: int = 0,
):
    """A shuffled DataLoader whose every batch is a list of passes, and its length-grouped sampler (or None).

    `num_processes`: the world size the loader will be sharded over by `accelerator.prepare`; length-grouped
    batches are then cut so that one optimizer step holds the same groups as with one process.
    `max_tokens_per_batch` replaces the group count as the batch bound. `workers` processes collate batches (and
    pin them, for a CUDA device) while the device computes.
    """
    from torch.utils.data import DataLoader

    to_passes = partial(collate_passes, collate=collate, layout=layout, max_tokens=max_tokens_per_forward)
    loading = {"num_workers": workers, "pin_memory": workers > 0 and torch.cuda.is_available(), "persistent_workers": workers > 0}
    if not (length_grouped or max_tokens_per_batch):
        return DataLoader(groups, batch_size=batch_size, shuffle=True, collate_fn=to_passes, **loading), None
    sampler = LengthGroupedBatchSampler(
        [group_shape(g, layout) for g in groups], batch_size, seed, max_tokens=max_tokens_per_batch,
        num_processes=num_processes, layout=layout,
    )
    return DataLoader(groups, batch_sampler=sampler, collate_fn=to_passes, **loading), sampler


def token_counts(groups: list[Group], sampler: LengthGroupedBatchSampler, layout: str) -> tuple[int, int, int]:
    """(tokens computed, real tokens, unique tokens) for one epoch of `sampler`'s batches in `layout`.

    Real tokens count every sequence in full; unique tokens count a group's shared prefix once.
    """
    computed = real = unique = 0
    for batch in sampler.batches():
        computed += computed_tokens([sampler.shapes[i] for i in batch], layout)
        for i in batch:
            real += sum(groups[i].lengths())
            unique += group_cost(groups[i], "shared_prefix")
    return computed, real, unique


# --------------------------------------------------------------------------------------------------
# Inference: the one way eval, fit's eval, score and export build batches


def sorted_batches(
    costs: list[int], sizes: list[int], max_sequences: int, max_tokens: int | None = None, max_padding: float = 0.1,
    packs: list[bool] | None = None,
) -> list[list[int]]:
    """Indices of items (one padded row each, `costs` tokens wide, holding `sizes` sequences) longest first,
    cut into batches of at most `max_sequences` sequences and `max_tokens` tokens (padding included; an item
    longer than that gets a batch of its own) whose padding stays within `max_padding` of their padded size.

    Without gradients nothing needs equal batch sizes, and on a CPU every padded token costs as much as a
    real one: a sparse long tail of lengths gets small batches, the dense middle full ones. The token bound
    keeps a batch's activations small enough to stay in cache. A batch holding an item that `packs` (a list
    under segment attention) is collated into one unpadded row: it costs the sum of its items, no padding.
    """
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    batches: list[list[int]] = []
    current: list[int] = []
    real = sequences = 0
    packed = False
    for index in order:
        joins_packed = packed or (packs is not None and packs[index])
        if current:
            computed = real + costs[index] if joins_packed else costs[current[0]] * (len(current) + 1)
            if (
                sequences + sizes[index] > max_sequences
                or computed > (1 + max_padding) * (real + costs[index])
                or (max_tokens is not None and computed > max_tokens)
            ):
                batches.append(current)
                current, real, sequences = [], 0, 0
                joins_packed = packs is not None and packs[index]
        current.append(index)
        real += costs[index]
        sequences += sizes[index]
        packed = joins_packed
    if current:
        batches.append(current)
    return batches


def inference_items(groups: list[Group], layout: str, max_tokens: int | None = None) -> list[tuple[int, Group]]:
    """What inference batches are made of, each with the key of its first sequence (sequences are numbered
    group by group): whole groups, one row each, in the shared-prefix layout (a row longer than `max_tokens`
    in chunks of its completions, each with the prefix); otherwise single sequences, which need not share a
    batch with their group's others (a group-sorted batch would pad each sequence to its partner's length)."""
    items, key = [], 0
    for g in groups:
        if layout != "shared_prefix":
            items.extend((key + i, Group(g.row, [], [g.sequence(i)], [])) for i in range(len(g.completions)))
        elif max_tokens and len(g.completions) > 1 and group_cost(g, layout) > max_tokens:
            items.extend((key + chunk[0], g.chunk(chunk)) for chunk in completion_chunks(g, layout, max_tokens))
        else:
            items.append((key, g))
        key += len(g.completions)
    return items


def collate_keyed(items: list[tuple[int, Group]], collate) -> dict[str, torch.Tensor]:
    batch = collate([g for _, g in items])
    batch["key"] = torch.tensor([key + i for key, g in items for i in range(len(g.completions))], dtype=torch.long)
    return batch


def inference_loader(
    groups: list[Group], layout: str, pad_token_id: int, mask_format: str, max_sequences: int, max_tokens: int | None
) -> tuple[Any, int]:
    """A DataLoader over `groups` for scoring (longest first; at most `max_sequences` sequences and
    `max_tokens` tokens per batch), and the number of sequences it scores. Each batch carries `key`, the
    number of every sequence, so rewards can be put back in order after batching and gathering.

    Shared-prefix groups stay whole; every other layout, and groups of one sequence, score single padded
    sequences (without a backward, packing buys nothing over length-sorted rows).
    """
    from torch.utils.data import DataLoader

    shared = layout == "shared_prefix" and any(len(g.completions) > 1 for g in groups)
    layout = "shared_prefix" if shared else "plain"
    items = inference_items(groups, layout, max_tokens)
    costs = [group_cost(g, layout) for _, g in items]
    sizes = [len(g.completions) for _, g in items]
    packs = [layout == "shared_prefix" and mask_format == "segments" and size > 2 for size in sizes]
    batches = sorted_batches(costs, sizes, max_sequences, max_tokens, packs=packs)
    collate = partial(collate_keyed, collate=collate_for(layout, pad_token_id, mask_format))
    return DataLoader(items, batch_sampler=batches, collate_fn=collate), sum(len(g.completions) for g in groups)
