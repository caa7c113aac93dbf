"""Ensembles: reward heads on one trunk, member ensembles, weight averaging (WARM), and how an ensemble's rewards are
read (mean, min, mean-std): hand computations first, then real models on the shared data in fp32 and bf16."""

import json
import math
from pathlib import Path

import pytest
import torch

from rmtrain.aggregate import Aggregate, read
from rmtrain.batching import PAIR_KEY, targets
from rmtrain.config import TrainConfig
from rmtrain.errors import DataError
from rmtrain.groups import Group
from rmtrain.loss import Objective, bootstrap_weights
from tests.conftest import FULL, read_jsonl, write_recipe


def nll(x: float) -> float:
    return math.log(1 + math.exp(-x))  # -log sigmoid(x)


# --------------------------------------------------------------------------------------------------
# Reading an ensemble


def test_every_aggregate_on_three_members_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [-1.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    std = [math.sqrt(14 / 3), math.sqrt(2 / 3), 0.0]  # over the members themselves: (1-3)^2 + (2-3)^2 + (6-3)^2 = 14
    assert Aggregate.parse("mean")(rewards).tolist() == pytest.approx([3.0, 0.0, 0.5])
    assert Aggregate.parse("min")(rewards).tolist() == [1.0, -1.0, 0.5]
    assert Aggregate.parse("mean-std:0.5")(rewards).tolist() == pytest.approx([3 - 0.5 * std[0], -0.5 * std[1], 0.5], abs=1e-6)
    assert Aggregate.parse("mean-std:0")(rewards).tolist() == pytest.approx([3.0, 0.0, 0.5])
    reading = read(Aggregate.parse("min"), rewards)
    assert reading.fields(0) == {"reward": 1.0, "reward_mean": pytest.approx(3.0), "reward_std": pytest.approx(std[0], abs=1e-6),
                                 "rewards": [1.0, 2.0, 6.0]}
    # One member: its reward is every aggregate, and a row carries nothing else.
    single = torch.tensor([[0.25], [-2.0]])
    for how in ("mean", "min", "mean-std:3"):
        assert Aggregate.parse(how)(single).tolist() == [0.25, -2.0]
        assert read(Aggregate.parse(how), single).fields(1) == {"reward": -2.0}
    assert str(Aggregate.parse("mean-std:1.5")) == "mean-std:1.5"


def test_auroc_by_hand():
    from rmtrain.uncertainty import auroc

    # positives 3, 1; negatives 2, 0, 1: pairs (3>2,3>0,3>1) = 3, (1<2, 1>0, 1=1 -> 1/2) = 1.5; 4.5 / 6
    assert auroc(torch.tensor([3.0, 2.0, 1.0, 0.0, 1.0]), torch.tensor([True, False, True, False, False])) == pytest.approx(0.75)
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([True, True])) is None


def test_ensemble_stats_on_two_pairs_and_a_list_by_hand():
    """Three members; a pair (completions 0 > 1) and a graded list of three. Members' margins on the pairs, by hand:
    pair: 1, -1, 2 ; list (0>1): 1, 1, -2 ; (0>2): 2, 0, 1 ; (1>2): 1, -1, 3."""
    from rmtrain.uncertainty import ensemble_stats

    pair = Group.of(0, [[1], [2]], [(0, 1)])
    graded = Group.of(1, [[1], [2], [3]], [(0, 1), (0, 2), (1, 2)], scores=[3.0, 2.0, 1.0])
    heads = [torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]]),
             torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])]
    stats = ensemble_stats([pair, graded], heads, Aggregate.parse("mean-std:0.5"))
    assert stats["members"] == 3
    assert stats["member_accuracy"] == pytest.approx([1.0, 0.25, 0.75])
    # mean margins: 2/3, 0, 1, 1 -> right, wrong, right, right; spreads (std of the margins): 1.247, 1.414, 0.816, 1.633
    assert stats["aggregates"]["mean"]["accuracy"] == pytest.approx(0.75)
    # the wrong pair's spread 1.414 is above two of the three right pairs' spreads
    assert stats["spread_auroc"] == pytest.approx(2 / 3)
    # min per completion: pair (0, 0) tie -> wrong; list (0, 0, -1): 0>1 tie wrong, 0>2 right, 1>2 right
    assert stats["aggregates"]["min"]["accuracy"] == pytest.approx(0.5)
    assert list(stats["aggregates"]) == ["mean", "min", "mean-std:1", "mean-std:0.5"]
    # best-of-K: the mean picks completion 0 (means 1, 1, 0: a tie, argmax takes the first): score 3
    assert stats["aggregates"]["mean"]["bestofk_picked_score"] == 3.0
    assert stats["aggregates"]["min"]["bestofk_picked_score"] == 3.0


@pytest.mark.parametrize("text", ["max", "mean-std", "mean-std:-1", "mean-std:x", "mean:1", ""])
def test_an_aggregate_that_is_none_is_one_line(text):
    with pytest.raises(DataError, match=r"--aggregate: .* is not an aggregate; expected mean, min, or mean-std:LAMBDA"):
        Aggregate.parse(text)


# --------------------------------------------------------------------------------------------------
# Heads on one trunk: the objective


def two_pairs():
    return targets([Group.of(0, [[1, 2], [1, 3]], [(0, 1)]), Group.of(1, [[4, 5], [4, 6]], [(0, 1)])])


def test_two_heads_loss_and_gradients_by_hand():
    """Two heads, two pairs: the objective is the mean of the heads' Bradley-Terry sums, each head's gradient its
    own pairs' over two; chosen and rejected (what accuracy reads) are the heads' mean."""
    values = [[1.0, -0.5], [0.0, 0.5], [2.0, 1.0], [3.0, -1.0]]  # rows: chosen 1, rejected 1, chosen 2, rejected 2
    rewards = torch.tensor(values, requires_grad=True)
    total, chosen, rejected, loss = Objective().total(rewards, two_pairs())
    margins = [[values[0][k] - values[1][k], values[2][k] - values[3][k]] for k in range(2)]
    want = sum(nll(m) for head in margins for m in head) / 2
    assert total.item() == pytest.approx(want, abs=1e-6)
    total.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for k in range(2):
        for p, (c, r) in enumerate(((0, 1), (2, 3))):
            g = -sig(-margins[k][p]) / 2  # d nll(m) / dm = -sigmoid(-m); the mean over two heads halves it
            assert rewards.grad[c, k].item() == pytest.approx(g, abs=1e-6)
            assert rewards.grad[r, k].item() == pytest.approx(-g, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.25, 1.5]) and rejected.tolist() == pytest.approx([0.25, 1.0])
    assert loss.tolist() == pytest.approx([nll(0.0), nll(0.5)], abs=1e-6)


def lists_and_a_pair():
    groups = [Group.of(0, [[1, 5], [1, 6], [1, 7]], [(0, 1), (0, 2), (1, 2)], scores=[2.0, 1.0, 0.0]),
              Group.of(1, [[2, 8], [2, 9]], [(0, 1)])]
    return targets(groups)


@pytest.mark.parametrize("objective", [
    Objective(), Objective(center_rewards_coefficient=0.01), Objective(list_weighting="list"), Objective(list_margins=True),
    Objective(list_loss="plackett_luce"), Objective(0.01, "plackett_luce", "list"),
], ids=["pairs", "centered", "per-list", "list-margins", "plackett-luce", "plackett-luce-centered"])
def test_one_head_is_the_single_model_bit_for_bit(objective):
    """model.heads: 1 (rewards [N, 1]) gives the objective, chosen, rejected, loss and gradients of a reward model read
    as one value per sequence, bit for bit."""
    batch = lists_and_a_pair()
    flat = torch.tensor([1.0, 0.0, -1.0, 0.5, 1.5], requires_grad=True)
    column = flat.detach().clone()[:, None].requires_grad_(True)
    a, b = objective.total(flat, batch), objective.total(column, batch)
    for x, y in zip(a, b):
        assert torch.equal(x.detach(), y.detach())
    a[0].backward()
    b[0].backward()
    assert torch.equal(flat.grad, column.grad[:, 0])


def test_bootstrap_weights_are_seeded_poisson_and_shared_by_a_rows_pairs():
    keys = torch.arange(100_000)
    weights = bootstrap_weights(keys, 4, seed=0)
    assert weights.shape == (100_000, 4) and torch.equal(weights, bootstrap_weights(keys, 4, seed=0))
    assert not torch.equal(weights, bootstrap_weights(keys, 4, seed=1))
    assert torch.equal(bootstrap_weights(keys[[7, 3]], 4, seed=0), weights[[7, 3]])  # a key's weights alone decide
    # Poisson(1): mean 1, P(0) = P(1) = 1/e, and the heads' draws independent of each other.
    assert weights.mean(0).tolist() == pytest.approx([1.0] * 4, abs=0.02)
    assert (weights == 0).double().mean(0).tolist() == pytest.approx([math.exp(-1)] * 4, abs=0.01)
    assert (weights == 1).double().mean(0).tolist() == pytest.approx([math.exp(-1)] * 4, abs=0.01)
    correlation = torch.corrcoef(weights.T) - torch.eye(4)
    assert correlation.abs().max().item() < 0.02
    # In training a pair's row decides its weights: the three pairs of a list share theirs.
    from rmtrain.train import head_weights

    batch = lists_and_a_pair()
    w = head_weights(batch, 3, TrainConfig(output_dir="x", head_bootstrap=True, seed=5))
    assert w.shape == (4, 3) and torch.equal(w[0], w[1]) and torch.equal(w[1], w[2])
    assert torch.equal(w, bootstrap_weights(batch["pair_key"] // PAIR_KEY, 3, 5))
    assert head_weights(batch, 3, TrainConfig(output_dir="x")) is None


def test_bootstrap_weights_multiply_each_heads_pairs():
    values = [[1.0, -0.5], [0.0, 0.5], [2.0, 1.0], [3.0, -1.0]]
    weights = torch.tensor([[2.0, 0.0], [1.0, 3.0]])  # pair 1 twice for head 0, never for head 1; pair 2 once and thrice
    total, *_ = Objective().total(torch.tensor(values), two_pairs(), weights)
    margins = [[values[0][k] - values[1][k], values[2][k] - values[3][k]] for k in range(2)]
    want = (2 * nll(margins[0][0]) + 1 * nll(margins[0][1]) + 0 * nll(margins[1][0]) + 3 * nll(margins[1][1])) / 2
    assert total.item() == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Real models on the shared data

HH = "hh_harmless_test.jsonl"


def fit_run(folder: Path, model: dict, shared_data: Path, lora: dict | None = None, **train) -> Path:
    """Two steps of tiny Qwen3 (or MiniLM) on 16 HH pairs, with an eval set; in this process."""
    from rmtrain.config import load_recipe
    from rmtrain.train import fit

    hh = str(shared_data / HH)
    out = folder / "run"
    tree = {
        "model": model,
        "data": {"train": {"path": hh, "limit": 16}, "eval": {"path": hh, "skip": 2300, "limit": 24}, "max_length": 256},
        "train": {"output_dir": str(out), "per_device_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3,
                  "gradient_checkpointing": False, **train},
    }
    if lora:
        tree["lora"] = lora
    fresh_accelerate_state()  # fp32 and bf16 runs in one process
    fit(load_recipe(write_recipe(folder, tree)))
    fresh_accelerate_state()
    return out


def fresh_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


BF16 = {"init_kwargs": {"dtype": "bfloat16"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen3, minilm, shared_data):
    """Runs made once per module when first asked for: {name: run folder}."""
    made: dict[str, Path] = {}
    specs = {
        "heads-fp32": lambda f: fit_run(f, {"name_or_path": tiny_qwen3, "heads": 3}, shared_data, head_bootstrap=True),
        "heads-bf16": lambda f: fit_run(f, {"name_or_path": tiny_qwen3, "heads": 3} | BF16, shared_data, head_bootstrap=True, bf16=True),
        "heads-minilm": lambda f: fit_run(f, {"name_or_path": minilm, "heads": 2}, shared_data, learning_rate=5e-5),
        "seed-0": lambda f: fit_run(f, {"name_or_path": tiny_qwen3}, shared_data, seed=0),
        "seed-1": lambda f: fit_run(f, {"name_or_path": tiny_qwen3}, shared_data, seed=1),
        "lora-0": lambda f: fit_run(f, {"name_or_path": tiny_qwen3} | BF16, shared_data, {"r": 4}, seed=0, bf16=True),
        "lora-1": lambda f: fit_run(f, {"name_or_path": tiny_qwen3} | BF16, shared_data, {"r": 4}, seed=1, bf16=True),
    }

    def get(name: str) -> Path:
        if name not in made:
            made[name] = specs[name](tmp_path_factory.mktemp(name))
        return made[name]

    return get


def text_rows(shared_data: Path, n: int = 6) -> list[dict]:
    """Held-out HH answers as prompt + completion rows (the eval set's, cut short)."""
    rows = read_jsonl(shared_data / HH)[2300 : 2300 + n]
    out = []
    for r in rows:
        prompt, answer = r["chosen"][-700:].rsplit("\n\nAssistant:", 1)
        out.append({"prompt": prompt + "\n\nAssistant:", "completion": answer[:300]})
    return out


def score_rows(model: Path, rows: list[dict], tmp_path: Path, name: str, aggregate: str = "mean") -> list[dict]:
    from rmtrain.score import run_score

    data, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_score(str(model), str(data), str(out), in_order=True, aggregate=Aggregate.parse(aggregate))
    return [json.loads(line) for line in out.read_text().splitlines()]


def fp32_rewards(model: Path, rows: list[dict]) -> torch.Tensor:
    """[rows, members] of a folder read in fp32 (as export reads a run), each row tokenized as `rmtrain score` does."""
    from rmtrain.groups import scoring_ids
    from rmtrain.inference import prepare_inference, rewards_of
    from rmtrain.saved import load_saved, scoring_max_length

    rm, trained = load_saved(model, dtype=torch.float32)
    encoded = scoring_ids([(r["prompt"], [r["completion"]], f"row {i}") for i, r in enumerate(rows)], rm.tokenizer, rm.fmt,
                          scoring_max_length(None, trained))
    groups = [Group.of(i, ids, []) for i, (ids, _) in enumerate(encoded)]
    return torch.cat(rewards_of(prepare_inference(rm), groups)).double()


def plain_rewards(folder: Path, rows: list[dict]) -> list[float]:
    from rmtrain.plain_check import plain_rewards as read

    return read(str(folder), [{"text": r["prompt"] + r["completion"]} for r in rows])


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["heads-fp32", "heads-bf16", pytest.param("heads-minilm", marks=[pytest.mark.slow, pytest.mark.skipif(
    not FULL, reason="an encoder's heads (normalized export) under RMTRAIN_FULL=1; the decoder's in fp32 and bf16 run always")])])
def test_heads_score_eval_and_export_as_their_mean(name, runs, shared_data, tmp_path):
    """K heads trained in one forward: every score row carries each head's reward, their mean and spread, and the
    aggregate asked for; eval reads the ensemble; export writes one head, the mean, that plain transformers reads."""
    from rmtrain.export import export_model

    run = runs(name)
    heads = 2 if "minilm" in name else 3
    assert len(json.loads((run / "config.json").read_text())["id2label"]) == heads
    rows = text_rows(shared_data)
    mean_rows = score_rows(run, rows, tmp_path, "mean")
    assert all(len(r["rewards"]) == heads and r["reward"] == r["reward_mean"] for r in mean_rows)
    members = torch.tensor([r["rewards"] for r in mean_rows])
    assert torch.allclose(torch.tensor([r["reward_mean"] for r in mean_rows]), members.mean(1), atol=1e-6)
    assert torch.allclose(torch.tensor([r["reward_std"] for r in mean_rows]), members.std(1, unbiased=False), atol=1e-6)
    assert members.std(1).min() > 0  # each head its own init: they differ
    low = score_rows(run, rows, tmp_path, "min", "min")
    assert [r["reward"] for r in low] == members.min(1).values.tolist()
    careful = score_rows(run, rows, tmp_path, "uwo", "mean-std:1")
    want = members.mean(1) - members.std(1, unbiased=False)
    assert torch.allclose(torch.tensor([r["reward"] for r in careful]), want, atol=1e-6)

    check_eval_reads_the_members(run, heads, shared_data, tmp_path)

    out = tmp_path / "exported"
    result = export_model(str(run), str(out), merge=False, normalize="minilm" in name)
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == 1
    plain = torch.tensor(plain_rewards(out, rows), dtype=torch.float64)
    # The run read in fp32 (as export reads it): the folder's one logit is the heads' mean to 1e-5.
    ours = fp32_rewards(run, rows).mean(1)
    if result["stats"] is not None and "minilm" in name:
        ours = (ours - result["stats"]["mean"]) / result["stats"]["std"]
    assert (plain - ours).abs().max().item() < 1e-5


def check_eval_reads_the_members(run: Path, heads: int, shared_data: Path, tmp_path: Path) -> None:
    """`rmtrain eval --aggregate min`: its accuracy is the minimum's; each member's accuracy, the spread's AUROC and every
    aggregate's accuracy are what the members' rewards from `rmtrain score` give, computed here by hand."""
    from rmtrain.evaluate import run_eval

    pairs = []
    for r in read_jsonl(shared_data / HH)[2300:2312]:
        prompt, chosen = r["chosen"][-700:].rsplit("\n\nAssistant:", 1)
        rejected = r["rejected"].rsplit("\n\nAssistant:", 1)[1]
        pairs.append({"prompt": prompt + "\n\nAssistant:", "chosen": chosen[:200], "rejected": rejected[:200]})
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    results = run_eval(str(run), str(data), max_length=256, bootstrap=0, aggregate=Aggregate.parse("min"))
    block = results["ensemble"]
    assert block["members"] == heads and results["accuracy"] == block["aggregates"]["min"]["accuracy"]
    chosen = torch.tensor([r["rewards"] for r in score_rows(run, [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs], tmp_path, "c")])
    rejected = torch.tensor([r["rewards"] for r in score_rows(run, [{"prompt": p["prompt"], "completion": p["rejected"]} for p in pairs], tmp_path, "r")])
    margins = chosen - rejected
    assert block["member_accuracy"] == pytest.approx((margins > 0).double().mean(0).tolist())
    assert block["aggregates"]["mean"]["accuracy"] == pytest.approx((chosen.mean(1) > rejected.mean(1)).double().mean().item())
    assert block["aggregates"]["min"]["accuracy"] == pytest.approx((chosen.min(1).values > rejected.min(1).values).double().mean().item())
    wrong, spread = margins.mean(1) <= 0, margins.std(1, unbiased=False)
    if wrong.any() and (~wrong).any():  # the share of (wrong, right) pairs whose spread is larger, ties 1/2
        above = (spread[wrong][:, None] > spread[~wrong][None, :]).double() + 0.5 * (spread[wrong][:, None] == spread[~wrong][None, :]).double()
        assert block["spread_auroc"] == pytest.approx(above.mean().item(), abs=1e-6)


@pytest.mark.shared_data
def test_serve_answers_an_ensemble_as_score_reads_it(runs, shared_data, tmp_path):
    """/get_reward: the aggregate in rewards and scores, the mean and spread in extra_logs; /score: every field per
    completion; the numbers `rmtrain score` writes, to the last bit."""
    from tests.test_serve import Server

    run = runs("heads-fp32")
    rows = text_rows(shared_data, 4)
    want = score_rows(run, rows, tmp_path, "uwo", "mean-std:0.5")
    server = Server(str(run), tmp_path, "--aggregate", "mean-std:0.5")
    try:
        status, body = server.post("/get_reward", {"query": [r["prompt"] + r["completion"] for r in rows]})
        assert status == 200
        assert body["rewards"] == body["scores"] == [r["reward"] for r in want]
        assert body["extra_logs"] == {"reward_mean": [r["reward_mean"] for r in want], "reward_std": [r["reward_std"] for r in want]}
        status, body = server.post("/score", {"groups": [{"prompt": r["prompt"], "completions": [r["completion"]]} for r in rows]})
        assert status == 200
        assert body["rewards"] == [[r["reward"]] for r in want]
        assert body["member_rewards"] == [[r["rewards"]] for r in want]
        assert body["reward_std"] == [[r["reward_std"]] for r in want]
        status, body = server.post("/score", {"prompt": rows[0]["prompt"], "completions": [rows[0]["completion"]]})
        assert body["rewards"] == [want[0]["reward"]] and body["reward_mean"] == [want[0]["reward_mean"]]
    finally:
        server.kill()


@pytest.mark.shared_data
def test_members_of_full_runs_score_as_each_run_does(runs, shared_data, tmp_path):
    from rmtrain.ensemble import make_ensemble

    members = [runs("seed-0"), runs("seed-1")]
    folder = make_ensemble([str(m) for m in members], str(tmp_path / "ensemble"))
    manifest = json.loads((folder / "rmtrain_ensemble.json").read_text())
    assert manifest["base"] is None and [m["folder"] for m in manifest["members"]] == ["member-0", "member-1"]
    rows = text_rows(shared_data)
    together = score_rows(folder, rows, tmp_path, "ensemble", "min")
    alone = [score_rows(m, rows, tmp_path, f"alone-{i}") for i, m in enumerate(members)]
    for i, row in enumerate(together):
        assert row["rewards"] == pytest.approx([a[i]["reward"] for a in alone], abs=1e-6)
        assert row["reward"] == min(row["rewards"])


@pytest.mark.shared_data
def test_lora_members_on_one_base_keep_it_once(runs, shared_data, tmp_path):
    """Two LoRA runs over one bf16 base: the folder holds the base once and each adapter with its head; each member's
    rewards are its run's."""
    from rmtrain.ensemble import make_ensemble

    members = [runs("lora-0"), runs("lora-1")]
    folder = make_ensemble([str(m) for m in members], str(tmp_path / "ensemble"))
    assert json.loads((folder / "rmtrain_ensemble.json").read_text())["base"] == "base"
    assert (folder / "base" / "config.json").is_file()
    for member in ("member-0", "member-1"):
        assert sorted(p.name for p in (folder / member).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    rows = text_rows(shared_data)
    together = score_rows(folder, rows, tmp_path, "ensemble")
    alone = [score_rows(m, rows, tmp_path, f"alone-{i}") for i, m in enumerate(members)]
    for i, row in enumerate(together):
        assert row["rewards"] == pytest.approx([a[i]["reward"] for a in alone], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Weight averaging


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.shared_data
def test_average_of_one_run_is_the_run(runs, tmp_path):
    from rmtrain.average import average_runs

    run = runs("seed-0")
    out = average_runs([str(run)], str(tmp_path / "avg"))
    mine, theirs = weights_of(out), weights_of(run)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.shared_data
def test_average_of_two_runs_is_their_weights_averaged_by_hand(runs, shared_data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rmtrain.average import average_runs

    a, b = runs("seed-0"), runs("seed-1")
    out = average_runs([str(a), str(b)], str(tmp_path / "avg"), weights=[3, 1])
    mine, wa, wb = weights_of(out), weights_of(a), weights_of(b)
    for key in mine:
        want = (0.75 * wa[key].double() + 0.25 * wb[key].double()).float() if wa[key].is_floating_point() else wa[key]
        assert torch.equal(mine[key], want), key
    # One plain model: transformers loads it with one logit, rmtrain scores it as any run.
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.num_labels == 1
    # Its format is a run's: plain transformers gets the same rewards once the EOS the run was trained with is appended
    # (what `rmtrain export` builds into the tokenizer).
    eos = json.loads((out / "rmtrain_format.json").read_text())["append_eos"]
    rows = text_rows(shared_data, 3)
    plain = plain_rewards(out, [r | {"completion": r["completion"] + eos} for r in rows])
    assert [r["reward"] for r in score_rows(out, rows, tmp_path, "avg")] == pytest.approx(plain, abs=1e-5)


@pytest.mark.shared_data
def test_average_of_lora_runs_averages_their_merged_weights_in_bf16(runs, tmp_path):
    """LoRA runs over a bf16 base: each merged in fp32, averaged, written in bf16 as the base was loaded."""
    from rmtrain.average import average_runs
    from rmtrain.saved import load_saved, merged_in_fp32

    a, b = runs("lora-0"), runs("lora-1")
    out = average_runs([str(a), str(b)], str(tmp_path / "avg"))
    mine = weights_of(out)
    merged = [merged_in_fp32(load_saved(r)[0].model).state_dict() for r in (a, b)]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for key in mine:
        want = (0.5 * merged[0][key].double() + 0.5 * merged[1][key].double()).float().to(torch.bfloat16)
        assert torch.equal(mine[key], want), key
