"""scripts/bench_gpu.py: its model configs, and its --smoke run (rmtrain and TRL on the CPU) end to end."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rmtrain.flops import matmul_flops_per_token, training_flops
from tests.conftest import FULL

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "configs"


@pytest.mark.parametrize("name, parameters", [("qwen3-0.6b", 596_049_920), ("qwen3-1.7b", 1_720_574_976)])
def test_official_configs(name, parameters):
    """The configs give the published models' parameter counts (tied embeddings: the LM head is the embedding),
    and a one-logit head; per token the FLOPs are 2 x the Linear weights of the layers and the score head."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    values = json.loads((CONFIGS / f"{name}.json").read_text())
    assert values["vocab_size"] == 151936 and values["num_labels"] == 1
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        assert sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters()) == parameters
        model = AutoModelForSequenceClassification.from_config(config)
    assert model.score.out_features == 1
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_flops_per_token(config) == 2 * linear
    assert matmul_flops_per_token(SimpleNamespace(**json.loads((CONFIGS / f"{name}.json").read_text()))) == 2 * linear


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="half a minute on 2 cores; the script's parts are tested above; RMTRAIN_FULL=1 runs the smoke")
def test_smoke_run(shared_data, tmp_path):
    if importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed (pip install trl==1.16.0, or the bench extra)")
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    config = SimpleNamespace(**json.loads((CONFIGS / "qwen3-tiny.json").read_text()))
    layouts = results["pairs"]["layouts"]
    assert results["pairs"]["count"] == 16
    assert layouts["shared_prefix"]["tokens"] < layouts["separate"]["tokens"]
    assert {c["setting"]["gc"] for c in results["cases"]} == {"on", "off"}
    for case in results["cases"]:
        runs = case["runs"]
        assert sorted(r["tool"] for r in runs) == ["rmtrain", "trl"], runs
        for r in runs:
            assert not r.get("failed"), r.get("error")
            assert r["pairs"] == 16 and r["pairs_per_s"] > 0
            assert r["tokens_match"]  # both tools computed the selected pairs' sequences
            for key in ("flops_per_s", "two_sequence_flops_per_s", "tokens_per_s", "peak_memory_bytes"):
                assert math.isfinite(r[key]) and r[key] > 0, key
            on_gpu = results["device"]["type"] == "cuda"
            assert (r["mfu"] is not None) == (on_gpu and results["device"]["peak_flops"] is not None)
        rm = next(r for r in runs if r["tool"] == "rmtrain")
        trl = next(r for r in runs if r["tool"] == "trl")
        assert rm["layout"] == "shared_prefix"
        assert rm["model_flops"] == training_flops(layouts["shared_prefix"]["tokens"], layouts["shared_prefix"]["pairs"], config)
        assert trl["model_flops"] == rm["two_sequence_flops"] == training_flops(layouts["separate"]["tokens"], layouts["separate"]["pairs"], config)
    assert "| run | pairs | pairs/s | tokens/s | peak " in proc.stdout  # peak RSS on the CPU, peak GPU memory on a GPU
    assert "| rmtrain | 16 |" in proc.stdout and "| TRL | 16 |" in proc.stdout
    assert "rmtrain / TRL (medians): pairs/s x" in proc.stdout
