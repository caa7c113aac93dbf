"""Attention of the shared-prefix layout, computed per sequence instead of over a masked square.

A shared-prefix row holds `prefix + c_1 + ... + c_K`; each completion may see the prefix and itself. A 4D
mask gets that right, but attention kernels still compute every masked-out block: (P + K C)^2 scores per
row where the sequences need K (P + C) C. Here every completion is one short "virtual sequence" (its
queries against the prefix's and its own keys, gathered from the row) and the first also carries the
prefix's queries, so nothing masked is computed, while the projections and MLPs still run once per token.

It is registered with transformers' attention interface under `NAME`, and it reads the layout from the
`rmtrain_segments` keyword that rmtrain passes to the model's forward (transformers forwards extra keywords
to the attention function of every layer). Without it, a batch goes to the model's own SDPA or eager
attention. `enable` switches a model to it only after checking, on the model itself, that a tiny
shared-prefix batch gives the same rewards as the 4D mask.
"""

from __future__ import annotations

import sys

import torch
from torch.nn import functional as F

NAME = "rmtrain_shared_prefix"
KEYWORD = "rmtrain_segments"
_ORIGINAL = {"sdpa": NAME, "eager": NAME + "_eager"}


class UnsupportedAttention(RuntimeError):
    """The layer asks for something virtual sequences do not compute (soft-capping, attention sinks)."""


def _fallback(module, original: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if original == "eager":
        return getattr(sys.modules[type(module).__module__], "eager_attention_forward", sdpa_attention_forward)
    return sdpa_attention_forward


def _attention(original: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        segments = kwargs.pop(KEYWORD, None)
        if segments is None:
            return _fallback(module, original)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
            raise UnsupportedAttention(f"{type(module).__name__}: soft-capped or sink attention")
        batch, heads, width, dim = query.shape
        kv_heads = key.shape[1]
        flat = lambda states: states.transpose(1, 2).reshape(batch * width, states.shape[1], dim)  # noqa: E731
        q, k, v = flat(query), flat(key), flat(value)
        mask = segments["mask"]
        window = kwargs.get("sliding_window")
        if window:  # a sliding-window layer: only the last `window` positions
            mask = mask & (segments["q_at"][:, None, :, None] - segments["k_at"][:, None, None, :]).lt(window)
        out = F.scaled_dot_product_attention(
            q[segments["q_index"]].transpose(1, 2),
            k[segments["k_index"]].transpose(1, 2),
            v[segments["k_index"]].transpose(1, 2),
            attn_mask=mask,
            dropout_p=dropout if module.training else 0.0,
            scale=scaling,
            enable_gqa=kv_heads != heads,
        )
        # Every real token is the query of exactly one virtual sequence; padding positions stay zero.
        out = out.transpose(1, 2)[segments["q_valid"]]
        rows = query.new_zeros(batch * width, heads, dim).index_copy(0, segments["q_flat"], out.to(query.dtype))
        return rows.reshape(batch, width, heads, dim), None

    return attention


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for original, name in _ORIGINAL.items():
        AttentionInterface.register(name, _attention(original))
        # Batches without segments (a plain layout) still get the mask their original attention expects.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])


def segments(groups, width: int) -> dict[str, torch.Tensor]:
    """The virtual sequences of a shared-prefix batch whose rows are `width` tokens wide (see collate_shared_prefix).

    Completion i of a group: keys are the prefix and its own tokens; queries are its own tokens (and, for
    the first completion, the prefix's too). A query sees the keys at positions up to its own.
    """
    queries, keys, query_pos, key_pos = [], [], [], []
    for row, g in enumerate(groups):
        base, n = row * width, len(g.prefix)
        start = n
        for i, completion in enumerate(g.completions):
            own = range(start, start + len(completion))
            keys.append([base + t for t in range(n)] + [base + t for t in own])
            key_pos.append(list(range(n + len(completion))))
            if i == 0:
                queries.append(keys[-1])
                query_pos.append(key_pos[-1])
            else:
                queries.append([base + t for t in own])
                query_pos.append(list(range(n, n + len(completion))))
            start += len(completion)
    count, q_width, k_width = len(queries), max(map(len, queries)), max(map(len, keys))
    q_index = torch.zeros(count, q_width, dtype=torch.long)
    k_index = torch.zeros(count, k_width, dtype=torch.long)
    q_valid = torch.zeros(count, q_width, dtype=torch.bool)
    q_at = torch.full((count, q_width), -1, dtype=torch.long)
    k_at = torch.full((count, k_width), 1 << 40, dtype=torch.long)  # padded keys are never seen
    for s in range(count):
        q_index[s, : len(queries[s])] = torch.tensor(queries[s])
        k_index[s, : len(keys[s])] = torch.tensor(keys[s])
        q_valid[s, : len(queries[s])] = True
        q_at[s, : len(queries[s])] = torch.tensor(query_pos[s])
        k_at[s, : len(keys[s])] = torch.tensor(key_pos[s])
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
    """Switch a decoder from SDPA/eager to segment attention if it gives the 4D mask's rewards on a probe batch.

    Returns False (and leaves the model as it was) for other attention implementations, for models whose
    forward does not hand extra keywords to its attention layers, and for attention this cannot compute.
    """
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
    probe = [Group.of(0, [[3, 5, 7, 11], [3, 5, 13]], [(0, 1)]), Group.of(1, [[17, 19], [17, 23, 29, 31], [17, 37]], [])]
    batch = collate_shared_prefix(probe, pad_token_id=0, mask_format="bool" if original == "sdpa" else "float")
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = sequence_rewards(model, head, False, batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["reward_index"])
            config._attn_implementation = _ORIGINAL[original]
            segmented = segments(probe, batch["input_ids"].shape[1])
            segmented = {k: v.to(device) for k, v in segmented.items()}
            got = sequence_rewards(model, head, False, batch["input_ids"], None, batch["position_ids"], batch["reward_index"], segmented)
        ok = torch.allclose(got.float(), reference.float(), atol=1e-4, rtol=1e-3)
    except (UnsupportedAttention, TypeError, RuntimeError):
        ok = False
    finally:
        model.train(was_training)
    if not ok:
        config._attn_implementation = original
    return ok
