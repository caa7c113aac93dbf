"""DeepSpeed ZeRO-2 and ZeRO-3, for real, on 2 CPU processes (DeepSpeed's CPU accelerator over gloo; the shipped
`recipes/accelerate/deepspeed-zero*.yaml`), against one process on the same global batch (fp32), with the recipes of
tests/sharded.py; the gathered final folder read by plain transformers; a non-finite step skipped by DeepSpeed's own
check (it steps inside the last backward), counted, and the run stopped naming the rows. Skipped when DeepSpeed is
not installed (it is not an rmtrain dependency; the test extra installs it)."""

import importlib.util
import re
import time

import pytest

from tests.conftest import FULL, read_jsonl, write_recipe
from tests.launch import kill_everything, metrics, start_fit
from tests.sharded import ACCELERATE_CONFIGS, RECIPES, assert_same_run, fit, pairs_recipe, run_info

pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install 'deepspeed>=0.19.8')"),
]

# LoRA on lists under ZeRO-3 (the adapter merged with the parameters partitioned, an eval between steps); under
# RMTRAIN_FULL=1 also ZeRO-2 (segment attention through the DeepSpeedEngine; tests/test_model.py unwraps a stand-in
# engine in make test) and the full fine-tunes on pairs.
CASES = {"zero3-lists": ("deepspeed-zero3.yaml", "lists")}
if FULL:
    CASES |= {"zero2-lists": ("deepspeed-zero2.yaml", "lists"), "zero2-pairs": ("deepspeed-zero2.yaml", "pairs"),
              "zero3-pairs": ("deepspeed-zero3.yaml", "pairs")}


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory, tiny_qwen3, shared_data):
    found = {}
    for name, (config, case) in CASES.items():
        tmp = tmp_path_factory.mktemp(name)
        console = fit(tmp, RECIPES[case](tiny_qwen3, shared_data, tmp / "run", 2), config)
        assert console.strip().splitlines()[0].startswith("rmtrain fit: 2 process(es) (DEEPSPEED)"), console[:500]
        found[name] = tmp / "run", console
    return found


@pytest.mark.parametrize("name", list(CASES))
def test_deepspeed_on_two_processes_trains_as_one_process(deepspeed_runs, single_process_runs, name):
    out, console = deepspeed_runs[name]
    info = run_info(out)
    assert (info["num_processes"], info["distributed_type"]) == (2, "DEEPSPEED")
    # DeepSpeed steps inside backward: one pass per batch (the recipe's token budget does not apply).
    assert "each batch runs in one pass" in " ".join(console.split())
    if name.startswith("zero3"):  # partitioned from the load: the mask instead of the unchecked segment attention
        assert "using the 4D mask" in " ".join(console.split())
    elif name == "zero2-lists":  # segment attention, recognised through the engine (which has a .config of its own)
        assert "4D mask" not in " ".join(console.split())
    assert_same_run(single_process_runs(CASES[name][1]), out, 1e-4)
    assert [r["step"] for r in metrics(out, "eval")][0] == 2  # an eval between training steps, then training went on


@pytest.mark.parametrize("name", list(CASES))
def test_the_gathered_final_folder_gives_the_one_process_rewards(deepspeed_runs, single_process_runs, name, shared_data, tmp_path):
    from tests.test_fit import plain_rewards

    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=4)
    texts = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
    folder = "merged" if CASES[name][1] == "lists" else "."
    one = plain_rewards(single_process_runs(CASES[name][1]) / folder, texts, tmp_path)
    two = plain_rewards(deepspeed_runs[name][0] / folder, texts, tmp_path)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4


def test_a_non_finite_step_is_skipped_by_deepspeed_and_the_run_stops_naming_the_rows(tmp_path, tiny_qwen3, shared_data):
    """A learning rate of 1e30: after the first step the forward overflows. DeepSpeed applies its steps inside
    backward; rmtrain makes the last backward of a non-finite step NaN, so DeepSpeed's own check skips it."""
    from tests.conftest import write_recipe
    from tests.launch import run_fit
    from tests.sharded import ACCELERATE_CONFIGS

    out = tmp_path / "run"
    tree = pairs_recipe(tiny_qwen3, shared_data, out, 2, learning_rate=1e30, save_steps=1, max_nonfinite_steps=2, eval_steps=None)
    tree["data"].pop("eval")
    result = run_fit(write_recipe(tmp_path, tree), num_processes=2, config_file=ACCELERATE_CONFIGS / "deepspeed-zero3.yaml")
    assert result.returncode != 0
    text = " ".join(result.stderr.split())
    assert "step 2: non-finite loss or gradient norm, optimizer step skipped (1 in a row)" in text
    assert re.search(r"error: train.max_nonfinite_steps: 2 optimizer steps in a row \(up to step 3\).*last batch: rows [\d, ]+ of", text)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]  # skipped steps save nothing
    assert [r["step"] for r in metrics(out, "train")] == [1]


@pytest.mark.skipif(not FULL, reason="about a minute on 2 cores; RMTRAIN_FULL=1 runs it (FSDP2's is in make test)")
def test_kill_9_then_resume_under_zero3_ends_as_the_uninterrupted_run(tmp_path, tiny_qwen3, shared_data):
    reference = tmp_path / "reference"
    tree = pairs_recipe(tiny_qwen3, shared_data, reference, 2)
    fit(tmp_path, tree, "deepspeed-zero3.yaml")
    out = tmp_path / "run"
    tree["train"]["output_dir"] = str(out)
    log = tmp_path / "first.log"
    process = start_fit(write_recipe(tmp_path, tree), num_processes=2, log=log, config_file=ACCELERATE_CONFIGS / "deepspeed-zero3.yaml")
    checkpoint = out / "checkpoints" / "checkpoint-2"
    deadline = time.monotonic() + 600
    while not (checkpoint / "training_state.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    kill_everything(process)
    console = fit(tmp_path, tree, "deepspeed-zero3.yaml", "--resume")
    assert re.search(r"resumed from \S+checkpoint-(\d+) at step", " ".join(console.split()))
    assert_same_run(reference, out, 1e-5)
