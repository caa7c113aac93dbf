"""Attention of the shared-prefix layout, computed per sequence instead of over a masked square.

A shared-prefix row holds `prefix + c_1 + ... + c_K`; each completion may see the prefix and itself. A 4D
mask gets that right, but attention kernels still compute every masked-out block: (P + K C)^2 scores per
row where the sequences need P^2 + K (P + C) C. Here the prefix is one short "virtual sequence" and every
completion another (its queries against the prefix's and its own keys, gathered from the row), so nothing
masked is computed, while the projections and MLPs still run once per token. In the last layer only the reward
tokens' queries are computed, and when scoring its output projection and MLP run at those tokens only
(`last_layer_at`): nothing reads that layer's other outputs. rmtrain uses it for rows of
three or more completions (lists, reward-server groups); for a pair the 4D mask costs about the same and
has no gathering to do.

It is registered with transformers' attention interface under `NAME`, and it reads the layout from the
`rmtrain_segments` keyword that rmtrain passes to the model's forward (transformers forwards extra keywords
to the attention function of every layer). Without it, a batch goes to transformers' SDPA attention.
rmtrain.layout switches a model to it only after checking, on the model itself, that a tiny shared-prefix batch gives
the same rewards as the 4D mask.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn import functional as F

NAME = "rmtrain_shared_prefix"
KEYWORD = "rmtrain_segments"
ORIGINAL = {"sdpa": NAME}
"""The attention implementations segment attention stands in for (batches without segments go to it)."""


class UnsupportedAttention(RuntimeError):
    """The layer asks for something virtual sequences do not compute (soft-capping, attention sinks)."""


def _attention(original: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        segments = kwargs.pop(KEYWORD, None)
        if segments is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
            raise UnsupportedAttention(f"{type(module).__name__}: soft-capped or sink attention")
        batch, heads, width, dim = query.shape
        flat = lambda states: states.transpose(1, 2).reshape(batch * width, states.shape[1], dim)  # noqa: E731
        q, k, v = flat(query), flat(key), flat(value)
        window = kwargs.get("sliding_window")
        # The last layer's output is read at the reward tokens only (the score head's value there): the other
        # queries' attention would be computed for nothing, and is left at zero.
        last_layer = _is_last_layer(module)
        # Every real token is the query of exactly one virtual sequence, so the outputs go back in row order;
        # padded queries write to one extra row, dropped at the end.
        rows = query.new_zeros(batch * width + 1, heads, dim)
        for part in segments["parts"]:  # the prefixes, then the completions: each padded only to its own kind
            if last_layer and "r_index" not in part:
                continue  # prefixes: no reward is read there
            count, _, queries, keys = part["mask"].shape
            q_index, q_out, mask, q_at = part["q_index"], part["q_out"], part["mask"], part["q_at"]
            if last_layer:
                q_index, q_out, mask, q_at, queries = part["r_index"], part["r_index"], part["r_mask"], part["r_at"], 1
            if window:  # a sliding-window layer: only the last `window` positions
                mask = mask & (q_at[:, None, :, None] - part["k_at"][:, None, None, :]).lt(window)
            # index_select on the flat token axis: several times faster than indexing with a 2D index.
            gather = lambda states, index, width: states.index_select(0, index).view(count, width, -1, dim).transpose(1, 2)  # noqa: E731
            # A chunk of prefixes is causal over itself: no mask, and the kernel skips the blocks above the diagonal.
            causal = part["causal"] and not window and not last_layer
            chunk_keys, chunk_values, mask = gather(k, part["k_index"], keys), gather(v, part["k_index"], keys), None if causal else mask
            gqa = key.shape[1] != heads
            if gqa and not _gqa_takes_mask(query.device, mask):
                # CUDA: only the flash kernel takes enable_gqa, and it takes no mask; anything else falls back to the
                # math kernel, which materializes fp32 scores. Repeated key/value heads keep the efficient kernel.
                chunk_keys, chunk_values = chunk_keys.repeat_interleave(heads // key.shape[1], 1), chunk_values.repeat_interleave(heads // key.shape[1], 1)
                gqa = False
            out = F.scaled_dot_product_attention(
                gather(q, q_index, queries),
                chunk_keys,
                chunk_values,
                attn_mask=mask,
                dropout_p=dropout if module.training else 0.0,
                is_causal=causal,
                scale=scaling,
                enable_gqa=gqa,
            )
            rows.index_copy_(0, q_out, out.transpose(1, 2).reshape(count * queries, heads, dim).to(query.dtype))
        return rows[:-1].reshape(batch, width, heads, dim), None

    return attention


def prefix_mask(segment_ids: torch.Tensor, kind: str) -> torch.Tensor:
    """The 4D mask [rows, 1, width, width] of shared-prefix rows from their segment ids (0 the prefix, k the k-th
    completion, -1 padding): a token sees the earlier tokens of the prefix and of its own completion; padding sees
    itself only (no softmax over nothing). `kind` "bool" (True = may attend; SDPA) or "float" (0 / float32-min
    added to the scores; eager attention)."""
    width = segment_ids.shape[1]
    query, key = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (query >= 0) & ((key == 0) | (key == query))
    allowed |= (query < 0) & torch.eye(width, dtype=torch.bool, device=segment_ids.device)
    allowed = allowed.unsqueeze(1)
    if kind == "float":
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return allowed


def _gqa_takes_mask(device: torch.device, mask: torch.Tensor | None) -> bool:
    """Whether SDPA computes grouped-query attention with this mask without repeated key/value heads: the CPU kernels
    do; elsewhere transformers' own rule (`use_gqa_in_sdpa` for CUDA: only without a mask)."""
    return device.type == "cpu" or mask is None


def _is_last_layer(attention_module) -> bool:
    layers = getattr(getattr(attention_module, "config", None), "num_hidden_layers", None)
    return layers is not None and getattr(attention_module, "layer_idx", None) == layers - 1


@contextmanager
def last_layer_at(model, index: torch.Tensor):
    """Run the last decoder layer's output projection and MLP at the flat token positions `index` only (the
    reward tokens; rows elsewhere are left at zero), for a forward without gradients.

    Both work token by token and nothing reads that layer's other outputs, so the rewards are unchanged; for a
    shallow model they are a large part of the forward. Models whose last layer has no `self_attn.o_proj` and
    `mlp` are run whole. Not for training: a recomputed (checkpointed) layer would run without the hooks.
    """
    layer = next((m for m in model.modules() if _is_last_layer(getattr(m, "self_attn", None))), None)
    modules = [getattr(getattr(layer, "self_attn", None), "o_proj", None), getattr(layer, "mlp", None)]
    if not all(isinstance(module, torch.nn.Module) for module in modules):
        yield
        return
    shapes: list[torch.Size] = []

    def gather(_module, args):  # [rows, width, features] -> [1, len(index), features]
        shapes.append(args[0].shape)
        return (args[0].reshape(-1, args[0].shape[-1]).index_select(0, index).unsqueeze(0), *args[1:])

    def scatter(_module, _args, output):  # and back, zeros elsewhere (a tuple's first item: MoE router logits follow)
        shape, states = shapes.pop(), output if isinstance(output, torch.Tensor) else output[0]
        rows = states.new_zeros(shape[:-1].numel(), states.shape[-1]).index_copy_(0, index, states[0])
        rows = rows.view(*shape[:-1], states.shape[-1])
        return rows if isinstance(output, torch.Tensor) else (rows, *output[1:])

    handles = [hook for module in modules for hook in (module.register_forward_pre_hook(gather), module.register_forward_hook(scatter))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for original, name in ORIGINAL.items():
        AttentionInterface.register(name, _attention(original))
        # Batches without segments (a plain layout) still get the mask their original attention expects.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def segments(groups, bases: list[int]) -> dict:
    """The virtual sequences of a shared-prefix batch whose groups start at `bases` in the flattened batch
    (rmtrain.batching puts them in one row).

    Parts of virtual sequences, each padded only to its own widest: the groups' prefixes (causal over
    themselves) and the completions (their own tokens as queries, the prefix's and their own as keys), in
    chunks of similar sizes. A query sees the keys at positions up to its own.
    """
    # A virtual sequence is (start, length, prefix start, prefix length): its queries are `length` tokens from
    # `start`, its keys the prefix's tokens then its own; a prefix is a sequence with no prefix of its own.
    prefixes: list[tuple[int, int, int, int]] = []
    completions: list[tuple[int, int, int, int]] = []
    for base, g in zip(bases, groups):
        n = len(g.prefix)
        if n:
            prefixes.append((base, n, base, 0))
        start = base + n
        for completion in g.completions:
            completions.append((start, len(completion), base, n))
            start += len(completion)
    prefix_chunks, completion_chunks = _similar(prefixes), _similar(completions)
    return _parts(prefix_chunks + completion_chunks, first_rewarded=len(prefix_chunks))


def _similar(sequences: list[tuple[int, int, int, int]], waste: float = 0.5) -> list[list[tuple[int, int, int, int]]]:
    """Virtual sequences in chunks of similar sizes, so that padding each chunk to its widest computes at most
    `waste` more than its sequences need (one long completion would otherwise pad every other one)."""
    ordered = sorted(sequences, key=lambda s: (s[1] + s[3], s[1]), reverse=True)  # keys, then queries
    chunks: list[list] = []
    for sequence in ordered:
        if chunks:
            chunk = chunks[-1] + [sequence]
            padded = len(chunk) * max(s[1] for s in chunk) * max(s[1] + s[3] for s in chunk)
            if padded <= (1 + waste) * sum(s[1] * (s[1] + s[3]) for s in chunk):
                chunks[-1] = chunk
                continue
        chunks.append([sequence])
    return chunks


def _parts(chunks: list[list[tuple[int, int, int, int]]], first_rewarded: int) -> dict:
    """Index tensors and masks of each chunk of virtual sequences (start, length, prefix start, prefix length),
    built for all chunks at once with tensor operations (a loop over tokens cost as much as the attention it
    set up); each chunk's are views of the rows it owns, cut to its own widths. The chunks from `first_rewarded`
    on are completions, whose last token is read as their reward: for the last layer, that query alone."""
    table = torch.tensor([sequence for chunk in chunks for sequence in chunk], dtype=torch.long)
    start, length, prefix_start, prefix_length = (column[:, None] for column in table.unbind(1))
    keys = prefix_length + length
    q = torch.arange(int(length.max()))[None]
    k = torch.arange(int(keys.max()))[None]
    q_valid, k_valid = q < length, k < keys
    q_index = torch.where(q_valid, start + q, 0)
    q_out = torch.where(q_valid, start + q, int((start + length).max()))  # padded queries: the row after the last
    k_index = torch.where(k_valid, torch.where(k < prefix_length, prefix_start + k, start + k - prefix_length), 0)
    q_at = torch.where(q_valid, prefix_length + q, -1)  # positions: the prefix's 0.., then the sequence's own
    k_at = torch.where(k_valid, k, 1 << 40)  # padded keys are never seen
    reward_index, reward_at = (start + length - 1).flatten(), prefix_length + length - 1
    parts, first = [], 0
    for number, chunk in enumerate(chunks):
        rows, first = slice(first, first + len(chunk)), first + len(chunk)
        width, key_width = max(s[1] for s in chunk), max(s[1] + s[3] for s in chunk)
        part = {"q_at": q_at[rows, :width], "k_at": k_at[rows, :key_width]}
        mask = (part["k_at"][:, None, :] <= part["q_at"][:, :, None]).unsqueeze(1)  # [sequences, 1, queries, keys]
        mask[:, 0, :, 0] |= ~q_valid[rows, :width]  # a padded query row sees one key: no softmax over nothing
        # Sequences without a prefix of their own (the prefixes) attend causally to themselves, their padded
        # queries after the real ones. Token indices are flattened, sequence by sequence, for index_select.
        causal = all(s[3] == 0 for s in chunk)
        parts.append(part | {"mask": mask, "causal": causal, "q_index": q_index[rows, :width].flatten(),
                             "k_index": k_index[rows, :key_width].flatten(), "q_out": q_out[rows, :width].flatten()})
        if number >= first_rewarded:  # the reward token sees every key of its sequence
            parts[-1] |= {"r_index": reward_index[rows], "r_at": reward_at[rows], "r_mask": k_valid[rows, None, None, :key_width]}
    return {"parts": parts}


def transformers_model(model):
    """The transformers model inside its wrappers: DDP and DeepSpeed engines (`.module`; a DeepSpeedEngine has a
    `.config` of its own, DeepSpeed's), then PEFT (`get_base_model`)."""
    from transformers import PreTrainedModel

    while not isinstance(model, PreTrainedModel) and not hasattr(model, "get_base_model") and hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_is_segmented(model) -> bool:
    return getattr(transformers_model(model).config, "_attn_implementation", None) in ORIGINAL.values()
