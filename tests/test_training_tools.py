"""What users expect of a training tool, on tiny Qwen3 and MiniLM with the shared HH and UltraFeedback data:
trackers (TensorBoard read back with its own event reader, W&B offline, MLflow on a local file store), a data
mixture with weights and eval sources reported one by one, the best checkpoint, curves, the score head in fp32
under bf16 autocast, and a score head that is the same for the same seed."""

import json
import os
from pathlib import Path

import pytest
import torch

from rmtrain.config import ModelConfig, load_recipe
from rmtrain.evaluate import run_eval
from rmtrain.model import load_reward_model
from tests.conftest import read_jsonl, rmtrain_cli, write_recipe

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_qwen3, shared_data):
    """One run that exercises them all: trackers, a two-source mixture with weights, two eval sources, keep_best."""
    root = tmp_path_factory.mktemp("tracked")
    hh, uf = str(shared_data / "hh_harmless_test.jsonl"), str(shared_data / "ultrafeedback_binarized_sample.jsonl")
    out = root / "run"
    tree = {
        "model": {"name_or_path": tiny_qwen3},
        "data": {
            "train": [{"path": hh, "limit": 24, "weight": 0.5}, {"path": uf, "where": {"split": "train_sample"}, "limit": 6, "weight": 2}],
            "eval": [{"path": hh, "skip": 2296}, {"path": uf, "where": {"split": "eval_sample"}, "limit": 8}],
            "max_length": 256, "truncation": "truncate",
        },
        "train": {"output_dir": str(out), "per_device_batch_size": 4, "max_steps": 6, "logging_steps": 1, "eval_steps": 2,
                  "learning_rate": 3e-3, "gradient_checkpointing": False, "keep_best": {"metric": "accuracy"},
                  "report_to": ["tensorboard", "wandb", "mlflow"], "run_name": "sweep-a"},
    }
    recipes = root / "recipes"
    recipes.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
           "MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 keeps its file store for those who ask
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = rmtrain_cli("fit", str(write_recipe(recipes, tree)))
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, root, records, " ".join(result.stderr.split())


def train_values(records, key):
    return {r["step"]: r[key] for r in records if r["split"] == "train"}


def test_tensorboard_gets_the_metrics_of_metrics_jsonl_at_the_same_steps(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, records, _ = tracked_run
    folders = sorted({p.parent for p in (out / "trackers").rglob("events.out.tfevents.*")})
    scalars = {}
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    assert scalars["train/loss"] == pytest.approx(train_values(records, "loss"), abs=1e-6)
    evals = {r["step"]: r for r in records if r["split"] == "eval"}
    assert scalars["eval/accuracy"] == pytest.approx({s: r["accuracy"] for s, r in evals.items()}, abs=1e-6)
    name = next(iter(evals[6]["by_source"]))
    assert f"eval/by_source/{name}/accuracy" in scalars
    # The resolved recipe went in as hyperparameters (TensorBoard's hparams plugin).
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = {}
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        try:
            content = events.PluginTagToContent("hparams")
        except KeyError:  # no hparams in this folder
            content = {}
        if "_hparams_/session_start_info" in content:
            hparams = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["train.learning_rate"].number_value == pytest.approx(3e-3)
    assert hparams["model.name_or_path"].string_value.endswith("tiny-qwen3")


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (`run-ID.wandb`: a LevelDB-style log of W&B's protobuf records,
    32 KiB blocks of chunks with a 7-byte header each, after a 7-byte file header)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, pos, records, parts = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def test_wandb_offline_and_mlflow_file_store_get_the_recipe_and_metrics(tracked_run):
    out, root, records, _ = tracked_run
    run_file = next((out / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = wandb_records(run_file)
    config = {u.key: json.loads(u.value_json) for r in logged if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert config["train.learning_rate"] == 3e-3 and config["train.run_name"] == "sweep-a"
    history = [{("/".join(i.nested_key) or i.key): json.loads(i.value_json) for i in r.history.item}
               for r in logged if r.WhichOneof("record_type") == "history"]
    wandb_loss = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert wandb_loss == pytest.approx(train_values(records, "loss"), abs=1e-6)
    # MLflow: params and metric histories as files (value and step per line).
    run_dir = next(p.parent for p in (root / "mlruns").rglob("meta.yaml") if (p.parent / "params").is_dir())
    assert (run_dir / "params" / "train.learning_rate").read_text().strip() == "0.003"
    history = [line.split() for line in (run_dir / "metrics" / "train" / "loss").read_text().splitlines()]
    assert {int(step): float(value) for _, value, step in history} == pytest.approx(train_values(records, "loss"), abs=1e-6)


def test_mixture_draws_by_weight_and_eval_sources_are_reported_one_by_one(tracked_run, shared_data, tmp_path):
    out, _, records, console = tracked_run
    info = json.loads((out / "run_info.json").read_text())
    # One pre-flight line per source; 24 HH rows at weight 0.5 (12 drawn), 6 UF rows twice.
    assert "train[0] (" in console and "weight 0.5" in console and "train[1] (" in console and "weight 2" in console
    hh_kept = int(console.split("train[0] (")[1].split(" kept")[0].split()[-1])
    uf_kept = int(console.split("train[1] (")[1].split(" kept")[0].split()[-1])
    assert info["train_pairs"] == round(hh_kept * 0.5) + 2 * uf_kept
    final = info["final_eval"]
    assert len(final["by_source"]) == 2
    assert sum(s["num_pairs"] for s in final["by_source"].values()) == final["num_pairs"]
    # `rmtrain eval RUN` without --data: each eval source on its own, the numbers fit logged.
    evaluated = run_eval(str(out), None)["sources"]  # `rmtrain eval RUN`, in this process
    assert list(evaluated) == list(final["by_source"]) == ["hh_harmless_test", "ultrafeedback_binarized_sample"]
    for (_, ours), theirs in zip(final["by_source"].items(), evaluated.values()):
        assert ours["num_pairs"] == theirs["num_pairs"] and ours["accuracy"] == theirs["accuracy"]
        assert abs(ours["loss"] - theirs["loss"]) < 1e-5


def test_best_checkpoint_is_a_plain_model_with_the_best_eval(tracked_run, tmp_path, shared_data):
    out, _, records, _ = tracked_run
    best = json.loads((out / "run_info.json").read_text())["best"]
    evals = [r for r in records if r["split"] == "eval"]
    assert best["metric"] == "accuracy" and best["value"] == max(r["accuracy"] for r in evals)
    assert best["step"] == next(r["step"] for r in evals if r["accuracy"] == best["value"])
    folder = out / "best"
    assert (folder / "config.json").is_file() and (folder / "recipe.yaml").is_file() and not (folder / ".best.tmp").exists()
    # The folder gives that eval's numbers back (both eval sources, as fit scored them).
    recipe = load_recipe(out / "recipe.yaml")
    rows = []
    for source in recipe.data.eval:
        from rmtrain.sources import read_rows

        rows.extend({k: r[k] for k in ("prompt", "chosen", "rejected") if k in r} for r in read_rows(source)[0])
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"chosen": (r.get("prompt") or "") + r["chosen"], "rejected": (r.get("prompt") or "") + r["rejected"]}) + "\n" for r in rows))
    assert run_eval(str(folder), str(data), truncation="truncate")["accuracy"] == best["value"]


def test_curves_are_written_and_rmtrain_plot_overlays_runs(tracked_run, tmp_path):
    out, _, _, _ = tracked_run
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    other = tmp_path / "run-b"  # a second run of the sweep: the same records, half the loss
    other.mkdir()
    halved = [json.loads(line) | {"loss": json.loads(line)["loss"] / 2} for line in (out / "metrics.jsonl").read_text().splitlines()]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in halved))
    result = rmtrain_cli("plot", str(out), str(other), "--out", str(tmp_path / "sweep.png"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_score_head_runs_in_fp32_under_bf16_autocast(tiny_qwen3):
    rm = load_reward_model(ModelConfig(name_or_path=tiny_qwen3))
    seen = {}
    rm.head.register_forward_hook(lambda m, i, o: seen.update(input=i[0], output=o))
    ids = torch.tensor([rm.tokenizer("Human: hi\n\nAssistant: hello" + rm.tokenizer.eos_token)["input_ids"]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rm.model(input_ids=ids)
        plain = torch.nn.functional.linear(seen["input"], rm.head.weight)  # what the head gives without rmtrain
    assert plain.dtype == torch.bfloat16  # autocast runs a plain head's matmul in bf16
    assert seen["output"].dtype == torch.float32
    want = torch.nn.functional.linear(seen["input"].float(), rm.head.weight.float())
    assert torch.equal(seen["output"], want)  # computed in fp32, not rounded to bf16
    assert not torch.equal(plain.float(), want)


def test_a_new_score_head_is_the_same_for_the_same_seed(tmp_path, minilm, shared_data):
    """MiniLM has no reward head: fit draws one. Same seed, same head (TRL issue 4887); another seed, another."""
    from safetensors.torch import load_file

    from rmtrain.config import parse_recipe
    from rmtrain.train import fit

    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=2)
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heads = []
    for i, seed in enumerate((42, 42, 7)):
        out = tmp_path / f"run{i}"
        fit(parse_recipe({"model": {"name_or_path": minilm}, "data": {"train": {"path": str(data)}, "max_length": 512},
                          "train": {"output_dir": str(out), "max_steps": 1, "seed": seed, "gradient_checkpointing": False}}))
        heads.append(load_file(out / "model.safetensors")["classifier.weight"])
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
