"""Rows -> tokenized pairs: every data shape, EOS handling, truncation, filtering, bad rows."""

import pytest

from rmtrain.config import ModelConfig
from rmtrain.config import DataSource
from rmtrain.groups import rust_tokenizer, token_ids_of, tokenize_rows, truncate_left
from rmtrain.errors import DataError
from rmtrain.sources import read_rows
from rmtrain.tokenizer import TokenFormat, load_tokenizer
from tests.conftest import read_jsonl


@pytest.fixture(scope="module")
def qwen_tok(tiny_qwen3):
    return load_tokenizer(ModelConfig(name_or_path=tiny_qwen3), is_encoder=False)


@pytest.fixture(scope="module")
def qwen_fmt(qwen_tok):
    return TokenFormat(append_eos=qwen_tok.eos_token, pad_token_id=qwen_tok.pad_token_id, is_encoder=False)


@pytest.fixture(scope="module")
def bert_tok(minilm):
    return load_tokenizer(ModelConfig(name_or_path=minilm), is_encoder=True)


def test_standard_implicit_prompt_gets_eos_on_decoders(qwen_tok, qwen_fmt):
    rows = [{"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go away"}]
    pairs, stats = tokenize_rows(rows, "t", qwen_tok, qwen_fmt, 64, "filter")
    ids = pairs[0].sequence(0)
    assert ids == qwen_tok("Q: hi A: hello" + "<|im_end|>")["input_ids"]
    assert ids[-1] == qwen_tok.eos_token_id
    assert stats.read == stats.kept == 1


def test_eos_not_appended_twice(qwen_tok, qwen_fmt):
    rows = [{"chosen": "yes<|im_end|>", "rejected": "no"}]
    pairs, _ = tokenize_rows(rows, "t", qwen_tok, qwen_fmt, 64, "filter")
    assert pairs[0].sequence(0).count(qwen_tok.eos_token_id) == 1
    assert pairs[0].sequence(1)[-1] == qwen_tok.eos_token_id


def test_standard_explicit_prompt_is_prompt_plus_completion(qwen_tok, qwen_fmt):
    rows = [{"prompt": "Q: 2+2? ", "chosen": "4", "rejected": "5", "margin": 1.5}]
    pairs, _ = tokenize_rows(rows, "t", qwen_tok, qwen_fmt, 64, "filter")
    assert pairs[0].sequence(0) == qwen_tok("Q: 2+2? 4<|im_end|>")["input_ids"]
    assert pairs[0].margins == [1.5]


def test_encoders_get_their_special_tokens_and_no_eos(bert_tok):
    fmt = TokenFormat(append_eos=None, pad_token_id=bert_tok.pad_token_id, is_encoder=True)
    pairs, _ = tokenize_rows([{"chosen": "good answer", "rejected": "bad answer"}], "t", bert_tok, fmt, 64, "filter")
    ids = pairs[0].sequence(0)
    assert ids[0] == bert_tok.cls_token_id and ids[-1] == bert_tok.sep_token_id
    assert ids == bert_tok("good answer")["input_ids"]


def test_conversational_implicit_and_explicit_prompt_render_the_same(qwen_tok, qwen_fmt):
    user = {"role": "user", "content": "Name a colour."}
    good, bad = {"role": "assistant", "content": "Blue."}, {"role": "assistant", "content": "No."}
    implicit = [{"chosen": [user, good], "rejected": [user, bad]}]
    explicit = [{"prompt": [user], "chosen": [good], "rejected": [bad]}]
    a, _ = tokenize_rows(implicit, "t", qwen_tok, qwen_fmt, 64, "filter")
    b, _ = tokenize_rows(explicit, "t", qwen_tok, qwen_fmt, 64, "filter")
    assert a[0].sequence(0) == b[0].sequence(0)
    want = qwen_tok.apply_chat_template([user, good], tokenize=True, return_dict=True)["input_ids"]
    assert a[0].sequence(0) == want
    text = qwen_tok.decode(a[0].sequence(0))
    assert text.endswith("<|im_start|>assistant\nBlue.<|im_end|>\n")


def test_truncate_left_keeps_frame_tokens_and_the_end():
    ids = [101, 1, 2, 3, 4, 5, 6, 102]
    assert truncate_left(ids, 5, head=1, tail=1) == [101, 4, 5, 6, 102]
    assert truncate_left(ids, 8, head=1, tail=1) == ids
    assert truncate_left([1, 2, 3, 4, 5], 3, 0, 0) == [3, 4, 5]


def test_filter_drops_long_pairs_and_truncate_keeps_them(qwen_tok, qwen_fmt, bert_tok):
    long = "word " * 50
    rows = [{"chosen": long + "yes", "rejected": "no"}, {"chosen": "a", "rejected": "b"}]
    kept, stats = tokenize_rows(rows, "t", qwen_tok, qwen_fmt, 16, "filter")
    assert len(kept) == 1 and stats.too_long == 1
    assert "1 dropped (longer than 16 tokens)" in stats.line("filter", 16)
    kept, stats = tokenize_rows(rows, "t", qwen_tok, qwen_fmt, 16, "truncate")
    assert len(kept) == 2 and stats.truncated == 1
    chosen = kept[0].sequence(0)
    assert len(chosen) == 16 and chosen[-1] == qwen_tok.eos_token_id
    assert qwen_tok.decode(chosen).endswith("word yes<|im_end|>")
    fmt = TokenFormat(append_eos=None, pad_token_id=bert_tok.pad_token_id, is_encoder=True)
    kept, _ = tokenize_rows(rows, "t", bert_tok, fmt, 16, "truncate")
    assert kept[0].sequence(0)[0] == bert_tok.cls_token_id and kept[0].sequence(0)[-1] == bert_tok.sep_token_id


def test_identical_pairs_are_dropped_and_counted(qwen_tok, qwen_fmt):
    rows = [{"chosen": "same", "rejected": "same"}, {"chosen": "a", "rejected": "b"}]
    kept, stats = tokenize_rows(rows, "t", qwen_tok, qwen_fmt, 64, "filter")
    assert len(kept) == 1 and stats.identical == 1
    assert "1 dropped (chosen == rejected)" in stats.line("filter", 64)


@pytest.mark.parametrize(
    "row, message",
    [
        # The other bad rows are cases of tests/test_errors.py, through the CLI.
        ({"chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "row 1: mixes plain strings and message lists"),
    ],
)
def test_bad_rows_are_named(qwen_tok, qwen_fmt, row, message):
    with pytest.raises(DataError) as info:
        tokenize_rows([row], "pairs.jsonl", qwen_tok, qwen_fmt, 64, "filter")
    assert message in str(info.value)
    assert str(info.value).startswith("pairs.jsonl: row 1")


def test_the_pad_token_is_refused_only_where_the_reward_is_read(qwen_tok, qwen_fmt):
    """Inside a text the pad token is a token as any other (transformers pools the last non-pad token); at the end of
    a decoder's sequence, where the reward is read, it would be skipped by that pooling: one line naming the row."""
    kept, _ = tokenize_rows([{"chosen": "a<|endoftext|>", "rejected": "b"}], "pairs.jsonl", qwen_tok, qwen_fmt, 64, "filter")
    assert qwen_tok.pad_token_id in kept[0].sequence(0)[:-1] and kept[0].sequence(0)[-1] == qwen_tok.eos_token_id
    no_eos = TokenFormat(append_eos=None, pad_token_id=qwen_tok.pad_token_id, is_encoder=False)
    with pytest.raises(DataError, match=r"^pairs.jsonl: row 1: ends in the pad token '<\|endoftext\|>', where the reward is read"):
        tokenize_rows([{"chosen": "a<|endoftext|>", "rejected": "b"}], "pairs.jsonl", qwen_tok, no_eos, 64, "filter")


def test_read_rows_columns_where_skip_limit(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(f'{{"q": "{i}", "good": "g", "bad": "b", "split": "{"e" if i % 2 else "t"}", "margin": 1}}\n' for i in range(10)))
    rows, _ = read_rows(DataSource(path=str(path), columns={"q": "prompt", "good": "chosen", "bad": "rejected", "margin": None}, where={"split": "t"}, skip=1, limit=2))
    assert [r["prompt"] for r in rows] == ["2", "4"]
    assert "margin" not in rows[0] and rows[0]["chosen"] == "g"


@pytest.mark.shared_data
@pytest.mark.parametrize(
    "file, explicit, conversational",
    [
        ("hh_harmless_test.jsonl", False, False),
        ("ultrafeedback_binarized_sample.jsonl", True, False),
        ("llamafactory_dpo_en_demo.jsonl", True, True),
    ],
)
def test_real_files_of_every_shape(shared_data, qwen_tok, qwen_fmt, file, explicit, conversational):
    rows = read_jsonl(shared_data / file, limit=40)
    assert ("prompt" in rows[0]) == explicit and isinstance(rows[0]["chosen"], list) == conversational
    pairs, stats = tokenize_rows(rows, file, qwen_tok, qwen_fmt, 4096, "filter")
    assert stats.read == 40 and len(pairs) + stats.identical == 40
    for pair in pairs:
        # Standard text ends with the appended EOS; ChatML renders "<|im_end|>\n" after the last turn.
        end = pair.sequence(0)[-2] if conversational else pair.sequence(0)[-1]
        assert end == qwen_tok.eos_token_id
        assert qwen_fmt.pad_token_id not in pair.sequence(0)
    if file.startswith("ultrafeedback"):
        assert all(p.margins is not None for p in pairs)


@pytest.mark.shared_data
def test_conversational_implicit_from_real_rows(shared_data, qwen_tok, qwen_fmt):
    rows = read_jsonl(shared_data / "llamafactory_dpo_en_demo.jsonl", limit=10)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    a, _ = tokenize_rows(rows, "x", qwen_tok, qwen_fmt, 4096, "filter")
    b, _ = tokenize_rows(implicit, "x", qwen_tok, qwen_fmt, 4096, "filter")
    assert [p.sequence(0) for p in a] == [p.sequence(0) for p in b]


@pytest.mark.parametrize("which", ["qwen", "bert"])
def test_token_ids_straight_from_rust_equal_the_transformers_call(which, qwen_tok, bert_tok, shared_data):
    tokenizer = {"qwen": qwen_tok, "bert": bert_tok}[which]
    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl")[:40]
    texts = [r["chosen"] for r in rows] + ["<|im_end|> café 🙂\n\n  x<|endoftext|>", "[CLS] a [SEP] b [PAD]", " ", "naïve\tZoë"]
    # MiniLM's tokenizer.json sets truncation and padding to 128 on the Rust side: the first call goes through
    # transformers, which clears them; from then on the fast path is the one taken.
    first = token_ids_of(texts[:3], True, tokenizer)
    assert first == tokenizer(texts[:3])["input_ids"] and max(len(ids) for ids in first) > 128
    assert rust_tokenizer(tokenizer) is not None
    for add_special in (True, False):
        assert token_ids_of(texts, add_special, tokenizer) == tokenizer(texts, add_special_tokens=add_special)["input_ids"]
    # Something set on the Rust tokenizer that transformers' call would undo: the call itself is used.
    tokenizer.backend_tokenizer.enable_truncation(8)
    assert rust_tokenizer(tokenizer) is None
    assert token_ids_of(texts[:3], True, tokenizer) == tokenizer(texts[:3])["input_ids"]
    assert max(len(ids) for ids in token_ids_of(texts[:3], True, tokenizer)) > 8
