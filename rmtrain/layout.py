"""How a model computes a batch, chosen once per model: the batch layout (plain rows, one packed row, or shared-prefix
rows, rmtrain.batching) and, for a shared prefix, segment attention (rmtrain.attention: each sequence attended on
its own, switched on only after a probe on the model itself gives the 4D mask's rewards) or the 4D mask.

Above batching and the model: it collates a probe batch and runs the model; neither of them looks back up here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from accelerate.utils import send_to_device

from rmtrain import attention
from rmtrain.batching import collate_shared_prefix
from rmtrain.errors import ResourceError
from rmtrain.faults import is_out_of_memory
from rmtrain.groups import Group
from rmtrain.model import batch_rewards


class Layout(NamedTuple):
    name: str
    """"plain", "packed" or "shared_prefix" (rmtrain.batching)."""
    mask_format: str
    """"segments" (segment attention), "bool" (a 4D mask for SDPA) or "float" (an additive one for eager attention)."""
    note: str | None = None
    """What could not be honoured of what was asked, for the console."""


def choose_layout(rm, share_prefix: bool, padding_free: bool, prefix_attention: str = "segments") -> Layout:
    """The layout, its mask format, and a note when a request could not be honoured.

    The shared prefix of a decoder is computed by segment attention when it is asked for and gives the 4D mask's
    rewards on this model, else with the 4D mask (sdpa or eager attention), else not at all (other attention
    implementations take no custom masks). Packed rows (`padding_free`) go to flash attention's varlen kernels, or
    to segment attention under sdpa (transformers would build a dense [tokens x tokens] mask for a packed row).
    """
    if rm.fmt.is_encoder:
        # Bidirectional attention: a shared prefix would see every answer; BERT-like models have no
        # packed-sequence masks in transformers. Length grouping still removes most padding.
        note = "encoder model: shared prefix and padding-free do not apply, using padded batches" if (share_prefix or padding_free) else None
        return Layout("plain", "bool", note)
    disable_segments(rm)  # a model this process switched before starts from its own attention again
    attn = getattr(trunk_configs(rm)[0], "_attn_implementation", None) or "eager"
    if not share_prefix:
        if not padding_free:
            return Layout("plain", "bool")
        if attn.startswith("flash"):
            return Layout("packed", "bool")
        if enable_segments(rm):
            return Layout("packed", "segments")
        return Layout("plain", "bool", f"padding_free: attention '{attn}' would get a dense [tokens x tokens] mask for each packed "
                                       "row; using padded batches (flash_attention_2 or sdpa attention packs)")
    if prefix_attention == "segments" and enable_segments(rm):
        return Layout("shared_prefix", "segments")
    if attn in ("sdpa", "eager"):
        note = "shared prefix: segment attention did not give the 4D mask's rewards on this model, using the mask" if prefix_attention == "segments" else None
        return Layout("shared_prefix", "bool" if attn == "sdpa" else "float", note)
    fallback = "packed" if padding_free else "plain"
    return Layout(fallback, "bool", f"attention '{attn}' takes no custom masks: shared prefix off, using {fallback} batches")


def trunk_configs(rm) -> list:
    """The transformers configs whose attention a layout switches: the model's, or each member's of an ensemble
    (members that are adapters on one base share it)."""
    models = [m.model for m in rm.members] if rm.members else [rm.model]
    return list({id(c): c for c in (attention.transformers_model(m).config for m in models)}.values())


def disable_segments(rm) -> None:
    """Back to the attention the model was loaded with (after `enable_segments`)."""
    for config in trunk_configs(rm):
        for original, name in attention.ORIGINAL.items():
            if config._attn_implementation == name:
                config._attn_implementation = original


def enable_segments(rm) -> bool:
    """Switch a decoder from SDPA to segment attention if it gives the 4D mask's rewards on a probe batch.

    Returns False (and leaves the model as it was) for other attention implementations, for models whose
    forward does not take the segments keyword or does not hand it to its attention layers (the rewards then
    differ), and for attention this cannot compute. Any other failure of the probe is a bug, and is raised.
    """
    model = rm.model
    configs = trunk_configs(rm)
    original = getattr(configs[0], "_attn_implementation", None)
    if original in attention.ORIGINAL.values():
        return True
    if original not in attention.ORIGINAL or any(getattr(c, "_attn_implementation", None) != original for c in configs):
        return False
    attention.register()
    probe = [Group.of(0, [[3, 5, 7, 11], [3, 5, 13], [3, 5, 7, 2]], [(0, 1)]), Group.of(1, [[17, 19], [17, 23, 29, 31], [17, 37]], [])]
    device = next(model.parameters()).device
    masked = send_to_device(collate_shared_prefix(probe, pad_token_id=0, mask_format="bool"), device)
    segmented = send_to_device(collate_shared_prefix(probe, pad_token_id=0, mask_format="segments"), device)
    was_training = model.training
    model.eval()
    ok = False
    try:
        with torch.no_grad():
            reference = batch_rewards(model, rm, masked)
            for config in configs:
                config._attn_implementation = attention.ORIGINAL[original]
            got = batch_rewards(model, rm, segmented)
        ok = torch.allclose(got, reference, **probe_tolerance(rm, reference))
    except attention.UnsupportedAttention:
        pass
    except TypeError as error:
        if attention.KEYWORD not in str(error):  # a forward without **kwargs refuses the keyword: expected; anything else is not
            raise
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise ResourceError(
            "out of memory in the first forward of the model (checking segment attention on two short rows): "
            "the model alone does not fit this device; use a smaller model, a device with more memory, or LoRA"
        ) from None
    finally:
        model.train(was_training)
        if not ok:
            for config in configs:
                config._attn_implementation = original
    return ok


def probe_tolerance(rm, reference: torch.Tensor) -> dict[str, float]:
    """How close the probe's rewards must be: summed in another order, fp32 rewards agree to ~1e-6; bf16 ones to
    about bf16's resolution per layer. A model that ignores the segments is off by the reward's own size."""
    low_precision = rm.autocast_dtype is not None or next(rm.model.parameters()).dtype in (torch.bfloat16, torch.float16)
    if not low_precision:
        return {"atol": 1e-4, "rtol": 1e-3}
    return {"atol": 0.05 * max(float(reference.abs().max()), 1e-2), "rtol": 0.05}
