"""Ranked lists: rows of K completions with scores or ranks, trained with every completion computed once.

Hand-computed: the pairs a list implies, the Plackett-Luce loss, the weighting of pairs and lists. On real
models and the shared Arena-Bench lists: segment attention against the 4D mask and against separate
sequences; training on lists against training on their binarized pairs (same per-step losses and
gradients, fp32); a list split into chunks against the same list in one pass; `rmtrain eval` on lists
against `rmtrain eval` on the binarized pairs; `rmtrain binarize`.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from rmtrain.batching import collate_for, collate_passes, collate_plain, collate_shared_prefix, targets
from rmtrain.layout import choose_layout
from rmtrain.binarize import binarize, list_pairs
from rmtrain.config import ModelConfig, TrainConfig
from rmtrain.groups import Group, tokenize_rows
from rmtrain.diagnostics import kendall_tau, top1_correct
from rmtrain.errors import DataError
from rmtrain.evaluate import run_eval
from rmtrain.loss import Objective, bradley_terry_loss, plackett_luce_terms
from rmtrain.model import batch_rewards, load_reward_model
from tests.conftest import read_jsonl, rmtrain_cli
from tests.test_fit import fit_here

LISTS = "arena_bench_v1_lists.jsonl"


def short_lists(shared_data: Path, count: int, completions: int = 6, chars: int = 240) -> list[dict]:
    """The first lists of the shared file, cut short so that tests stay fast (prompt and completions truncated)."""
    rows = read_jsonl(shared_data / LISTS, limit=count)
    return [{"prompt": r["prompt"][:chars], "completions": [c[:chars] for c in r["completions"][:completions]],
             "scores": r["scores"][:completions], "subset": f"part-{i % 2}"} for i, r in enumerate(rows)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------------
# Rows, pairs, losses: by hand


@pytest.fixture(scope="module")
def qwen(tiny_qwen3):
    return load_reward_model(ModelConfig(name_or_path=tiny_qwen3))


def test_list_rows_imply_pairs_without_ties_and_drop_long_completions(qwen):
    rows = [
        {"prompt": "Q: colour of the sky? A:", "completions": [" Blue.", " Green.", " Blue!", " A colour " * 40], "scores": [3, 1, 3, 2]},
        {"prompt": "Q: 2 + 2? A:", "completions": [" 4.", " 5.", " 4."], "ranks": [1, 2, 1]},  # identical top answers
        {"prompt": "Q: hi? A:", "completions": [" Hi.", " Hey."], "scores": [5, 5]},  # one tie: no pair, dropped
    ]
    groups, stats = tokenize_rows(rows, "lists", qwen.tokenizer, qwen.fmt, 64, "filter")
    assert stats.kind == "lists" and stats.read == 3 and stats.kept == 2
    first, second = groups
    # Row 1: the long completion is dropped; [3, 1, 3] gives (0, 1), (2, 1); the two 3s tie.
    assert first.scores == [3.0, 1.0, 3.0] and first.pairs == [(0, 1), (2, 1)]
    # Row 2: ranks 1, 2, 1 are scores -1, -2, -1: pairs (0, 1) and (2, 1); the two " 4." are tied anyway.
    assert second.scores == [-1.0, -2.0, -1.0] and second.pairs == [(0, 1), (2, 1)]
    assert stats.too_long == 1 and stats.completions == 9 and stats.completions_kept == 6
    assert stats.pairs == 4 and stats.tied == 3  # 3 = 3 (row 1), 4. = 4. (row 2), the tie of row 3
    line = stats.line("filter", 64)
    assert line.startswith("lists: 3 lists read, 2 kept, 6 of 9 completions (1 dropped (longer than 64 tokens)), 4 pairs implied")
    # The prefix is computed once: the prompt's tokens, and each completion keeps its own.
    assert all(first.sequence(i)[: len(first.prefix)] == first.prefix for i in range(3))
    assert qwen.tokenizer.decode(first.prefix).startswith("Q: colour of the sky? A:")


@pytest.mark.shared_data
def test_list_columns_are_mapped_like_pair_columns(qwen, shared_data, tmp_path):
    """A lists file with its own column names (answers, grades) reads as the shared file does once `columns` maps them."""
    from rmtrain.config import DataSource
    from rmtrain.sources import read_rows

    rows = short_lists(shared_data, 3, completions=4)
    renamed = write_jsonl(tmp_path / "renamed.jsonl", [{"question": r["prompt"], "answers": r["completions"], "grades": r["scores"]} for r in rows])
    mapped, _ = read_rows(DataSource(path=str(renamed), columns={"question": "prompt", "answers": "completions", "grades": "scores"}))
    got, stats = tokenize_rows(mapped, "renamed", qwen.tokenizer, qwen.fmt, 256, "filter")
    want, _ = tokenize_rows(rows, "lists", qwen.tokenizer, qwen.fmt, 256, "filter")
    assert stats.kind == "lists" and [(g.prefix, g.completions, g.pairs) for g in got] == [(g.prefix, g.completions, g.pairs) for g in want]


@pytest.mark.parametrize("row, message", [
    ({"completions": ["a"], "scores": [1]}, "row 1: 'completions' must be a list of at least 2 completions, got 1 item(s)"),
    ({"completions": ["a", "b"]}, "row 1: a list row needs one of 'scores' or 'ranks', it has no 'scores'"),
    ({"completions": ["a", "b"], "scores": [1, 2], "ranks": [1, 2]}, "it has both 'scores' and 'ranks'; keep one"),
    ({"completions": ["a", "b"], "scores": [1]}, "row 1: 'scores' must hold one value per completion (2), got 1 values"),
    ({"completions": ["a", "b"], "ranks": [0, 1]}, "row 1: ranks[0] must be a whole number >= 1 (1 is best), got 0"),
    ({"completions": ["a", "b"], "scores": [1, float("nan")]}, "row 1: scores[1] must be a finite number, got nan"),
    ({"completions": ["a", ""], "scores": [1, 2]}, "row 1: 'completions[1]' is empty"),
])
def test_bad_list_rows_are_named(qwen, row, message):
    with pytest.raises(DataError) as error:
        tokenize_rows([row], "lists.jsonl", qwen.tokenizer, qwen.fmt, 64, "filter")
    assert message in str(error.value), str(error.value)


def test_plackett_luce_by_hand():
    rewards = torch.tensor([2.0, 0.0, 1.0, -1.0])
    scores = torch.tensor([3.0, 2.0, 1.0, 0.0])  # order 0 > 1 > 2 > 3
    groups = torch.zeros(4, dtype=torch.long)
    terms = plackett_luce_terms(rewards, scores, groups)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    want = [lse(2, 0, 1, -1) - 2, lse(0, 1, -1) - 0, lse(1, -1) - 1, 0.0]
    assert terms.tolist() == pytest.approx(want, abs=1e-6)
    # Ties do not compete: each of the two top completions is weighed against the two below only.
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0])
    terms = plackett_luce_terms(rewards, scores, groups)
    assert terms[:2].tolist() == pytest.approx([lse(2, 1, -1) - 2, lse(0, 1, -1) - 0], abs=1e-6)
    two = plackett_luce_terms(torch.tensor([0.3, -0.4]), torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.long))
    assert two.sum().item() == pytest.approx(bradley_terry_loss(torch.tensor([0.3]), torch.tensor([-0.4])).item(), abs=1e-6)
    # Groups do not see each other.
    both = plackett_luce_terms(torch.tensor([2.0, 0.0, 5.0, 1.0]), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert both.tolist() == pytest.approx([lse(2, 0) - 2, 0.0, lse(5, 1) - 5, 0.0], abs=1e-6)


def test_pair_and_list_weighting_by_hand():
    """Two rows: a list of three (scores 2, 1, 0: three pairs) and a pair. Per pair: the mean over 4 pairs;
    per list: the mean over 2 rows of their pairs' mean."""
    groups = [Group.of(0, [[1, 5], [1, 6], [1, 7]], [(0, 1), (0, 2), (1, 2)], scores=[2.0, 1.0, 0.0]),
              Group.of(1, [[2, 8], [2, 9]], [(0, 1)])]
    batch = targets(groups)
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.5, 1.5])
    nll = lambda x: math.log(1 + math.exp(-x))  # noqa: E731
    list_pairs_ = [nll(1.0), nll(2.0), nll(1.0)]
    pair = nll(-1.0)
    per_pair = Objective()
    total, chosen, rejected, loss = per_pair.total(rewards, batch)
    assert per_pair.weight(batch) == 4 and total.item() == pytest.approx(sum(list_pairs_) + pair, abs=1e-6)
    assert chosen.tolist() == [1.0, 1.0, 0.0, 0.5] and rejected.tolist() == [0.0, -1.0, -1.0, 1.5]
    per_list = Objective(list_weighting="list")
    total, *_ = per_list.total(rewards, batch)
    assert per_list.weight(batch) == 2 and total.item() == pytest.approx(sum(list_pairs_) / 3 + pair, abs=1e-6)
    # Margins from score differences (2-1, 2-0, 1-0) for the list's pairs; the pair has none.
    margins = Objective(list_margins=True)
    total, *_ = margins.total(rewards, batch)
    assert total.item() == pytest.approx(nll(1.0 - 1) + nll(2.0 - 2) + nll(1.0 - 1) + pair, abs=1e-6)
    assert loss.tolist() == pytest.approx(list_pairs_ + [pair], abs=1e-6)  # the reported loss has no score margins
    # Plackett-Luce: the list's listwise loss, the pair's Bradley-Terry loss.
    total, *_ = Objective(list_loss="plackett_luce").total(rewards, batch)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    assert total.item() == pytest.approx(lse(1, 0, -1) - 1 + lse(0, -1) - 0 + pair, abs=1e-6)


def test_top1_and_kendall_tau_by_hand():
    assert top1_correct(torch.tensor([0.1, 0.9, 0.5]), [1.0, 3.0, 3.0])
    assert not top1_correct(torch.tensor([0.9, 0.1, 0.5]), [1.0, 3.0, 3.0])
    # rewards 3, 2, 1 against scores 3, 1, 2: pairs (0,1) +, (0,2) +, (1,2) -: tau = (2 - 1) / 3.
    assert kendall_tau(torch.tensor([3.0, 2.0, 1.0]), [3.0, 1.0, 2.0]) == pytest.approx(1 / 3)
    # tau-b with a tie in the scores: concordant 2, discordant 0, (3 - 0)(3 - 1) -> 2 / sqrt(6).
    assert kendall_tau(torch.tensor([3.0, 2.0, 1.0]), [2.0, 2.0, 1.0]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau(torch.tensor([1.0, 2.0]), [1.0, 1.0]) is None


def test_binarize_strategies_by_hand():
    scores = [2.0, 3.0, 3.0, 1.0]
    assert list_pairs(scores, "all") == [(0, 3), (1, 0), (1, 3), (2, 0), (2, 3)]
    assert list_pairs(scores, "best-worst") == [(1, 3)]
    assert list_pairs(scores, "best-rest") == [(1, 0), (1, 3)]
    assert list_pairs([1.0, 1.0], "all") == []


# --------------------------------------------------------------------------------------------------
# Real models, real lists


def groups_of(rm, rows, max_length=256):
    groups, _ = tokenize_rows(rows, "lists", rm.tokenizer, rm.fmt, max_length, "filter")
    return groups


def binarized(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "chosen": r["completions"][i], "rejected": r["completions"][j]}
            for r in rows for i, j in list_pairs(r["scores"], "all")]


def rewards_and_grads(rm, batch):
    rm.model.zero_grad(set_to_none=True)
    rewards = batch_rewards(rm.model, rm, batch)[:, 0]
    (rewards * torch.linspace(0.5, 1.5, len(rewards))).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in rm.model.named_parameters() if p.grad is not None}
    return rewards.detach(), grads


@pytest.mark.shared_data
def test_segment_attention_equals_the_mask_and_separate_sequences(qwen, shared_data):
    """Each completion of a list, computed as its own virtual sequence, has the rewards and gradients of the
    4D mask over the row and of the K separate sequences (fp32, 1e-5)."""
    groups = groups_of(qwen, short_lists(shared_data, 3, completions=5))
    assert choose_layout(qwen, True, False)[1] == "segments"  # the check on the model passed
    segmented = rewards_and_grads(qwen, collate_shared_prefix(groups, 0, "segments"))
    for batch in (collate_shared_prefix(groups, 0, "bool"), collate_plain(groups, qwen.fmt.pad_token_id)):
        rewards, grads = rewards_and_grads(qwen, batch)
        assert (rewards - segmented[0]).abs().max().item() < 1e-5
        assert grads.keys() == segmented[1].keys()
        assert max((grads[k] - segmented[1][k]).abs().max().item() for k in grads) < 1e-5
    assert choose_layout(qwen, True, False, "mask")[1] == "bool"  # and back


@pytest.mark.shared_data
def test_scoring_runs_the_last_layer_at_the_reward_tokens_only(qwen, shared_data):
    """Without gradients, the last layer's output projection and MLP see one token per completion (its reward
    token) in every layout, the other layers every token, and the rewards are those of the whole forward."""
    groups = groups_of(qwen, short_lists(shared_data, 3, completions=5))
    assert choose_layout(qwen, True, False)[1] == "segments"
    layers = qwen.model.model.layers
    seen: list[int] = []  # tokens each layer's MLP computed, in order
    handles = [layer.mlp.register_forward_hook(lambda _m, _args, out: seen.append(out.shape[:-1].numel())) for layer in layers]
    completions = sum(len(g.completions) for g in groups)
    tokens = sum(len(g.prefix) + sum(map(len, g.completions)) for g in groups)
    try:
        for batch in (collate_shared_prefix(groups, 0, "segments"), collate_shared_prefix(groups, 0, "bool"), collate_plain(groups, qwen.fmt.pad_token_id)):
            seen.clear()
            with torch.no_grad():
                scored = batch_rewards(qwen.model, qwen, batch)
            assert seen[-1] == completions and all(n >= tokens for n in seen[:-1]), seen
            whole = batch_rewards(qwen.model, qwen, batch).detach()  # with gradients: every layer whole
            assert seen[-1] >= tokens
            assert (scored - whole).abs().max().item() < 1e-5
    finally:
        for handle in handles:
            handle.remove()


def train_once(rm, passes, t, lr=1.0):
    """One SGD step from the model's weights; returns (result, the step each parameter took = -gradient)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rm.model.zero_grad(set_to_none=True)
    before = {n: p.detach().clone() for n, p in rm.model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in rm.model.parameters() if p.requires_grad], lr=lr)
    model, optimizer = accelerator.prepare(rm.model, optimizer)
    from rmtrain.train import train_step

    result = train_step(accelerator, model, optimizer, rm, passes, t)
    steps = {n: (p.detach() - before[n]) for n, p in rm.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in rm.model.named_parameters():
            if n in before:
                p.copy_(before[n])
    return result, steps


def assert_same_step(a, b, tolerance=1e-5):
    (result_a, steps_a), (result_b, steps_b) = a, b
    assert result_a.objective.item() / result_a.weight == pytest.approx(result_b.objective.item() / result_b.weight, abs=tolerance)
    worst = max((steps_a[k] - steps_b[k]).abs().max().item() for k in steps_a)
    assert worst < tolerance, worst


@pytest.mark.shared_data
@pytest.mark.parametrize("model", ["tiny_qwen3", "minilm"])
def test_training_on_lists_equals_training_on_their_binarized_pairs(model, request, shared_data):
    """Per-pair weighting: a batch of lists takes the gradient of the batch of all their pairs (fp32, 1e-5),
    through the real layouts (tiny Qwen3: one shared-prefix row per list with segment attention; MiniLM: every
    completion its own padded row) and passes."""
    rm = load_reward_model(ModelConfig(name_or_path=request.getfixturevalue(model)))
    rows = short_lists(shared_data, 3, completions=5, chars=160)
    lists, pairs = groups_of(rm, rows), groups_of(rm, binarized(rows))
    assert len(pairs) == sum(len(g.pairs) for g in lists) > 10
    layout, mask_format, _ = choose_layout(rm, True, False)
    collate = collate_for(layout, rm.fmt.pad_token_id, mask_format)
    t = TrainConfig(output_dir="unused", max_grad_norm=None)
    on_lists = train_once(rm, collate_passes(lists, collate, layout, None), t)
    on_pairs = train_once(rm, collate_passes(pairs, collate, layout, 2048), t)  # pairs in several passes
    assert on_lists[0].loss.mean().item() == pytest.approx(on_pairs[0].loss.mean().item(), abs=1e-5)
    assert_same_step(on_lists, on_pairs)


@pytest.mark.shared_data
@pytest.mark.parametrize("list_loss", ["bradley_terry", "plackett_luce"])
def test_a_list_in_chunks_trains_as_the_list_in_one_pass(qwen, shared_data, list_loss):
    """A list longer than the pass budget: its completions in chunks with the prompt, the gradient taken
    through the rewards of all of them; the same step as the list in one pass, for a listwise loss too."""
    groups = groups_of(qwen, short_lists(shared_data, 2, completions=6))
    assert choose_layout(qwen, True, False)[1] == "segments"
    collate = collate_for("shared_prefix", qwen.fmt.pad_token_id, "segments")
    budget = max(len(g.prefix) + 2 * max(map(len, g.completions)) for g in groups)  # two completions per chunk
    chunked = collate_passes(groups, collate, "shared_prefix", budget)
    assert all("chunks" in p and len(p["chunks"]) >= 3 for p in chunked)
    t = TrainConfig(output_dir="unused", max_grad_norm=None, list_loss=list_loss)
    assert_same_step(train_once(qwen, chunked, t), train_once(qwen, collate_passes(groups, collate, "shared_prefix", None), t))


@pytest.mark.shared_data
def test_fit_on_lists_matches_fit_on_binarized_pairs(tmp_path, tiny_qwen3, shared_data, capsys):
    """`rmtrain fit` on lists and on their binarized pairs, one batch per epoch, fp32: the same per-step
    losses (every pair weighs the same); the list run logs lists and completions per second."""
    rows = short_lists(shared_data, 4, completions=5, chars=160)
    runs = {}
    for name, data, batch in (("lists", rows, 4), ("pairs", binarized(rows), 1000)):
        out = tmp_path / name
        tree = {
            "model": {"name_or_path": tiny_qwen3},
            "data": {"train": {"path": str(write_jsonl(tmp_path / f"{name}.jsonl", data))}, "max_length": 256},
            "train": {"output_dir": str(out), "per_device_batch_size": batch, "num_epochs": 3, "logging_steps": 1,
                      "learning_rate": 1e-3, "gradient_checkpointing": False},
        }
        printed = fit_here(tree, capsys)
        runs[name] = ([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], printed)
    lists, pairs = runs["lists"][0], runs["pairs"][0]
    assert [r["step"] for r in lists] == [r["step"] for r in pairs] == [1, 2, 3]
    for a, b in zip(lists, pairs):
        assert a["num_pairs"] == b["num_pairs"] and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    assert lists[0]["lists_per_s"] > 0 and lists[0]["completions_per_s"] > lists[0]["lists_per_s"]
    assert "4 lists read, 4 kept" in " ".join(runs["lists"][1].split())


@pytest.mark.shared_data
def test_eval_on_lists_equals_eval_on_binarized_pairs(tmp_path, tiny_qwen3, shared_data):
    rows = short_lists(shared_data, 6, completions=6)
    report = tmp_path / "report"
    lists_file, pairs_file = write_jsonl(tmp_path / "lists.jsonl", rows), tmp_path / "pairs.jsonl"
    assert binarize(str(lists_file), str(pairs_file), "all") == sum(len(list_pairs(r["scores"], "all")) for r in rows)
    # What `rmtrain eval --data F --report R --max-length 512` runs (in this process: no interpreter start).
    run_eval(tiny_qwen3, str(lists_file), report_dir=str(report), max_length=512)
    on_lists = json.loads((report / "metrics.json").read_text())
    on_pairs = run_eval(tiny_qwen3, str(pairs_file), max_length=512)
    assert on_lists["num_pairs"] == on_pairs["num_pairs"] and on_lists["accuracy"] == on_pairs["accuracy"]
    assert abs(on_lists["loss"] - on_pairs["loss"]) < 1e-5
    # Top-1 and Kendall's tau, recomputed from the per-list records, and per subset.
    records = [json.loads(line) for line in (report / "lists.jsonl").read_text().splitlines()]
    assert len(records) == on_lists["num_lists"] == 6
    top1 = [r["scores"][max(range(len(r["rewards"])), key=r["rewards"].__getitem__)] == max(r["scores"]) for r in records]
    assert on_lists["top1_accuracy"] == pytest.approx(sum(top1) / 6)
    taus = [kendall_tau(torch.tensor(r["rewards"]), r["scores"]) for r in records]
    assert on_lists["mean_kendall_tau"] == pytest.approx(sum(taus) / len(taus))
    part = [r for r in records if r["subset"] == "part-0"]
    assert on_lists["subsets"]["part-0"]["num_lists"] == len(part) == 3


@pytest.mark.shared_data
def test_binarize_command_on_the_shared_lists(tmp_path, shared_data):
    rows = read_jsonl(shared_data / LISTS, limit=5)
    lists_file = write_jsonl(tmp_path / "lists.jsonl", rows)
    counts = {}
    for strategy in ("all", "best-worst", "best-rest"):
        out = tmp_path / f"{strategy}.jsonl"
        result = rmtrain_cli("binarize", str(lists_file), str(out), "--pairs", strategy)
        assert result.returncode == 0, result.stderr
        pairs = [json.loads(line) for line in out.read_text().splitlines()]
        assert all(p["score_chosen"] > p["score_rejected"] and p["prompt"] == rows[0]["prompt"] for p in pairs[:1])
        counts[strategy] = len(pairs)
    assert counts["best-worst"] == 5
    assert counts["all"] == sum(len(list_pairs(r["scores"], "all")) for r in rows)
    assert counts["best-worst"] < counts["best-rest"] < counts["all"]
    again = rmtrain_cli("binarize", str(lists_file), str(tmp_path / "all.jsonl"))
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr
