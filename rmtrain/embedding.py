"""Only the input-embedding rows the training data uses go to the optimizer (`train.embedding_rows: seen`)."""

from __future__ import annotations

import torch
from torch import nn


class SeenRowsEmbedding(nn.Module):
    """An input embedding whose rows of `seen_ids` are one trainable parameter, read over a frozen copy of
    the whole table (which unseen tokens, such as new words in eval data, keep reading).

    With weight decay 0, full AdamW leaves a row exactly unchanged while it has never had a gradient (zero
    moments give a zero update), and a row whose token never occurs in the training data never has one. So
    training only the seen rows is the same training, while the optimizer step, the gradient clipping and the
    embedding backward touch a fraction of the table (for small models with large vocabularies, most of the
    weights).
    """

    def __init__(self, embedding: nn.Embedding, seen_ids: torch.Tensor):
        super().__init__()
        weight = embedding.weight.detach()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = embedding.padding_idx
        # Parameters, not buffers: DDP would broadcast buffers from rank 0 before every forward.
        self.frozen = nn.Parameter(weight, requires_grad=False)
        self.seen_weight = nn.Parameter(weight[seen_ids].clone())
        self.seen_ids = seen_ids
        self.row_of = torch.full((self.num_embeddings,), -1, dtype=torch.long)
        self.row_of[seen_ids] = torch.arange(len(seen_ids))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.row_of.device != input_ids.device:
            self.row_of = self.row_of.to(input_ids.device)
        rows = self.row_of[input_ids]
        seen = (rows >= 0).unsqueeze(-1)
        # Unseen tokens (eval data, padding) read the frozen table; no branch, so no host sync on a GPU.
        trained = nn.functional.embedding(rows.clamp(min=0), self.seen_weight)
        return torch.where(seen, trained, nn.functional.embedding(input_ids, self.frozen))

    def full_embedding(self) -> nn.Embedding:
        """A plain nn.Embedding holding the trained rows, for saving."""
        weight = self.frozen.detach().clone()
        weight[self.seen_ids.to(weight.device)] = self.seen_weight.detach().to(weight.dtype)
        # from_pretrained wraps the weight as it is (no second, randomly initialised vocab x dim table first).
        return nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=self.padding_idx)


def train_seen_rows_only(model: nn.Module, token_ids: torch.Tensor, weight_decay: float) -> str | None:
    """Replace the input embedding by a `SeenRowsEmbedding` over `token_ids` (every id the training batches
    can hold). Returns the pre-flight note (with weight decay: that every row stays optimized), or None when it
    does not apply (frozen or tied embedding, a subclass of nn.Embedding with its own forward, no row to spare)."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or not embedding.weight.requires_grad:
        return None
    if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is embedding.weight:
        return None
    total = embedding.num_embeddings
    if weight_decay != 0:
        return f"embedding: all {total:,} rows optimized (train.weight_decay moves rows without gradients too)"
    seen_ids = torch.unique(token_ids)
    if embedding.padding_idx is not None:  # that row never gets a gradient
        seen_ids = seen_ids[seen_ids != embedding.padding_idx]
    if len(seen_ids) >= total:
        return None
    model.set_input_embeddings(SeenRowsEmbedding(embedding, seen_ids))
    return (
        f"embedding: {len(seen_ids):,} of {total:,} rows occur in the training data and are optimized; "
        "the others would get exactly zero updates (train.embedding_rows: all optimizes them anyway)"
    )


def seen_rows_count(model: nn.Module) -> int | None:
    """Rows `train_seen_rows_only` gave the optimizer, or None when all are trained (or none)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return len(embedding.seen_ids) if isinstance(embedding, SeenRowsEmbedding) else None


def restore_full_embedding(model: nn.Module) -> None:
    """Undo `train_seen_rows_only`: a plain nn.Embedding with the trained rows, so the model saves as usual."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, SeenRowsEmbedding):
        model.set_input_embeddings(embedding.full_embedding())


def plain_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` of `model` with each SeenRowsEmbedding written as the plain `weight` of the table it
    replaced, so a checkpoint taken mid-training saves as a plain model (the model itself is not changed)."""
    for name, module in model.named_modules():
        if isinstance(module, SeenRowsEmbedding):
            prefix = f"{name}." if name else ""
            merged = state_dict.pop(prefix + "frozen").clone()
            merged[module.seen_ids.to(merged.device)] = state_dict.pop(prefix + "seen_weight").to(merged.dtype)
            state_dict[prefix + "weight"] = merged
    return state_dict
