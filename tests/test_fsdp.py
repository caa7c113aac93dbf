"""FSDP2, for real, on 2 CPU processes over gloo (`recipes/accelerate/fsdp2-cpu.yaml`: Accelerate's own FSDP2 code,
which rmtrain switches on for CPU processes), against one process on the same global batch (fp32), with the recipes
of tests/sharded.py: every forward is a collective under FSDP, so the processes' different numbers of passes must be
matched by idle ones. Then sharded checkpoints, a kill -9 and a resume; the gathered final folder read by plain
transformers; bf16 with the score head kept in fp32.
"""

import json
import re
import time

import pytest

from tests.conftest import read_jsonl, write_recipe
from tests.launch import kill_everything, metrics, start_fit
from tests.sharded import ACCELERATE_CONFIGS, RECIPES, assert_same_run, fit, pairs_recipe, run_info

pytestmark = [pytest.mark.shared_data, pytest.mark.slow]

CONFIG = "fsdp2-cpu.yaml"


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_qwen3, shared_data):
    """{case: run folder} of tests.sharded's recipes on 2 FSDP2 processes."""
    found = {}
    for case, recipe in RECIPES.items():
        tmp = tmp_path_factory.mktemp(f"fsdp-{case}")
        console = fit(tmp, recipe(tiny_qwen3, shared_data, tmp / "run", 2), CONFIG)
        assert console.strip().splitlines()[0].startswith("rmtrain fit: 2 process(es) (FSDP)"), console[:500]
        found[case] = tmp / "run"
    return found


@pytest.mark.parametrize("case", list(RECIPES))
def test_fsdp2_on_two_processes_trains_as_one_process(fsdp_runs, single_process_runs, case):
    one, two = single_process_runs(case), fsdp_runs[case]
    info = run_info(two)
    assert (info["num_processes"], info["distributed_type"], info["fsdp_version"]) == (2, "FSDP", 2)
    # The processes split their batches into different numbers of passes: idle forwards kept them in step.
    assert info["idle_forwards"] > 0
    assert run_info(one)["distributed_type"] == "NO"
    assert_same_run(one, two, 1e-4)
    assert [r["step"] for r in metrics(two, "eval")][0] == 2  # an eval between training steps, then training went on
    losses = [r["loss"] for r in metrics(one, "train")]
    assert max(losses) - min(losses) > 1e-3  # the runs moved: the check compares a curve, not a constant


@pytest.mark.parametrize("case", list(RECIPES))
def test_the_gathered_final_folder_gives_the_one_process_rewards_in_plain_transformers(fsdp_runs, single_process_runs, case, shared_data, tmp_path):
    from tests.test_fit import plain_rewards

    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=4)
    texts = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
    folder = "merged" if case == "lists" else "."
    one = plain_rewards(single_process_runs(case) / folder, texts, tmp_path)
    two = plain_rewards(fsdp_runs[case] / folder, texts, tmp_path)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4
    if case == "lists":  # the adapter itself is saved too, from the gathered state dict
        assert (fsdp_runs[case] / "adapter_model.safetensors").is_file()


def test_kill_9_then_resume_from_the_sharded_checkpoint_ends_as_the_uninterrupted_run(fsdp_runs, tmp_path, tiny_qwen3, shared_data):
    out = tmp_path / "run"
    tree = pairs_recipe(tiny_qwen3, shared_data, out, 2)
    log = tmp_path / "first.log"
    process = start_fit(write_recipe(tmp_path, tree), num_processes=2, log=log, config_file=ACCELERATE_CONFIGS / CONFIG)
    checkpoint = out / "checkpoints" / "checkpoint-2"
    deadline = time.monotonic() + 600
    while not (checkpoint / "training_state.json").is_file():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    kill_everything(process)
    assert not (out / "run_info.json").exists()
    assert {"optimizer_0", "pytorch_model_fsdp_0"} <= {p.name for p in checkpoint.iterdir()}  # sharded, one file per rank
    console = fit(tmp_path, tree, CONFIG, "--resume")
    assert re.search(r"resumed from \S+checkpoint-(\d+) at step", " ".join(console.split()))
    assert_same_run(fsdp_runs["pairs"], out, 1e-5)


def test_bf16_under_fsdp2_keeps_the_head_in_fp32_and_saves_the_loaded_dtype(tmp_path, tiny_qwen3, shared_data):
    """FSDP2's bf16 casts every gathered parameter; the score head is a unit of its own kept in fp32."""
    out = tmp_path / "run"
    tree = pairs_recipe(tiny_qwen3, shared_data, out, 2, bf16=True, max_steps=2, save_steps=None)
    tree["model"]["init_kwargs"] = {"dtype": "bfloat16"}
    console = " ".join(fit(tmp_path, tree, CONFIG).split())
    assert "precision bf16" in console and "trained as float32 master weights" in console
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    info = run_info(out)
    assert info["distributed_type"] == "FSDP" and info["final_eval"]["num_pairs"] > 0
