"""Reward read-out: last real token from the attention mask (left/right padding, pad == eos); encoders
keep their own pooling; pad token choice keeps saved folders right under plain transformers."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rmtrain.config import LoraConfig, ModelConfig
from rmtrain.budget import activation_bytes_per_token, auto_tokens_per_forward
from rmtrain.errors import ModelError
from rmtrain.model import load_reward_model, sequence_rewards
from rmtrain.tokenizer import choose_pad_token


def pad(seqs, pad_id, side):
    width = max(len(s) for s in seqs)
    ids, mask = [], []
    for s in seqs:
        fill = [pad_id] * (width - len(s))
        ids.append(s + fill if side == "right" else fill + s)
        mask.append([1] * len(s) + [0] * len(fill) if side == "right" else [0] * len(fill) + [1] * len(s))
    return torch.tensor(ids), torch.tensor(mask)


@pytest.fixture(scope="module")
def qwen_rm(tiny_qwen3):
    return load_reward_model(ModelConfig(name_or_path=tiny_qwen3))


@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_reward_is_last_real_token_with_any_padding(qwen_rm, side):
    tok = qwen_rm.tokenizer
    seqs = [tok(t + tok.eos_token)["input_ids"] for t in ("short", "a somewhat longer text here", "mid length")]
    alone = torch.stack([
        sequence_rewards(qwen_rm.model, qwen_rm.head, False, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0]
        for s in seqs
    ])
    # pad == eos on purpose: the read-out must not search for the pad id.
    ids, mask = pad(seqs, tok.eos_token_id, side)
    with torch.no_grad():
        batched = sequence_rewards(qwen_rm.model, qwen_rm.head, False, ids, mask)
    assert torch.allclose(batched, alone.detach(), atol=1e-5)


def test_transformers_own_pooling_agrees_when_pad_is_distinct(qwen_rm):
    tok = qwen_rm.tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    enc = tok(["one<|im_end|>", "two three four<|im_end|>"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = sequence_rewards(qwen_rm.model, qwen_rm.head, False, enc.input_ids, enc.attention_mask)
        theirs = qwen_rm.model(**enc).logits
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_encoder_keeps_cls_pooling(minilm):
    rm = load_reward_model(ModelConfig(name_or_path=minilm))
    assert rm.fmt.is_encoder and rm.fmt.append_eos is None and rm.head_name == "classifier"
    enc = rm.tokenizer(["good", "a much longer answer"], padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1)
    plain.load_state_dict(rm.model.state_dict())
    plain.eval()
    rm.model.eval()
    with torch.no_grad():
        assert torch.allclose(sequence_rewards(rm.model, rm.head, True, enc.input_ids, enc.attention_mask), plain(**enc).logits, atol=1e-6)


def test_pad_equal_to_eos_is_replaced_by_a_spare_special_token(smollm2):
    path, gguf = smollm2
    tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert choose_pad_token(tok, None, is_encoder=False) == "<|endoftext|>"
    with pytest.raises(ModelError, match="model.pad_token: '<|im_end|>' is also the EOS/BOS token"):
        choose_pad_token(tok, "<|im_end|>", is_encoder=False)
    with pytest.raises(ModelError, match="not in the tokenizer's vocabulary"):
        choose_pad_token(tok, "<nope>", is_encoder=False)


def test_lora_trains_adapters_and_the_score_head(tiny_qwen3):
    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3), LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    trainable = [n for n, p in rm.model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    assert any(n.endswith("score.modules_to_save.default.weight") for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)


def test_chat_template_path_takes_a_jinja_file_or_a_tokenizer_folder(tiny_qwen3, minilm, tmp_path):
    """The positive side of the chat_template_path cases in tests/test_errors.py: a real template passes the check."""
    from rmtrain.tokenizer import load_tokenizer

    template_file = Path(tiny_qwen3) / "chat_template.jinja"
    from_file = load_tokenizer(ModelConfig(name_or_path=minilm, chat_template_path=str(template_file)), is_encoder=True)
    from_folder = load_tokenizer(ModelConfig(name_or_path=minilm, chat_template_path=tiny_qwen3), is_encoder=True)
    assert from_file.chat_template == from_folder.chat_template == template_file.read_text()
    messages = [{"role": "user", "content": "hi"}]
    assert "<|im_start|>user\nhi<|im_end|>" in from_file.apply_chat_template(messages, tokenize=False)


def test_auto_tokens_per_forward_from_the_real_minilm_config(minilm):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(minilm)  # 6 layers, hidden 384, intermediate 1536
    cpu = torch.device("cpu")
    # Per layer and token 8 * 384 + 4 * 1536 = 9216 floats; 6 layers in fp32: 221,184 bytes;
    # 0.5 GiB / 221,184 = 2427 tokens, the power of two below: 2048.
    assert activation_bytes_per_token(config, 4, gradient_checkpointing=False) == 4 * 6 * 9216
    assert auto_tokens_per_forward(config, False, False, cpu)[0] == 2048
    # Checkpointed: each layer's input (6 * 384) plus one layer recomputed (9216): 46,080 bytes -> 11,650 -> 8192.
    assert activation_bytes_per_token(config, 4, gradient_checkpointing=True) == 4 * (6 * 384 + 9216)
    assert auto_tokens_per_forward(config, False, True, cpu)[0] == 8192
    # bf16 halves the bytes: twice the tokens. A config without the sizes gets a stated fixed budget.
    assert auto_tokens_per_forward(config, True, False, cpu)[0] == 4096
    tokens, note = auto_tokens_per_forward(object(), False, False, cpu)
    assert tokens == 8192 and "no hidden_size/num_hidden_layers" in note


def test_accelerator_budget_leaves_out_what_the_training_state_holds():
    from rmtrain.budget import accelerator_activation_budget, held_bytes

    gib = 2**30
    # 80 GiB, a full fine-tune of 0.6B parameters: 16 bytes each (fp32 weight, gradient, two AdamW moments) = 8.9 GiB;
    # a quarter of the 71.1 GiB left.
    assert accelerator_activation_budget(80 * gib, 600_000_000 * 16) == (80 * gib - 600_000_000 * 16) // 4
    # A training state larger than the device (it would not fit anyway): small passes, not a refusal.
    assert accelerator_activation_budget(80 * gib, 200 * gib) == 80 * gib // 64
    # Trainable parameters count 16 bytes, frozen ones their own size, over the shards.
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10).to(torch.bfloat16).requires_grad_(False))
    assert held_bytes(model) == 110 * 16 + 110 * 2
    assert held_bytes(model, shards=2) == (110 * 16 + 110 * 2) // 2


def test_inference_budget_keeps_a_prompt_and_its_completions_in_one_pass(minilm, smollm2):
    """Inference takes training's estimate without checkpointing, at least 2048 tokens: SmolLM2 in fp32 (30 layers,
    hidden 576, intermediate 1536: 4 * 30 * (8 * 576 + 4 * 1536) = 1,290,240 bytes a token) would get 416 -> 256
    tokens, which cuts a served group of 8 HH answers into chunks that each compute the prompt again."""
    from transformers import AutoConfig

    from rmtrain.budget import INFERENCE_MIN_TOKENS, inference_tokens_per_forward

    path, gguf = smollm2
    cpu = torch.device("cpu")
    config = AutoConfig.from_pretrained(path, gguf_file=gguf)
    assert activation_bytes_per_token(config, 4, gradient_checkpointing=False) == 1_290_240
    assert auto_tokens_per_forward(config, False, False, cpu)[0] == 256
    tiny = torch.nn.Linear(1, 1)
    tiny.config = config
    assert inference_tokens_per_forward(tiny, cpu) == INFERENCE_MIN_TOKENS == 2048
    tiny.config = AutoConfig.from_pretrained(minilm)
    assert inference_tokens_per_forward(tiny, cpu) == 2048  # MiniLM's own estimate, unchanged


def test_activation_offloading_reaches_the_checkpointed_layers_inputs(tiny_qwen3):
    """With gradient checkpointing (non-reentrant, as rmtrain enables it) what a layer keeps for the backward is its
    input; torch's checkpoint saves that input as a saved tensor, so `train.activation_offloading` (save_on_cpu's
    saved-tensor hooks) moves it to the CPU: every decoder layer's input goes through the hooks."""
    from rmtrain.config import ModelConfig

    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3), None, gradient_checkpointing=True)
    rm.model.train()
    layer_inputs = []
    for layer in rm.model.model.layers:
        layer.register_forward_pre_hook(lambda _m, args, kwargs: layer_inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    ids = torch.randint(100, 20000, (2, 48))
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        rm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
    first = layer_inputs[: rm.model.config.num_hidden_layers]  # the forward's (the recomputation runs them again)
    assert len(first) == rm.model.config.num_hidden_layers >= 2
    assert all(any(t is saved for saved in packed) for t in first)


def test_segment_attention_is_recognised_through_an_engine_with_a_config_of_its_own(tiny_qwen3):
    """A DeepSpeedEngine wraps the model as `.module` and has a `.config` of its own (DeepSpeed's dict): the check that
    a shared-prefix batch may go without a mask reads the transformers model inside, as DDP's wrapper is read."""
    from rmtrain import attention
    from rmtrain.layout import choose_layout
    from rmtrain.config import ModelConfig

    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3))
    assert choose_layout(rm, share_prefix=True, padding_free=False)[1] == "segments"

    class Engine(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.config = module, {"zero_optimization": {"stage": 2}}

    assert attention.attention_is_segmented(Engine(rm.model))
    assert attention.transformers_model(Engine(rm.model)) is rm.model
