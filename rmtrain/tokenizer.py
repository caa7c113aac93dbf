"""The tokenizer side: loading it, the chat template, the pad token, and the token format saved with a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rmtrain.config import ModelConfig
from rmtrain.errors import ModelError

# Written next to a saved model: how rmtrain turned text into ids, so eval/score reproduce it exactly.
FORMAT_FILE = "rmtrain_format.json"


@dataclass
class TokenFormat:
    """How text becomes token ids for one model; saved with the model so eval/score reproduce it."""

    append_eos: str | None
    """EOS token appended to standard text that does not end with it (decoders only)."""
    pad_token_id: int
    is_encoder: bool
    eos_in_tokenizer: str | None = None
    """The EOS the tokenizer's post-processor appends itself (an exported folder, rmtrain.export): a text that ends
    with it already keeps one, as with `append_eos`."""

    def to_dict(self) -> dict[str, Any]:
        return {"append_eos": self.append_eos, "pad_token_id": self.pad_token_id, "is_encoder": self.is_encoder}


def ends_in_eos(text: str, eos: str) -> bool:
    """The one rule for a text that already ends with the EOS (whitespace after it, as a chat template writes, counted
    as its end): no second one is added, by rmtrain or by an exported folder's tokenizer."""
    return text.rstrip().endswith(eos)


def save_format(directory: str | Path, fmt: TokenFormat, max_length: int, **extra: Any) -> None:
    payload = fmt.to_dict() | {"max_length": max_length} | extra
    Path(directory, FORMAT_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def read_format(directory: Path) -> dict[str, Any]:
    """The saved format of a folder, or {} for a folder written by plain transformers."""
    path = directory / FORMAT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_tokenizer(mc: ModelConfig, is_encoder: bool):
    from transformers import AutoTokenizer

    # A bad template file fails before the tokenizer is loaded.
    chat_template = read_chat_template(mc.chat_template_path) if mc.chat_template_path else None
    tokenizer = AutoTokenizer.from_pretrained(mc.name_or_path, **mc.source_kwargs())
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if mc.eos_token:
        if mc.eos_token not in tokenizer.get_vocab():
            raise ModelError(f"model.eos_token: {mc.eos_token!r} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = mc.eos_token
    tokenizer.pad_token = choose_pad_token(tokenizer, mc.pad_token, is_encoder)
    tokenizer.padding_side = "right"
    return tokenizer


def read_chat_template(path: str) -> str:
    source = Path(path)
    if source.is_file():
        try:
            template = source.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ModelError(
                f"model.chat_template_path: {path} is not UTF-8 text, so neither a Jinja file nor a tokenizer folder"
            ) from None
        check_chat_template(template, path)
        return template
    if source.is_dir():
        from transformers import AutoTokenizer

        try:
            template = AutoTokenizer.from_pretrained(str(source)).chat_template
        except Exception:  # transformers raises many types here; what matters is that it found no tokenizer
            raise ModelError(
                f"model.chat_template_path: {path} is a folder but holds no tokenizer transformers can load; "
                "give a Jinja chat template file or a tokenizer folder"
            ) from None
        if not template:
            raise ModelError(
                f"model.chat_template_path: the tokenizer in {path} has no chat template; give one that has, or a Jinja file"
            )
        return template
    raise ModelError(f"model.chat_template_path: {path}: no such file or folder (expected a Jinja file or a tokenizer folder)")


def check_chat_template(template: str, path: str) -> None:
    """A Jinja file that compiles the way apply_chat_template compiles it, and renders `messages`."""
    import jinja2
    import jinja2.meta

    try:
        try:
            # The environment apply_chat_template uses (its extensions, e.g. {% generation %}, parse).
            from transformers.utils.chat_template_utils import _compile_jinja_template

            environment = _compile_jinja_template(template).environment
        except ImportError:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            environment = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        variables = jinja2.meta.find_undeclared_variables(environment.parse(template))
    except jinja2.TemplateSyntaxError as error:
        raise ModelError(
            f"model.chat_template_path: {path}: line {error.lineno}: not a valid Jinja template ({error.message}); "
            "fix the template, or give a tokenizer folder whose chat template to use"
        ) from None
    if "messages" not in variables:
        raise ModelError(
            f"model.chat_template_path: {path} is not a chat template (it never reads 'messages'); "
            "give a Jinja chat template file or a tokenizer folder"
        )


def choose_pad_token(tokenizer, requested: str | None, is_encoder: bool) -> str:
    """A pad token that never stands for a real token of a decoder's input.

    transformers' decoder heads read the reward at the rightmost token that is not `pad_token_id`; with
    pad == eos (SmolLM2, Llama) the appended EOS would be skipped once the folder is reloaded. rmtrain
    itself reads the last real token from the attention mask, but the saved folder must agree with it.
    """
    vocab = tokenizer.get_vocab()
    if requested is not None:
        if requested not in vocab:
            raise ModelError(f"model.pad_token: {requested!r} is not in the tokenizer's vocabulary")
        if not is_encoder and requested in (tokenizer.eos_token, tokenizer.bos_token):
            raise ModelError(
                f"model.pad_token: {requested!r} is also the EOS/BOS token; pick a token the data never uses "
                "so that plain transformers reads the reward at the same token as rmtrain"
            )
        return requested
    current = tokenizer.pad_token
    if is_encoder:
        if current is None:
            raise ModelError("model.pad_token: the tokenizer has no pad token; set one from its vocabulary")
        return current
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    if current is not None and current not in taken:
        return current
    template = tokenizer.chat_template or ""
    preferred = ["<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<unk>"]
    specials = [t for t in preferred if t in vocab] + sorted(
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if str(t) not in preferred
    )
    for token in specials:
        if token not in taken and token not in template:
            return token
    raise ModelError(
        "model.pad_token: the tokenizer's pad token is its EOS/BOS token and no spare special token was found; "
        "set model.pad_token to a token your data never uses"
    )


def special_token_frame(tokenizer) -> tuple[int, int]:
    """How many special tokens the tokenizer puts before and after plain text (e.g. BERT: [CLS] / [SEP])."""
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return start, len(full) - start - len(bare)
    return 0, 0
