"""Batches that compute only the tokens that matter.

Three layouts of a batch of preference pairs, all read the same way: the model returns one score per
token (decoders) and `reward_index` picks, in the flattened [rows * width] scores, the reward token of
every chosen sequence and then of every rejected one.

- plain: chosen and rejected as 2B right-padded rows (what TRL does).
- packed (padding-free): every sequence of the batch in one row; position ids restart per sequence,
  which transformers turns into a block-diagonal causal mask (varlen kernels with flash attention).
- shared prefix (decoders): one row per pair, `prompt + chosen + rejected`, where the rejected tokens
  continue the prompt's positions and cannot see the chosen tokens (a 4D attention mask). The prompt
  is the longest common token prefix of the two sides: those tokens, at those positions, have the same
  hidden states in both sequences under causal attention, so rewards and gradients are the same as the
  plain two-sequence forward.

Every layout reports `real_tokens` as the tokens of both sequences in full (what TRL's batches hold
without padding), so `computed / real` below 1 measures what prefix sharing saves.

Plus a length-grouped batch sampler (shuffled mega-batches, each sorted by length) with an optional
token budget per batch, and micro-batches: a training batch is computed in forward/backward passes of at
most `max_tokens_per_forward` tokens each, so activation memory is bounded whatever the batch size (the
loss stays a mean over the batch's pairs, so the gradient is the same).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b)) - 1  # each side keeps at least its own reward token
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pair_cost(pair: dict[str, Any], layout: str) -> int:
    """Tokens a pair puts into a batch under `layout` (used for length grouping and token budgets)."""
    c, r = len(pair["chosen_ids"]), len(pair["rejected_ids"])
    if layout == "shared_prefix":
        return c + r - _common_prefix(pair["chosen_ids"], pair["rejected_ids"])
    if layout == "packed":
        return c + r
    return 2 * max(c, r)  # plain: both sides are padded to the widest sequence of the batch


def computed_tokens(costs: list[int], layout: str) -> int:
    """Tokens a batch of pairs with these costs computes: packed rows pay their own, padded rows the widest."""
    if not costs:
        return 0
    return sum(costs) if layout == "packed" else max(costs) * len(costs)


def _extras(pairs: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    batch["row"] = torch.tensor([p["row"] for p in pairs], dtype=torch.long)
    if "margin" in pairs[0]:
        batch["margin"] = torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)
    return batch


def collate_plain(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected sequences in one right-padded batch, for a single forward pass."""
    sequences = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
    reward_index = torch.tensor([i * width + len(s) - 1 for i, s in enumerate(sequences)], dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "reward_index": reward_index,
        "real_tokens": torch.tensor(sum(len(s) for s in sequences)),
    }
    return _extras(pairs, batch)


def collate_packed(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """All 2B sequences in a single row with restarting position ids (no padding at all)."""
    sequences = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    ids: list[int] = []
    positions: list[int] = []
    ends = []
    for seq in sequences:
        ids.extend(seq)
        positions.extend(range(len(seq)))
        ends.append(len(ids) - 1)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "reward_index": torch.tensor(ends, dtype=torch.long),
        "real_tokens": torch.tensor(len(ids)),
    }
    return _extras(pairs, batch)


def collate_shared_prefix(pairs: list[dict[str, Any]], pad_token_id: int, mask_format: str = "bool") -> dict[str, torch.Tensor]:
    """One row per pair: prompt + chosen + rejected, rejected blind to chosen, positions continued.

    mask_format: "bool" (True = may attend; SDPA) or "float" (0 / dtype-min additive; eager attention).
    """
    rows = []
    for p in pairs:
        c, r = p["chosen_ids"], p["rejected_ids"]
        n = _common_prefix(c, r)
        rows.append((c[:n], c[n:], r[n:]))
    width = max(len(a) + len(b) + len(d) for a, b, d in rows)
    size = len(rows)
    input_ids = torch.full((size, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((size, width), dtype=torch.long)
    allowed = torch.zeros((size, 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    chosen_end, rejected_end = [], []
    real = 0
    for i, (prefix, chosen, rejected) in enumerate(rows):
        n, cs, rs = len(prefix), len(chosen), len(rejected)
        total = n + cs + rs
        input_ids[i, :total] = torch.tensor(prefix + chosen + rejected, dtype=torch.long)
        position_ids[i, : n + cs] = torch.arange(n + cs)
        position_ids[i, n + cs : total] = torch.arange(n, n + rs)
        block = causal[:total, :total].clone()
        block[n + cs : total, n : n + cs] = False  # rejected cannot see chosen
        allowed[i, 0, :total, :total] = block
        # Padding rows attend to themselves only, so no softmax runs over an empty row.
        allowed[i, 0, range(total, width), range(total, width)] = True
        chosen_end.append(i * width + n + cs - 1)
        rejected_end.append(i * width + total - 1)
        real += total + n  # both sequences in full, as a two-sequence batch holds them
    if mask_format == "float":
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    batch = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": mask,
        "reward_index": torch.tensor(chosen_end + rejected_end, dtype=torch.long),
        "real_tokens": torch.tensor(real),
    }
    return _extras(pairs, batch)


def split_by_tokens(pairs: list[dict[str, Any]], layout: str, max_tokens: int | None) -> list[list[dict[str, Any]]]:
    """A batch's pairs (longest first) in consecutive chunks of at most `max_tokens` computed tokens each.

    A pair longer than the budget on its own gets a chunk of its own.
    """
    if max_tokens is None:
        return [pairs]
    ordered = sorted(pairs, key=lambda p: -pair_cost(p, layout))
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    costs: list[int] = []
    for pair in ordered:
        cost = pair_cost(pair, layout)
        if current and computed_tokens(costs + [cost], layout) > max_tokens:
            chunks.append(current)
            current, costs = [], []
        current.append(pair)
        costs.append(cost)
    chunks.append(current)
    return chunks


def collate_micro_batches(pairs: list[dict[str, Any]], collate, layout: str, max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """One training batch as a list of micro-batches, each run through its own forward and backward."""
    return [collate(chunk) for chunk in split_by_tokens(pairs, layout, max_tokens)]


class LengthGroupedBatchSampler:
    """Batches of similar length in random order.

    Each epoch: shuffle (seed + epoch), cut into mega-batches of `mega_batch` batches, sort each by
    length, cut into batches (of `batch_size` pairs, or as many as fit `max_tokens` padded tokens),
    then shuffle the batch order, so training order stays random while padding nearly vanishes.

    With `num_processes` > 1 (fixed batch size), the batches above are global batches of
    `num_processes * batch_size` pairs, each emitted as `num_processes` consecutive per-process parts;
    Accelerate's sharding hands part i of every global batch to process i. So every optimizer step sees
    the same pairs whatever the number of processes (1 x 2B pairs or 2 x B pairs). With `max_tokens`
    the budget is per process and per micro-batch, so batches are cut per process as with one process.
    """

    def __init__(
        self,
        costs: list[int],
        batch_size: int,
        seed: int,
        max_tokens: int | None = None,
        mega_batch: int = 50,
        shuffle: bool = True,
        num_processes: int = 1,
        layout: str = "plain",
        cap_pairs: bool = False,
    ):
        self.costs = costs
        # With max_tokens a batch holds as many pairs as fit, unless cap_pairs (evaluation: at most
        # batch_size pairs and max_tokens tokens).
        self.cap_pairs = cap_pairs
        self.layout = layout
        self.pairs_per_batch = batch_size
        # Accelerate reads `batch_size` to shard; None tells it batches vary in size (a short last part,
        # token budgets), so it shards batch by batch instead of dropping groups with a short batch.
        self.batch_size = None
        self.seed = seed
        self.max_tokens = max_tokens
        self.mega_batch = mega_batch
        self.shuffle = shuffle
        self.num_processes = 1 if max_tokens is not None else num_processes
        self.epoch = 0
        self._batches: list[list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._batches = None

    def _build(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.costs)))
        if self.shuffle:
            rng.shuffle(order)
        global_size = self.pairs_per_batch * self.num_processes
        span = global_size * self.mega_batch
        batches: list[list[int]] = []
        for start in range(0, len(order), span):
            mega = sorted(order[start : start + span], key=lambda i: -self.costs[i])
            batches.extend(self._cut(mega, global_size))
        if self.shuffle:
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
            # What the batch would compute if this pair joined (padding included in padded layouts).
            full = self.cap_pairs and len(current) == size
            if current and (full or computed_tokens([self.costs[i] for i in current + [index]], self.layout) > self.max_tokens):
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


# --------------------------------------------------------------------------------------------------
# Choosing a layout and building loaders


def choose_layout(rm, share_prefix: bool, padding_free: bool) -> tuple[str, str, str | None]:
    """(layout, 4D mask format, a note to print when a request could not be honoured)."""
    if rm.fmt.is_encoder:
        # Bidirectional attention: a shared prefix would see both answers; BERT-like models have no
        # packed-sequence masks in transformers. Length grouping still removes most padding.
        note = "encoder model: shared prefix and padding-free do not apply, using padded batches" if (share_prefix or padding_free) else None
        return "plain", "bool", note
    base = rm.model.get_base_model() if hasattr(rm.model, "get_base_model") else rm.model
    attn = getattr(base.config, "_attn_implementation", "eager")
    if share_prefix:
        if attn in ("sdpa", "eager"):
            return "shared_prefix", "bool" if attn == "sdpa" else "float", None
        fallback = "packed" if padding_free else "plain"
        return fallback, "bool", f"attention '{attn}' takes no custom masks: shared prefix off, using {fallback} batches"
    return ("packed" if padding_free else "plain"), "bool", None


def make_dataloader(
    pairs: list[dict[str, Any]],
    layout: str,
    pad_token_id: int,
    mask_format: str,
    batch_size: int,
    seed: int,
    *,
    shuffle: bool,
    length_grouped: bool,
    max_tokens: int | None = None,
    num_processes: int = 1,
    micro_batches: bool = False,
    max_tokens_per_forward: int | None = None,
    cap_pairs: bool = False,
):
    """A DataLoader over pairs in `layout`, and its length-grouped sampler (or None).

    `num_processes`: the world size the loader will be sharded over by `accelerator.prepare`; length-grouped
    batches are then cut so that one optimizer step holds the same pairs as with one process.
    With `micro_batches` (training), each batch comes as a list of micro-batches of at most
    `max_tokens_per_forward` computed tokens (one micro-batch when None). `max_tokens` replaces the pair
    count as the batch bound, unless `cap_pairs` keeps both.
    """
    from functools import partial

    from torch.utils.data import DataLoader

    if layout == "shared_prefix":
        collate = partial(collate_shared_prefix, pad_token_id=pad_token_id, mask_format=mask_format)
    else:
        collate = partial(collate_packed if layout == "packed" else collate_plain, pad_token_id=pad_token_id)
    if micro_batches:
        collate = partial(collate_micro_batches, collate=collate, layout=layout, max_tokens=max_tokens_per_forward)
    if not (length_grouped or max_tokens):
        return DataLoader(pairs, batch_size=batch_size, shuffle=shuffle, collate_fn=collate), None
    costs = [pair_cost(p, layout) for p in pairs]
    sampler = LengthGroupedBatchSampler(
        costs, batch_size, seed, max_tokens=max_tokens, shuffle=shuffle, mega_batch=50 if shuffle else len(pairs),
        num_processes=num_processes, layout=layout, cap_pairs=cap_pairs,
    )
    return DataLoader(pairs, batch_sampler=sampler, collate_fn=collate), sampler


def token_counts(pairs: list[dict[str, Any]], sampler: LengthGroupedBatchSampler, layout: str) -> tuple[int, int, int]:
    """(tokens computed, real tokens, unique tokens) for one epoch of `sampler`'s batches in `layout`.

    Real tokens count both sequences of every pair in full; unique tokens count a pair's shared prefix once.
    The per-pair costs are the ones the sampler already computed for `layout`.
    """
    computed = real = unique = 0
    for batch in sampler.batches():
        costs = [sampler.costs[i] for i in batch]
        computed += computed_tokens(costs, layout)
        for i, cost in zip(batch, costs):
            real += len(pairs[i]["chosen_ids"]) + len(pairs[i]["rejected_ids"])
            unique += cost if layout == "shared_prefix" else pair_cost(pairs[i], "shared_prefix")
    return computed, real, unique
