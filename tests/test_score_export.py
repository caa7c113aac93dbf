"""`rmtrain score` and `rmtrain export` on real models and the shared data: scores equal eval's rewards,
exported folders give rmtrain's rewards under plain transformers (full, LoRA merged, normalized)."""

import json
from pathlib import Path

import pytest
import torch

from rmtrain.config import load_recipe
from rmtrain.groups import tokenize_rows
from rmtrain.evaluate import run_eval
from rmtrain.errors import ExportError, ModelError
from rmtrain.export import export_model
from rmtrain.inference import prepare_inference, rewards_of
from rmtrain.saved import load_saved
from rmtrain.score import run_score
from rmtrain.train import fit
from tests.conftest import FULL, read_jsonl, rmtrain_cli, write_recipe

pytestmark = pytest.mark.shared_data

HH = "hh_harmless_test.jsonl"


def fit_run(folder: Path, model: dict, shared_data: Path, lora: dict | None = None, with_eval: bool = True, **train) -> Path:
    hh = str(shared_data / HH)
    out = folder / "run"
    tree = {
        "model": model,
        "data": {"train": {"path": hh, "limit": 16}, "max_length": 256} | ({"eval": {"path": hh, "skip": 2300}} if with_eval else {}),
        "train": {"output_dir": str(out), "per_device_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3,
                  "gradient_checkpointing": False, **train},
    }
    if lora:
        tree["lora"] = lora
    fit(load_recipe(write_recipe(folder, tree)))  # in-process: the CLI's fit is tested elsewhere
    return out


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory, tiny_qwen3, shared_data) -> Path:
    return fit_run(tmp_path_factory.mktemp("qwen"), {"name_or_path": tiny_qwen3}, shared_data)


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, minilm, shared_data) -> Path:
    return fit_run(tmp_path_factory.mktemp("minilm"), {"name_or_path": minilm}, shared_data, learning_rate=5e-5)


def eval_rows(shared_data: Path) -> list[dict]:
    """The runs' eval set (rows 2301..): what `reward_stats.json` and the eval metrics are computed on."""
    return read_jsonl(shared_data / HH)[2300:]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_scores(path: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    scores = {line["row"]: line["reward"] for line in lines}
    assert len(scores) == len(lines)  # every row once
    return scores


def score_file(model: Path, rows: list[dict], tmp_path: Path, name: str, **options) -> list[float]:
    out = tmp_path / f"{name}.scores.jsonl"
    run_score(str(model), str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), str(out), **options)
    scores = read_scores(out)
    assert sorted(scores) == list(range(1, len(rows) + 1))
    return [scores[i] for i in range(1, len(rows) + 1)]


# --------------------------------------------------------------------------------------------------
# rmtrain score


@pytest.mark.parametrize("run_name", ["qwen_run", "minilm_run"])
def test_score_gives_the_rewards_eval_computes(run_name, request, tmp_path, shared_data):
    run = request.getfixturevalue(run_name)
    rows = eval_rows(shared_data)
    metrics = run_eval(str(run), str(write_jsonl(tmp_path / "pairs.jsonl", rows)))
    # Exactly the pairs eval kept (max_length 256, filter), each side as one text row.
    rm, max_length = load_saved(run)
    pairs, _ = tokenize_rows(rows, "pairs", rm.tokenizer, rm.fmt, max_length, "filter")
    kept = [rows[p.row] for p in pairs]
    texts = [{"text": r["chosen"]} for r in kept] + [{"text": r["rejected"]} for r in kept]
    texts_file = write_jsonl(tmp_path / "texts.jsonl", texts)
    if run_name == "qwen_run":  # the command, streaming to stdout
        result = rmtrain_cli("score", str(run), "--data", str(texts_file), "--batch-size", "5")
        assert result.returncode == 0, result.stderr[-3000:]
        output = result.stdout
    else:
        run_score(str(run), str(texts_file), str(tmp_path / "scores.jsonl"), batch_size=5)
        output = (tmp_path / "scores.jsonl").read_text()
    lines = [json.loads(line) for line in output.splitlines()]
    assert sorted(line["row"] for line in lines) == list(range(1, len(texts) + 1))
    assert [line["tokens"] for line in lines] == sorted((line["tokens"] for line in lines), reverse=True)  # longest first
    scores = torch.tensor([line["reward"] for line in sorted(lines, key=lambda line: line["row"])], dtype=torch.float64)
    chosen, rejected = scores[: len(kept)], scores[len(kept) :]
    assert metrics["num_pairs"] == len(kept) > 0
    assert abs(scores.mean().item() - metrics["mean_reward"]) < 1e-5
    assert abs(scores.std(unbiased=False).item() - metrics["std_reward"]) < 1e-5
    assert abs(scores.min().item() - metrics["min_reward"]) < 1e-5
    assert abs(scores.max().item() - metrics["max_reward"]) < 1e-5
    assert abs((chosen - rejected).mean().item() - metrics["margin"]) < 1e-5
    assert (chosen > rejected).double().mean().item() == metrics["accuracy"]


def test_score_prompt_completion_and_messages_rows(qwen_run, tmp_path, shared_data):
    rm, _ = load_saved(qwen_run)
    # Conversational pairs (explicit prompt): as prompt + completion message lists, or as whole conversations.
    chat = read_jsonl(shared_data / "llamafactory_dpo_en_demo.jsonl", limit=3)
    chat = [r for r in chat if len(rm.tokenizer.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)) < 2000]
    pairs, _ = tokenize_rows(chat, "chat", rm.tokenizer, rm.fmt, 10_000, "filter")
    ours = torch.stack([r[:, 0] for r in rewards_of(prepare_inference(rm), pairs)]).T.reshape(-1).tolist()  # every chosen, then every rejected
    as_completion = score_file(qwen_run, [{"prompt": r["prompt"], "completion": r[s]} for s in ("chosen", "rejected") for r in chat], tmp_path, "pc", max_length=10_000)
    as_messages = score_file(qwen_run, [{"messages": r["prompt"] + r[s]} for s in ("chosen", "rejected") for r in chat], tmp_path, "msg", max_length=10_000, in_order=True)
    assert max(abs(a - b) for a, b in zip(as_completion, ours)) < 1e-5
    assert as_messages == as_completion
    # Standard text with an explicit prompt, the completion under either name.
    uf = [{k: r[k][:400] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(shared_data / "ultrafeedback_binarized_sample.jsonl", limit=3)]
    pairs, _ = tokenize_rows(uf, "uf", rm.tokenizer, rm.fmt, 10_000, "filter")
    ours = torch.stack([r[:, 0] for r in rewards_of(prepare_inference(rm), pairs)]).T.reshape(-1).tolist()  # every chosen, then every rejected
    rows = [{"prompt": r["prompt"], ("response" if i % 2 else "completion"): r[s]} for s in ("chosen", "rejected") for i, r in enumerate(uf)]
    assert max(abs(a - b) for a, b in zip(score_file(qwen_run, rows, tmp_path, "uf"), ours)) < 1e-5
    # Longer than --max-length: the start is cut, as eval's `--truncation truncate` cuts it.
    cut_pairs, _ = tokenize_rows(uf, "uf", rm.tokenizer, rm.fmt, 24, "truncate")
    assert [p.row for p in cut_pairs] == list(range(len(uf)))
    out = tmp_path / "cut.jsonl"
    run_score(str(qwen_run), str(write_jsonl(tmp_path / "cut_in.jsonl", rows[: len(uf)])), str(out), max_length=24, in_order=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(1, len(uf) + 1))
    assert all(line["truncated"] and line["tokens"] == 24 for line in lines)
    cut_chosen = [r[0].item() for r in rewards_of(prepare_inference(rm), cut_pairs)]
    assert max(abs(line["reward"] - r) for line, r in zip(lines, cut_chosen)) < 1e-5
    # --field picks one column of every row.
    picked = score_file(qwen_run, [{"id": i, "answer": r["prompt"] + r["chosen"]} for i, r in enumerate(uf)], tmp_path, "field", field="answer")
    assert max(abs(a - b) for a, b in zip(picked, ours[: len(uf)])) < 1e-5


def test_bad_score_row_is_exit_2_with_its_row_number_and_no_output(qwen_run, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"prompt": "p", "completion": "c"}, {"answer": "no shape"}])
    out = tmp_path / "scores.jsonl"
    result = rmtrain_cli("score", str(qwen_run), "--data", str(data), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data}: row 3: expected 'text', 'messages', or 'prompt' with 'completion' (or 'response') "
        "(columns present: answer); rename your column or pick it with --field"
    ]
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# rmtrain export


def test_export_replaces_a_pad_token_equal_to_eos(tiny_qwen3):
    """SmolLM2/Llama-style tokenizers pad with EOS: the exported folder must pad with a token never in the data."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoTokenizer

    from rmtrain.export import make_pad_safe
    from rmtrain.tokenizer import TokenFormat

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    tokenizer.pad_token = tokenizer.eos_token
    model = SimpleNamespace(config=AutoConfig.from_pretrained(tiny_qwen3))
    fmt = make_pad_safe(model, tokenizer, TokenFormat(tokenizer.eos_token, tokenizer.eos_token_id, False))
    assert tokenizer.pad_token == "<|endoftext|>" != tokenizer.eos_token
    assert model.config.pad_token_id == fmt.pad_token_id == tokenizer.pad_token_id


def check_line(stderr: str) -> float:
    text = " ".join(stderr.split())
    assert "export check: plain transformers vs rmtrain on" in text, text
    return float(text.split("max abs difference ")[1].split()[0])


def test_export_full_decoder_round_trip(qwen_run, tmp_path, shared_data):
    out = tmp_path / "exported"
    result = rmtrain_cli("export", str(qwen_run), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_line(result.stderr) < 1e-4
    stats = json.loads((out / "reward_stats.json").read_text())
    eval_metrics = json.loads((qwen_run / "run_info.json").read_text())["final_eval"]
    assert stats["num_rewards"] == 2 * eval_metrics["num_pairs"]
    assert abs(stats["mean"] - eval_metrics["mean_reward"]) < 1e-4 and abs(stats["std"] - eval_metrics["std_reward"]) < 1e-4
    # Plain tokenizer(text) now gives the training tokens: the EOS appended by the tokenizer itself.
    from transformers import AutoTokenizer

    exported_tok, run_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(qwen_run))
    text = eval_rows(shared_data)[0]["chosen"]
    assert exported_tok(text)["input_ids"] == run_tok(text + run_tok.eos_token)["input_ids"]
    assert exported_tok.chat_template == run_tok.chat_template
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] != config["eos_token_id"]
    # rmtrain reads the exported folder as it reads the run.
    texts = [{"text": r["chosen"][:600]} for r in eval_rows(shared_data)[:6]]
    assert max(abs(a - b) for a, b in zip(score_file(out, texts, tmp_path, "exp"), score_file(qwen_run, texts, tmp_path, "run"))) < 1e-5

    # A head without a bias cannot hold the mean: refused before anything is written.
    with pytest.raises(ExportError, match="Qwen3ForSequenceClassification has no bias"):
        export_model(str(qwen_run), str(tmp_path / "normalized"), merge=False, normalize=True)
    assert not (tmp_path / "normalized").exists() and not (tmp_path / ".normalized.tmp").exists()


def test_export_check_fails_when_plain_tokenization_differs(qwen_run, tmp_path, monkeypatch):
    """Without the EOS in the tokenizer, plain `tokenizer(text)` reads the reward one token early: caught."""
    import rmtrain.export

    monkeypatch.setattr(rmtrain.export, "append_eos_in_tokenizer", lambda tokenizer, eos: False)
    out = tmp_path / "exported"
    with pytest.raises(ExportError, match=r"max abs difference .* > 0.001; .*exported not written, the folder is kept in .*exported.failed"):
        export_model(str(qwen_run), str(out), merge=False)
    assert not out.exists() and not (tmp_path / ".exported.tmp").exists()
    assert (tmp_path / "exported.failed" / "config.json").is_file()


def test_export_normalized_encoder_gives_mean_zero_std_one(minilm_run, tmp_path, shared_data):
    out = tmp_path / "exported"
    assert export_model(str(minilm_run), str(out), merge=False, normalize=True)["check_max_abs_diff"] < 1e-4
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["folded_into_head"] is True
    metrics = run_eval(str(out), str(write_jsonl(tmp_path / "eval.jsonl", eval_rows(shared_data))))
    assert abs(metrics["mean_reward"]) < 1e-5 and abs(metrics["std_reward"] - 1) < 1e-5
    texts = [{"text": r["rejected"][:600]} for r in eval_rows(shared_data)[:6]]
    run_scores = torch.tensor(score_file(minilm_run, texts, tmp_path, "run"), dtype=torch.float64)
    exported = torch.tensor(score_file(out, texts, tmp_path, "exp"), dtype=torch.float64)
    assert (exported - (run_scores - stats["mean"]) / stats["std"]).abs().max().item() < 1e-5


def test_export_lora_needs_merge_and_round_trips_without_an_eval_set(tmp_path, tiny_qwen3, shared_data, capsys):
    """A LoRA run trained without an eval set: export checks on (and takes statistics from) its training pairs."""
    run = fit_run(tmp_path, {"name_or_path": tiny_qwen3}, shared_data, lora={"r": 4, "alpha": 8}, with_eval=False)
    assert (run / "adapter_config.json").is_file()
    with pytest.raises(ModelError, match="is a LoRA adapter; pass --merge"):
        export_model(str(run), str(tmp_path / "plain"), merge=False)
    out = tmp_path / "merged"
    capsys.readouterr()
    assert export_model(str(run), str(out), merge=True)["check_max_abs_diff"] < 1e-4
    train_pairs = json.loads((run / "run_info.json").read_text())["train_pairs"]
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["num_rewards"] == 2 * train_pairs and "first" in stats["pairs_from"]
    assert f"the run has no eval set: the first {train_pairs} pairs of its training data" in " ".join(capsys.readouterr().err.split())
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    texts = [{"text": r["chosen"][:600]} for r in eval_rows(shared_data)[:6]]
    assert max(abs(a - b) for a, b in zip(score_file(out, texts, tmp_path, "exp"), score_file(run, texts, tmp_path, "run"))) < 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="about a minute on 2 cores (GGUF load, fit, merge, fresh-process check); RMTRAIN_FULL=1 runs it")
def test_export_smollm2_lora_merged(tmp_path, smollm2, shared_data):
    """A real decoder whose tokenizer pads with its EOS, trained on plain text with an explicit prompt."""
    path, gguf = smollm2
    rows = read_jsonl(shared_data / "ultrafeedback_binarized_sample.jsonl", limit=8)
    short = write_jsonl(tmp_path / "uf_short.jsonl", [{k: r[k][:200] for k in ("prompt", "chosen", "rejected")} for r in rows])
    out = tmp_path / "run"
    tree = {
        "model": {"name_or_path": path, "gguf_file": gguf},
        "data": {"train": {"path": str(short), "limit": 2}, "eval": {"path": str(short), "skip": 2}, "max_length": 128},
        "train": {"output_dir": str(out), "per_device_batch_size": 2, "max_steps": 1, "learning_rate": 1e-3, "gradient_checkpointing": False},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    result = rmtrain_cli("fit", str(write_recipe(tmp_path, tree)))
    assert result.returncode == 0, result.stderr[-3000:]
    exported = tmp_path / "exported"
    result = rmtrain_cli("export", str(out), str(exported), "--merge", "--check-pairs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert check_line(result.stderr) < 1e-3
    config = json.loads((exported / "config.json").read_text())
    assert config["pad_token_id"] != config["eos_token_id"]
