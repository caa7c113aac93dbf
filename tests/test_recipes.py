"""Every shipped recipe runs as written, in its own dtype and settings (bf16 where a GPU would take it, LoRA, merge,
attention), with the model and data swapped for the offline tiny ones: 2 steps of `fit` with an eval between them,
then `eval`, `score`, `serve` and `export` on the result, in the same dtype."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import FULL, ROOT

pytestmark = pytest.mark.shared_data

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.yaml"))
# In `make test`: the bf16 recipes (a full fine-tune, LoRA with merge); every recipe under RMTRAIN_FULL=1.
REDUCED = ["qwen3.yaml", "qwen3-4b-lora.yaml"]


def offline(recipe: dict, tiny_qwen3: str, minilm: str, shared_data: Path, out: Path) -> dict:
    """The recipe with the model and data swapped for offline tiny ones and 2 steps; every other setting as written.

    bf16: null (a GPU's choice, bf16) becomes true: what users run, on CPU autocast."""
    model = dict(recipe["model"])
    encoder = "MiniLM" in model["name_or_path"]
    model["name_or_path"] = minilm if encoder else tiny_qwen3
    model.pop("gguf_file", None)
    kwargs = dict(model.get("init_kwargs") or {})
    if str(kwargs.get("attn_implementation", "")).startswith("flash"):
        kwargs.pop("attn_implementation")  # CUDA kernels: not on this machine
    model["init_kwargs"] = kwargs
    uf = str(shared_data / "ultrafeedback_binarized_sample.jsonl")
    hh = str(shared_data / "hh_harmless_test.jsonl")

    def source(value: dict, split: str) -> dict:
        if Path(value["path"]).suffix:  # a local file: the same one from ../shared/data, fewer rows
            path = value["path"].replace("../shared/data", str(shared_data)) if "shared/data" in value["path"] else hh
            limit = 24 if split == "train" else 8
            return {**value, "path": path, "limit": limit} | ({"skip": 2000} if split == "eval" and path == hh else {})
        return {"path": uf, "where": {"split": f"{split}_sample"}, "limit": 24 if split == "train" else 12}  # a Hub dataset

    data = dict(recipe["data"]) | {"max_length": min(recipe["data"].get("max_length", 1024), 512)}
    data["train"] = source(data["train"], "train")
    if data.get("eval"):
        data["eval"] = source(data["eval"], "eval")
    train = dict(recipe["train"]) | {
        "output_dir": str(out), "max_steps": 2, "eval_steps": 1, "save_steps": 1, "logging_steps": 1,
        "per_device_batch_size": min(recipe["train"].get("per_device_batch_size", 8), 2),
        "gradient_accumulation_steps": min(recipe["train"].get("gradient_accumulation_steps", 1), 2),
    }
    if train.get("bf16") is None:
        train["bf16"] = True
    return {**recipe, "model": model, "data": data, "train": train}


def fresh_accelerate_state() -> None:
    """Each command runs in a process of its own; in this one, Accelerate's process-wide state (the mixed precision
    fit set) is reset between them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fresh_fit(tree: dict) -> dict:
    from rmtrain.config import parse_recipe
    from rmtrain.train import fit

    fresh_accelerate_state()
    info = fit(parse_recipe(tree))
    fresh_accelerate_state()
    return info


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES if FULL else REDUCED)
def test_shipped_recipe_runs_in_its_own_dtype_then_eval_score_serve_export(name, tiny_qwen3, minilm, shared_data, tmp_path):
    from fastapi.testclient import TestClient

    from rmtrain.evaluate import run_eval
    from rmtrain.export import export_model
    from rmtrain.saved import load_saved
    from rmtrain.score import run_score
    from rmtrain.inference import prepare_inference
    from rmtrain.rounds import Scorer
    from rmtrain.routes import Tokens
    from rmtrain.serve import create_app

    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
    tree = offline(recipe, tiny_qwen3, minilm, shared_data, tmp_path / "run")
    info = fresh_fit(tree)
    run = tmp_path / "run"
    assert info["complete"] and info["steps"] == 2
    bf16 = tree["train"]["bf16"]
    loaded = tree["model"]["init_kwargs"].get("dtype", "float32")
    lora = recipe.get("lora") is not None
    folder = run / "merged" if lora and recipe["lora"].get("merge") else run
    # Saved in the dtype the recipe loaded (a full fine-tune trained fp32 master weights of it).
    config = json.loads(((run / "merged" if lora else run) / "config.json").read_text())
    assert config["dtype"] == loaded
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["split"] == "eval"] == [1, 2]  # the eval between the steps, then the final one

    # eval reproduces fit's final eval: to fp32 noise, or within bf16's resolution for a bf16 model or autocast.
    tolerance = 2e-2 if bf16 or loaded != "float32" else 1e-5
    final, results = info["final_eval"], run_eval(str(run), None)
    assert abs(results["loss"] - final["loss"]) <= tolerance * max(1, abs(final["loss"]))
    assert abs(results["mean_reward"] - final["mean_reward"]) <= tolerance * max(1, final["std_reward"] * 10)

    # score and serve give the same rewards (one inference path, the same dtype and head); a merged folder gives
    # the adapter's within the dtype's resolution.
    rows = [json.loads(line) for line in (shared_data / "ultrafeedback_binarized_sample.jsonl").read_text().splitlines()[:4]]
    texts = [row["prompt"] + row["chosen"] for row in rows]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def score(model: Path) -> list[float]:
        scored = tmp_path / f"{model.name}.scores.jsonl"
        run_score(str(model), str(data), str(scored), in_order=True)
        return [json.loads(line)["reward"] for line in scored.read_text().splitlines()]

    score_rewards = score(run)
    spread = max(1.0, max(abs(r) for r in score_rewards))
    if folder != run:
        assert max(abs(a - b) for a, b in zip(score(folder), score_rewards)) <= tolerance * spread
    rm, max_length = load_saved(run)
    assert rm.weights_dtype == getattr(torch, loaded)
    scorer = Scorer(prepare_inference(rm, 2048, 16), 0.001).start()
    with TestClient(create_app(scorer, Tokens(rm, max_length))) as client:
        answer = client.post("/get_reward", json={"query": texts})
    assert answer.status_code == 200, answer.text
    assert max(abs(a - b) for a, b in zip(answer.json()["rewards"], score_rewards)) < 1e-5

    # export: a plain fp32 folder, checked by plain transformers in a fresh process; its rewards are the run's
    # within the run's precision.
    exported = export_model(str(run), str(tmp_path / "exported"), merge=lora, check_pairs=4)
    assert exported["check_max_abs_diff"] is not None
    assert max(abs(a - b) for a, b in zip(score(tmp_path / "exported"), score_rewards)) <= tolerance * spread
