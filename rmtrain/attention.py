"""Attention of the shared-prefix layout, computed per sequence instead of over a masked square.

A shared-prefix row holds `prefix + c_1 + ... + c_K`; each completion may see the prefix and itself. A 4D
mask gets that right, but attention kernels still compute every masked-out block: (P + K C)^2 scores per
row where the sequences need P^2 + K (P + C) C. Here the prefix is one short "virtual sequence" and every
completion another (its queries against the prefix's and its own keys, gathered from the row), so nothing
masked is computed, while the projections and MLPs still run once per token. rmtrain uses it for rows of
three or more completions (lists, reward-server groups); for a pair the 4D mask costs about the same and
has no gathering to do.

It is registered with transformers' attention interface under `NAME`, and it reads the layout from the
`rmtrain_segments` keyword that rmtrain passes to the model's forward (transformers forwards extra keywords
to the attention function of every layer). Without it, a batch goes to transformers' SDPA attention. `enable` switches a model to it only after checking, on the model itself, that a tiny
shared-prefix batch gives the same rewards as the 4D mask.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

NAME = "rmtrain_shared_prefix"
KEYWORD = "rmtrain_segments"
_ORIGINAL = {"sdpa": NAME}
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
        outputs = []
        for part in segments["parts"]:  # the prefixes, then the completions: each padded only to its own kind
            mask = part["mask"]
            window = kwargs.get("sliding_window")
            if window:  # a sliding-window layer: only the last `window` positions
                mask = mask & (part["q_at"][:, None, :, None] - part["k_at"][:, None, None, :]).lt(window)
            out = F.scaled_dot_product_attention(
                q[part["q_index"]].transpose(1, 2),
                k[part["k_index"]].transpose(1, 2),
                v[part["k_index"]].transpose(1, 2),
                attn_mask=mask,
                dropout_p=dropout if module.training else 0.0,
                scale=scaling,
                enable_gqa=key.shape[1] != heads,
            )
            outputs.append(out.transpose(1, 2)[part["q_valid"]])
        # Every real token is the query of exactly one virtual sequence: one copy puts them back in row order.
        rows = query.new_zeros(batch * width, heads, dim).index_copy(0, segments["q_flat"], torch.cat(outputs).to(query.dtype))
        return rows.reshape(batch, width, heads, dim), None

    return attention


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for original, name in _ORIGINAL.items():
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
    prefixes: list[tuple[list[int], list[int], list[int], list[int]]] = []
    completions: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for base, g in zip(bases, groups):
        n = len(g.prefix)
        if n:
            prefixes.append((list(range(base, base + n)), list(range(n)), list(range(base, base + n)), list(range(n))))
        start = n
        for completion in g.completions:
            own = list(range(base + start, base + start + len(completion)))
            own_at = list(range(n, n + len(completion)))
            completions.append((own, own_at, list(range(base, base + n)) + own, list(range(n)) + own_at))
            start += len(completion)
    parts = [_part(chunk) for sequences in (prefixes, completions) for chunk in _similar(sequences)]
    return {"parts": parts, "q_flat": torch.cat([part["q_flat"] for part in parts])}


def _similar(sequences: list, waste: float = 0.5) -> list[list]:
    """Virtual sequences in chunks of similar sizes, so that padding each chunk to its widest computes at most
    `waste` more than its sequences need (one long completion would otherwise pad every other one)."""
    ordered = sorted(sequences, key=lambda s: (len(s[2]), len(s[0])), reverse=True)
    chunks: list[list] = []
    for sequence in ordered:
        if chunks:
            chunk = chunks[-1] + [sequence]
            padded = len(chunk) * max(len(s[0]) for s in chunk) * max(len(s[2]) for s in chunk)
            if padded <= (1 + waste) * sum(len(s[0]) * len(s[2]) for s in chunk):
                chunks[-1] = chunk
                continue
        chunks.append([sequence])
    return chunks


def _part(sequences: list[tuple[list[int], list[int], list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Index tensors and the mask of virtual sequences (query tokens, their positions, key tokens, theirs)."""
    count = len(sequences)
    q_width, k_width = max(len(s[0]) for s in sequences), max(len(s[2]) for s in sequences)
    q_index = torch.zeros(count, q_width, dtype=torch.long)
    k_index = torch.zeros(count, k_width, dtype=torch.long)
    q_valid = torch.zeros(count, q_width, dtype=torch.bool)
    q_at = torch.full((count, q_width), -1, dtype=torch.long)
    k_at = torch.full((count, k_width), 1 << 40, dtype=torch.long)  # padded keys are never seen
    for i, (queries, query_pos, keys, key_pos) in enumerate(sequences):
        q_index[i, : len(queries)] = torch.tensor(queries)
        k_index[i, : len(keys)] = torch.tensor(keys)
        q_valid[i, : len(queries)] = True
        q_at[i, : len(queries)] = torch.tensor(query_pos)
        k_at[i, : len(keys)] = torch.tensor(key_pos)
    mask = (k_at[:, None, :] <= q_at[:, :, None]).unsqueeze(1)  # [sequences, 1, queries, keys]
    mask[:, 0, :, 0] |= ~q_valid  # a padded query row sees one key: no softmax over nothing
    return {"q_index": q_index, "k_index": k_index, "q_valid": q_valid, "q_flat": q_index[q_valid],
            "mask": mask, "q_at": q_at, "k_at": k_at}


def attention_is_segmented(model) -> bool:
    inner = model.module if hasattr(model, "module") and not hasattr(model, "config") else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    return getattr(base.config, "_attn_implementation", None) in _ORIGINAL.values()


def disable(rm) -> None:
    """Back to the attention the model was loaded with (after `enable`)."""
    base = rm.model.get_base_model() if hasattr(rm.model, "get_base_model") else rm.model
    for original, name in _ORIGINAL.items():
        if base.config._attn_implementation == name:
            base.config._attn_implementation = original


def enable(rm) -> bool:
    """Switch a decoder from SDPA to segment attention if it gives the 4D mask's rewards on a probe batch.

    Returns False (and leaves the model as it was) for other attention implementations, for models whose
    forward does not hand extra keywords to its attention layers, and for attention this cannot compute.
    """
    from accelerate.utils import send_to_device

    from rmtrain.batching import collate_shared_prefix
    from rmtrain.data import Group
    from rmtrain.model import sequence_rewards

    model = rm.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    original = getattr(config, "_attn_implementation", None)
    if original in _ORIGINAL.values():
        return True
    if original not in _ORIGINAL:
        return False
    register()
    head = rm.head
    probe = [Group.of(0, [[3, 5, 7, 11], [3, 5, 13], [3, 5, 7, 2]], [(0, 1)]), Group.of(1, [[17, 19], [17, 23, 29, 31], [17, 37]], [])]
    batch = collate_shared_prefix(probe, pad_token_id=0, mask_format="bool")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = sequence_rewards(model, head, False, batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["reward_index"])
            config._attn_implementation = _ORIGINAL[original]
            packed = send_to_device(collate_shared_prefix(probe, pad_token_id=0, mask_format="segments"), device)
            got = sequence_rewards(model, head, False, packed["input_ids"], None, packed["position_ids"], packed["reward_index"], packed["segments"])
        ok = torch.allclose(got.float(), reference.float(), atol=1e-4, rtol=1e-3)
    except (UnsupportedAttention, TypeError, RuntimeError):
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        config._attn_implementation = original
    return ok
