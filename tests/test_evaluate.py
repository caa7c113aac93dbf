"""`rmtrain eval` diagnostics: hand-computed section scores, calibration and rank correlation, and the
--report folder end to end on real models (tiny Qwen3 with the real Qwen tokenizer, MiniLM)."""

import json
import math
from pathlib import Path

import pytest
import torch

from rmtrain.diagnostics import (
    REWARDBENCH_SECTIONS,
    average_ranks,
    calibration,
    length_bias,
    rewardbench_score,
    section_scores,
    spearman,
    subset_accuracy,
)
from rmtrain.batching import sorted_batches
from rmtrain.loss import pair_stats
from tests.conftest import read_jsonl, rmtrain_cli
from tests.test_fit import rmtrain_rewards

LOGIT = lambda p: math.log(p / (1 - p))  # noqa: E731


# --------------------------------------------------------------------------------------------------
# RewardBench sections


def test_section_scores_hand_computed():
    accuracy = {
        "alpacaeval-easy": 0.9,  # Chat: weights 100 and 28
        "mt-bench-easy": 0.5,
        "llmbar-natural": 0.6,  # Chat Hard: weights 100 and 46
        "llmbar-adver-manual": 0.5,
        "donotanswer": 0.25,  # Safety: alone
        "math-prm": 0.4,  # Reasoning: 984, 164, 164
        "hep-go": 1.0,
        "hep-rust": 0.5,
        "my-own-subset": 0.0,  # not RewardBench's: ignored
    }
    sections = section_scores(accuracy)
    assert sections.keys() == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert sections["Chat"] == pytest.approx((90 + 14) / 128)  # 0.8125
    assert sections["Chat Hard"] == pytest.approx((60 + 23) / 146)
    assert sections["Safety"] == pytest.approx(0.25)
    assert sections["Reasoning"] == pytest.approx((393.6 + 164 + 82) / 1312)  # 0.4875
    expected = (0.8125 + 83 / 146 + 0.25 + 0.4875) / 4
    assert rewardbench_score(sections) == pytest.approx(expected)


def test_math_prm_weighs_as_much_as_all_code_subsets():
    hep = [s for s in REWARDBENCH_SECTIONS["Reasoning"] if s.startswith("hep-")]
    assert len(hep) == 6
    sections = section_scores({"math-prm": 0.0, **{s: 1.0 for s in hep}})
    assert sections == {"Reasoning": pytest.approx(0.5)}
    assert rewardbench_score(sections) is None  # not all four sections present


def test_subset_accuracy_counts_ties_as_wrong():
    chosen = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    rejected = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.0])
    got = subset_accuracy(["a", "a", "b", "b", "a"], chosen > rejected)
    assert got == {"a": {"pairs": 3, "accuracy": pytest.approx(2 / 3)}, "b": {"pairs": 2, "accuracy": 0.5}}


# --------------------------------------------------------------------------------------------------
# Calibration


def test_calibration_of_a_calibrated_model_is_zero():
    # Says 0.75 for the chosen side of every pair and is right 3 times in 4.
    margin = torch.tensor([LOGIT(0.75)] * 3 + [-LOGIT(0.75)], dtype=torch.float64)
    result = calibration(margin)
    assert result["ece"] == pytest.approx(0.0, abs=1e-12)
    filled = {round(b["low"], 1): b for b in result["bins"] if b["count"]}
    assert filled.keys() == {0.2, 0.7}
    assert filled[0.7]["count"] == 4 and filled[0.7]["frequency"] == pytest.approx(0.75)
    assert filled[0.7]["mean_probability"] == pytest.approx(0.75)


def test_calibration_known_answer():
    # Two pairs at 0.95, both right (gap 0.05); two at 0.65, one right one wrong (gap 0.15): ECE = 0.1,
    # the same as the top-label ECE of the predicted winner.
    margin = torch.tensor([LOGIT(0.95), LOGIT(0.95), LOGIT(0.65), -LOGIT(0.65)])
    assert calibration(margin)["ece"] == pytest.approx((0.05 + 0.15) / 2)
    # Overconfident: says 0.95 and is right half the time.
    margin = torch.tensor([LOGIT(0.95), LOGIT(0.95), -LOGIT(0.95), -LOGIT(0.95)])
    assert calibration(margin)["ece"] == pytest.approx(0.45)
    assert sum(b["count"] for b in calibration(margin)["bins"]) == 8  # each pair in both orders


# --------------------------------------------------------------------------------------------------
# Rank correlation and length bias


def test_average_ranks_and_spearman_hand_case():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    y = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])  # ranks 1, 2, 3.5, 5, 3.5
    # centered ranks (-2, -1, 0, 1, 2) and (-2, -1, 0.5, 2, 0.5): 8 / sqrt(10 * 9.5)
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95))
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(5)))


def test_length_bias_hand_case():
    chosen = torch.tensor([1.0, 0.0, 2.0, 5.0])
    rejected = torch.tensor([0.0, 1.0, 3.0, 5.0])
    bias = length_bias(chosen, rejected, torch.tensor([10, 5, 3, 4]), torch.tensor([5, 10, 9, 4]))
    assert bias["pairs_chosen_longer"] == 1 and bias["accuracy_chosen_longer"] == 1.0
    assert bias["pairs_chosen_shorter"] == 2 and bias["accuracy_chosen_shorter"] == 0.0
    assert bias["pairs_same_length"] == 1
    rewards, lengths = torch.cat([chosen, rejected]), torch.tensor([10, 5, 3, 4, 5, 10, 9, 4])
    assert bias["spearman_reward_length"] == pytest.approx(spearman(rewards, lengths))


def test_sorted_batches_hand_case():
    ones = [1] * 6
    # Longest first; a batch closes at 3 sequences or when its padding would pass 10% of its padded size:
    # [10, 9] (20 <= 1.1 * 19), then 5 would make 30 > 1.1 * 24; [5, 5, 4] (15 <= 1.1 * 14) is full; [1].
    assert sorted_batches([10, 9, 5, 5, 4, 1], ones, max_sequences=3) == [[0, 1], [2, 3, 4], [5]]
    assert sorted_batches([3, 7], [1, 1], max_sequences=8, max_padding=1.0) == [[1, 0]]
    # A token budget of 12 also closes batches: [10] alone (2 x 10 > 12), [9], [5, 5] (15 > 12 with the 4),
    # then [4, 1] is cut by padding (8 > 1.1 * 5); an item over the budget still gets its own batch.
    assert sorted_batches([10, 9, 5, 5, 4, 1], ones, max_sequences=3, max_tokens=12) == [[0], [1], [2, 3], [4], [5]]
    assert sorted_batches([30, 2], [1, 1], max_sequences=3, max_tokens=12) == [[0], [1]]
    # Items holding several sequences (shared-prefix groups) count them all: two pairs fill 4 sequences.
    assert sorted_batches([6, 6, 6], [2, 2, 2], max_sequences=4) == [[0, 1], [2]]
    # Lists under segment attention pack into one unpadded row: a batch costs the sum of its items, so padding
    # never cuts it, and the token budget counts that sum: [10, 9] would pad to 20 but packs into 19 <= 20, then
    # 19 + 5 > 20; [5, 5, 4, 1] = 15. A batch is packed as soon as it holds a packing item.
    packs = [True] * 6
    assert sorted_batches([10, 9, 5, 5, 4, 1], [3] * 6, max_sequences=12, max_tokens=20, packs=packs) == [[0, 1], [2, 3, 4, 5]]
    assert sorted_batches([10, 2, 1], [3, 2, 2], max_sequences=12, packs=[True, False, False]) == [[0, 1, 2]]
    assert sorted_batches([10, 2, 1], [2, 2, 2], max_sequences=12, packs=[False, False, False]) == [[0], [1], [2]]  # padded


# --------------------------------------------------------------------------------------------------
# End to end


def recompute(records: list[dict]) -> dict:
    chosen = torch.tensor([r["chosen_reward"] for r in records])
    rejected = torch.tensor([r["rejected_reward"] for r in records])
    return pair_stats(chosen, rejected, torch.tensor([r["loss"] for r in records]))


def check_report(report: Path, rows: list[dict], model_dir: str, subset_field: str | None) -> tuple[dict, list[dict]]:
    for name in ("metrics.json", "pairs.jsonl", "reward_histogram.png", "reliability.png", "reward_vs_length.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    assert (report / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((report / "metrics.json").read_text())
    records = [json.loads(line) for line in (report / "pairs.jsonl").read_text().splitlines()]
    assert [r["row"] for r in records] == sorted({r["row"] for r in records})  # each pair once, by source row
    assert metrics["num_pairs"] == len(records) and metrics["num_pairs_read"] == len(rows)
    for key, value in recompute(records).items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    assert metrics["calibration"]["ece"] == pytest.approx(
        calibration(torch.tensor([r["chosen_reward"] - r["rejected_reward"] for r in records]))["ece"], abs=1e-6
    )
    # Rows join back to the source: each pair's rewards are those of its row, scored one sequence at a time.
    ours, _ = rmtrain_rewards(Path(model_dir), [rows[r["row"]] for r in records])
    n = len(records)
    assert max(abs(a - r["chosen_reward"]) for a, r in zip(ours[:n], records)) < 1e-4
    assert max(abs(a - r["rejected_reward"]) for a, r in zip(ours[n:], records)) < 1e-4
    if subset_field:
        assert all(r["subset"] == rows[r["row"]][subset_field] for r in records)
    return metrics, records


SUBSETS = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "hep-go", "math-prm", "llmbar-natural"]


def test_eval_report_tiny_qwen3(tmp_path, tiny_qwen3, shared_data):
    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=30)
    for i, row in enumerate(rows):
        row["subset"] = SUBSETS[i % len(SUBSETS)]
    data = tmp_path / "with_subsets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report"
    result = rmtrain_cli("eval", tiny_qwen3, "--data", str(data), "--report", str(report), "--max-length", "160", "--batch-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, records = check_report(report, rows, tiny_qwen3, "subset")
    assert 0 < len(records) < len(rows)  # --max-length 160 drops some pairs; the others keep their row index
    # Per subset and per section, from pairs.jsonl by hand; each accuracy inside its 95% interval, beside the baselines.
    for subset, entry in metrics["subsets"].items():
        mine = [r for r in records if r["subset"] == subset]
        right = [r["chosen_reward"] > r["rejected_reward"] for r in mine]
        assert entry["pairs"] == len(mine) and entry["accuracy"] == pytest.approx(sum(right) / len(mine))
        low, high = entry["accuracy_interval"]
        assert low <= entry["accuracy"] <= high
        longer = [1.0 if r["chosen_tokens"] > r["rejected_tokens"] else 0.5 if r["chosen_tokens"] == r["rejected_tokens"] else 0.0 for r in mine]
        assert entry["longer_wins"] == pytest.approx(sum(longer) / len(mine)) and entry["shorter_wins"] == pytest.approx(1 - entry["longer_wins"])
    accuracies = {s: e["accuracy"] for s, e in metrics["subsets"].items()}
    assert metrics["subset_mean"]["accuracy"] == pytest.approx(sum(accuracies.values()) / len(accuracies))
    assert metrics["worst_subset"]["accuracy"] == min(accuracies.values()) == accuracies[metrics["worst_subset"]["subset"]]
    assert metrics["bootstrap"]["resamples"] == 1000 and set(metrics["section_intervals"]) == set(metrics["sections"])
    assert metrics["sections"] == pytest.approx(section_scores({s: e["accuracy"] for s, e in metrics["subsets"].items()}))
    assert metrics["rewardbench_score"] == pytest.approx(sum(metrics["sections"].values()) / 4)
    # Response lengths exclude the shared prompt; the console shows the same tables.
    assert all(0 < r["chosen_tokens"] < 160 and 0 < r["rejected_tokens"] < 160 for r in records)
    text = " ".join(result.stderr.split())
    for title in ("accuracy per subset", "RewardBench sections", "calibration: ECE", "length bias: Spearman"):
        assert title in text, title


def test_eval_report_minilm(tmp_path, minilm, shared_data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # The package has no reward head: save one, so that every process loads the same random head.
    torch.manual_seed(0)
    model_dir = str(tmp_path / "minilm-rm")
    AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(model_dir)
    rows = read_jsonl(shared_data / "hh_helpful_base_test.jsonl", limit=12)
    for i, row in enumerate(rows):
        row["source"] = "even" if i % 2 == 0 else "odd"
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report"
    result = rmtrain_cli("eval", model_dir, "--data", str(data), "--report", str(report), "--subset-field", "source", "--max-length", "512")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, records = check_report(report, rows, model_dir, "source")
    assert set(metrics["subsets"]) == {"even", "odd"} and "sections" not in metrics  # not RewardBench's names


def test_eval_unknown_subset_field_is_a_user_error(tmp_path, tiny_qwen3, shared_data):
    report = tmp_path / "report"
    data = shared_data / "hh_harmless_test.jsonl"
    result = rmtrain_cli("eval", tiny_qwen3, "--data", str(data), "--subset-field", "category", "--report", str(report))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {data}: --subset-field: no column 'category' (columns: chosen, rejected)"], lines
    assert not report.exists()


def test_two_process_eval_counts_every_pair_once(tmp_path, tiny_qwen3, shared_data):
    """Under `accelerate launch` (2 processes, uneven last batches) every kept pair is in the report once."""
    import re
    import subprocess
    import sys

    from tests.conftest import ROOT

    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=23)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "report"
    accelerate = Path(sys.executable).parent / "accelerate"
    launched = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "rmtrain", "eval", tiny_qwen3, "--data", str(data), "--max-length", "256",
         "--batch-size", "4", "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    kept = int(re.search(r"23 pairs read, (\d+) kept", " ".join(launched.stderr.split())).group(1))
    metrics, records = check_report(report, rows, tiny_qwen3, None)
    assert len(records) == metrics["num_pairs"] == kept


# --------------------------------------------------------------------------------------------------
# Several models, RewardBench 2, best-of-K in training

TIMING = ("seconds", "pairs_per_s")


def without_timing(results: dict) -> dict:
    """Results without the clocks (two runs of the same scoring take different times)."""
    kept = {k: v for k, v in results.items() if k not in TIMING}
    if "bootstrap" in kept:
        kept["bootstrap"] = {k: v for k, v in kept["bootstrap"].items() if k != "seconds"}
    return kept


def perturbed_copy(source: str, folder: Path) -> str:
    """The model with its reward head nudged: another model, with the same tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(source)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.score.weight.add_(torch.randn(model.score.weight.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(folder)


def minilm_with_head(minilm: str, folder: Path) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return str(folder)


@pytest.mark.shared_data
def test_several_models_equal_single_evals_and_compare_on_rows_all_kept(tmp_path, tiny_qwen3, minilm, shared_data):
    """A, B (the same tokenizer) and C (MiniLM, another tokenizer) in one eval: each model's results are its single
    eval's; the comparison is on the rows every model kept, with differences and McNemar counted from pairs.jsonl."""
    from rmtrain.evaluate import run_eval
    from rmtrain.stats import mcnemar_exact

    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=30)
    for i, row in enumerate(rows):
        row["subset"] = ["left", "right"][i % 2]
    data = str(tmp_path / "rows.jsonl")
    Path(data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = [tiny_qwen3, perturbed_copy(tiny_qwen3, tmp_path / "b"), minilm_with_head(minilm, tmp_path / "c")]
    together = run_eval(paths, data, max_length=110, bootstrap=200, json_out=str(tmp_path / "all.json"))
    assert json.loads((tmp_path / "all.json").read_text()) == json.loads(json.dumps(together))
    records = {}
    for i, path in enumerate(paths):
        alone = run_eval(path, data, max_length=110, bootstrap=200, report_dir=str(tmp_path / f"single-{i}"))
        assert without_timing(together["models"][path]) == without_timing(alone)
        records[path] = {r["row"]: r for r in read_jsonl(tmp_path / f"single-{i}" / "pairs.jsonl")}
    comparison = together["comparison"]
    common = sorted(set.intersection(*(set(r) for r in records.values())))
    assert 0 < len(common) < max(len(r) for r in records.values())  # MiniLM drops pairs the Qwen tokenizer keeps
    assert comparison["rows"] == comparison["pairs"] == len(common)
    assert comparison["rows_left_out"] == {p: len(records[p]) - len(common) for p in paths}
    right = {p: [records[p][row]["correct"] for row in common] for p in paths}
    accuracy = comparison["metrics"]["accuracy"]
    assert accuracy["values"] == pytest.approx([sum(right[p]) / len(common) for p in paths])
    for i, path in enumerate(paths[1:], start=1):
        assert accuracy["differences"][i] == pytest.approx(accuracy["values"][i] - accuracy["values"][0])
        first_only = sum(a and not b for a, b in zip(right[paths[0]], right[path]))
        other_only = sum(b and not a for a, b in zip(right[paths[0]], right[path]))
        assert accuracy["mcnemar"][i] == {"first_only": first_only, "other_only": other_only, "p": mcnemar_exact(first_only, other_only)}
        low, high = accuracy["difference_intervals"][i]
        assert low <= accuracy["differences"][i] <= high
    assert set(comparison["metrics"]) >= {"subsets/left/accuracy", "subsets/right/accuracy", "subset_mean", "worst_subset"}


def best_of_n_by_hand(rewards: list[float]) -> float:
    """RewardBench 2's credit, written out: 1/k when the chosen (first) reward is the top one, k sharing it."""
    top = max(rewards)
    return 1 / rewards.count(top) if rewards[0] == top else 0.0


def test_rewardbench2_file_end_to_end(tmp_path, tiny_qwen3):
    """Rows in RewardBench 2's shape: scored per subset best-of-N (Ties by its formula), the overall score the mean of
    the subsets' scores, each beside the length rulers; the rows' rewards are the lists' in lists.jsonl."""
    from rmtrain import rewardbench2
    from rmtrain.evaluate import run_eval

    words = "the cat sat on a mat while red blue green fox jumped over lazy dog".split()
    text = lambda i, n: " ".join(words[(i + j) % len(words)] for j in range(n))  # noqa: E731
    rows = [{"id": str(i), "prompt": f"Q{i}: {text(i, 4)}", "chosen": [text(i, 3 + i % 5)],
             "rejected": [text(i + k, 2 + (i + k) % 7) for k in range(1, 4)], "subset": ["Focus", "Math"][i % 2]} for i in range(10)]
    for n in range(3):
        rows.append({"id": f"ref:{n}", "prompt": f"Colour {n}?", "chosen": [text(n, 2)], "rejected": [text(n + 5, 4), text(n + 6, 3)], "subset": "Ties"})
        rows.append({"id": f"tied:{n}", "prompt": f"Colour {n}?", "chosen": [text(n, 2), text(n + 1, 3)], "rejected": [text(n + 5, 4)],
                     "subset": "Ties"})
    data = tmp_path / "rb2.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(tiny_qwen3, str(data), max_length=64, report_dir=str(tmp_path / "report"), bootstrap=100)
    block = result["rewardbench2"]
    rewards = {r["row"]: r["rewards"] for r in read_jsonl(tmp_path / "report" / "lists.jsonl")}
    assert block["rows"] == block["rows_read"] == len(rows) and block["rows_dropped"] == 0
    for subset in ("Focus", "Math"):
        mine = [i for i, r in enumerate(rows) if r["subset"] == subset]
        assert block["subsets"][subset]["score"] == pytest.approx(sum(best_of_n_by_hand(rewards[i]) for i in mine) / len(mine))
        assert block["subsets"][subset]["chance"] == pytest.approx(1 / 4)
    ties = [i for i, r in enumerate(rows) if r["subset"] == "Ties"]
    info = [rewardbench2.Row(len(rows[i]["chosen"]), len(rows[i]["chosen"]) + len(rows[i]["rejected"]),
                             (rows[i]["id"].split(":")[0], int(rows[i]["id"].split(":")[1]))) for i in ties]
    outcomes = rewardbench2.row_outcomes(info, [rewards[i] for i in ties])
    expected_ties, _ = rewardbench2.ties_score(outcomes, torch.tensor([r.ties_id[1] for r in info]), None)
    assert block["subsets"]["Ties"]["score"] == pytest.approx(expected_ties.value)
    scores = [block["subsets"][s]["score"] for s in ("Focus", "Math", "Ties")]
    assert block["score"] == pytest.approx(sum(scores) / 3) and block["worst_subset"]["score"] == min(scores)
    low, high = block["interval"]
    assert low <= block["score"] <= high
    for entry in block["subsets"].values():
        assert entry["longest"] is not None and entry["shortest"] is not None


@pytest.mark.shared_data
def test_keep_best_by_best_of_k_regret(tmp_path, tiny_qwen3, shared_data, capsys):
    """train.keep_best: {metric: bestofk_regret} on a ranked-list eval set keeps the eval with the lowest regret."""
    from tests.test_fit import fit_here
    from tests.test_lists import short_lists, write_jsonl

    rows = short_lists(shared_data, 8, completions=4)
    out = tmp_path / "run"
    tree = {
        "model": {"name_or_path": tiny_qwen3},
        "data": {"train": {"path": str(write_jsonl(tmp_path / "train.jsonl", rows[:6]))},
                 "eval": {"path": str(write_jsonl(tmp_path / "eval.jsonl", rows[6:]))}, "max_length": 256},
        "train": {"output_dir": str(out), "per_device_batch_size": 2, "max_steps": 3, "eval_steps": 1, "logging_steps": 1,
                  "learning_rate": 3e-3, "gradient_checkpointing": False, "keep_best": {"metric": "bestofk_regret"}},
    }
    fit_here(tree, capsys)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["split"] == "eval"]
    regrets = [e["bestofk_regret"] for e in evals]
    best = json.loads((out / "run_info.json").read_text())["best"]
    assert best["metric"] == "bestofk_regret" and best["value"] == min(regrets)
    assert best["step"] == evals[regrets.index(min(regrets))]["step"] and (out / "best" / "config.json").is_file()
