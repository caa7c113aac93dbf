"""`make bench`: rmtrain vs TRL 1.16 `RewardTrainer`, same model, data, settings, one process per run.

    python scripts/bench.py [--cases qwen3-hh,minilm-helpful,smollm2-lora-uf] [--quick] [--repeats N]
                            [--ablation] [--out bench-results.json] [--work-dir DIR] [--keep] [--verbose]

Each run is its own subprocess (rmtrain: `python -m rmtrain fit RECIPE --overwrite` with a generated recipe;
TRL: `python scripts/bench_trl.py SPEC.json`), tools alternating (rmtrain, TRL, rmtrain, TRL, ... with
--repeats). Both get the same model, rows, max_length (pairs with a side longer are dropped, TRL's behaviour,
rmtrain's default), per-device batch size (pairs; each pair is a chosen and a rejected sequence), learning
rate (linear decay, no warm-up, AdamW, grad clipping 1.0 -- both tools' defaults), fp32, seed 42, gradient
checkpointing setting, dropout off, 1 epoch, eval batch = train batch. Each tool otherwise runs with its own
defaults: TRL pads chosen and rejected as separate rows in random batches; rmtrain groups batches by length
and, for decoders, computes prompt + chosen + rejected as one sequence (shared prefix) -- the table says which.

Measured per run:
  pairs/s        training only: rmtrain `run_info.json` train.pairs_per_s (its loop clock, evaluation paused);
                 TRL `trainer.train()`'s train_samples_per_second (evaluation off during training). Neither
                 includes model load, tokenization or the final evaluation.
  computed tok   padded tokens fed to the model during training (input_ids.numel() of every batch; TRL: its
                 data collator wrapped to count); real tok: non-padding tokens of those batches (rmtrain's
                 shared-prefix layout holds a pair's common prompt once, so it counts fewer).
  peak RSS       ru_maxrss of the child from os.wait4 (whole process: load, data, training, eval).
  eval acc       rmtrain final_eval.accuracy; TRL eval_accuracy from a separate trainer.evaluate() (TRL's
                 number is a mean of per-batch accuracies; bench_trl.py also reports the per-pair one).
  eval pairs     pairs scored in the final evaluation.

Cases and sizes (default / --quick):
  qwen3-hh         tiny random Qwen3 (2 layers, hidden 128; real Qwen tokenizer, built with
                   tests.assets.build_tiny_qwen3) on hh_harmless_test.jsonl: train the first 1800 / 256 rows,
                   eval the last 512 / 128 rows; batch 8, lr 1e-4, max_length 512, gradient checkpointing on
                   (both tools' default).
  minilm-helpful   MiniLM-L6 (pretrained BERT encoder) on hh_helpful_base_test.jsonl: train the first
                   768 / 128 rows, eval the last 512 / 64; batch 16, lr 5e-5, max_length 512, gradient
                   checkpointing off. TRL gets pre-tokenized chosen_ids/rejected_ids (it crashes on tokenizers
                   without EOS); the ids are exactly what rmtrain builds for an encoder.
  smollm2-lora-uf  SmolLM2-135M-Instruct (GGUF, dequantized to fp32) + LoRA r 16, alpha 32, all-linear,
                   modules_to_save [score] on ultrafeedback_binarized_sample.jsonl (explicit prompt; the file's
                   `margin` column is used by both tools' loss): train the first 128 / 32 rows with
                   split == train_sample, eval the first 64 / 16 rows with split == eval_sample; batch 4,
                   lr 1e-3, max_length 512, gradient checkpointing on. Pad token <|endoftext|> for both (pad is
                   EOS in SmolLM2).
Counts are rows read; pairs longer than max_length are then dropped by both tools alike (the tables show the
pairs actually trained and evaluated; about half of the UltraFeedback rows are longer than 512 tokens). On an
otherwise idle 2-core AMD EPYC the default run takes about 25 minutes, --quick about 6. Other processes
on the machine distort the timings badly (3-10x seen): each run records the CPU that other processes used
meanwhile (from /proc/stat) and the table warns when it exceeds a quarter of a core.

Results: a markdown table per case (paste into the README) with rmtrain/TRL ratios, and `--out` JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.assets import SMOLLM2_GGUF, minilm_dir, shared_data_dir, smollm2_dir  # noqa: E402

HH_ROWS = {"hh_harmless_test.jsonl": 2312, "hh_helpful_base_test.jsonl": 2352}
SEED = 42
MAX_LENGTH = 512
BUSY_CORES = 0.25  # other processes using more CPU than this (in cores) during a run make its timing suspect

# (train rows, eval rows) per case: default, --quick
SIZES = {
    "qwen3-hh": {"default": (1800, 512), "quick": (256, 128)},
    "minilm-helpful": {"default": (768, 512), "quick": (128, 64)},
    "smollm2-lora-uf": {"default": (128, 64), "quick": (32, 16)},
}
CASES = list(SIZES)


# --------------------------------------------------------------------------------------------------
# Machine


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {}
    for pkg in ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "rmtrain"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": cores,
        "ram_gib": round(mem_gib, 1) if mem_gib else None,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "versions": versions,
    }


def machine_line(m: dict) -> str:
    v = m["versions"]
    return (
        f"{m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; python {m['python']}, torch {v['torch']}, "
        f"transformers {v['transformers']}, trl {v['trl']}, accelerate {v['accelerate']}, peft {v['peft']}"
    )


# --------------------------------------------------------------------------------------------------
# Cases -> rmtrain recipe + TRL spec


def case_setup(name: str, quick: bool, data_dir: Path, models_dir: Path) -> dict:
    n_train, n_eval = SIZES[name]["quick" if quick else "default"]
    common = {"max_length": MAX_LENGTH, "seed": SEED, "n_train_rows": n_train, "n_eval_rows": n_eval}
    if name == "qwen3-hh":
        path = str(data_dir / "hh_harmless_test.jsonl")
        return common | {
            "model": str(models_dir / "tiny-qwen3"),
            "gguf_file": None,
            "pad_token": None,
            "pretokenize": False,
            "train": {"path": path, "limit": n_train},
            "eval": {"path": path, "skip": HH_ROWS["hh_harmless_test.jsonl"] - n_eval},
            "columns": ["chosen", "rejected"],
            "batch_size": 8,
            "learning_rate": 1e-4,
            "gradient_checkpointing": True,
            "lora": None,
        }
    if name == "minilm-helpful":
        path = str(data_dir / "hh_helpful_base_test.jsonl")
        return common | {
            "model": minilm_dir(),
            "gguf_file": None,
            "pad_token": None,
            "pretokenize": True,
            "train": {"path": path, "limit": n_train},
            "eval": {"path": path, "skip": HH_ROWS["hh_helpful_base_test.jsonl"] - n_eval},
            "columns": ["chosen", "rejected"],
            "batch_size": 16,
            "learning_rate": 5e-5,
            "gradient_checkpointing": False,
            "lora": None,
        }
    if name == "smollm2-lora-uf":
        path = str(data_dir / "ultrafeedback_binarized_sample.jsonl")
        return common | {
            "model": smollm2_dir(),
            "gguf_file": SMOLLM2_GGUF,
            "pad_token": "<|endoftext|>",
            "pretokenize": False,
            "train": {"path": path, "where": {"split": "train_sample"}, "limit": n_train},
            "eval": {"path": path, "where": {"split": "eval_sample"}, "limit": n_eval},
            "columns": ["prompt", "chosen", "rejected", "margin"],
            "batch_size": 4,
            "learning_rate": 1e-3,
            "gradient_checkpointing": True,
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear", "modules_to_save": ["score"]},
        }
    raise ValueError(name)


def rmtrain_recipe(case: dict, output_dir: Path) -> dict:
    def source(s: dict) -> dict:
        out = {"path": s["path"]}
        for key in ("where", "skip", "limit"):
            if s.get(key):
                out[key] = s[key]
        # Only the columns the TRL run gets (`split`, `score_*` are not preference columns anyway).
        drop = {c: None for c in ("prompt", "margin") if c not in case["columns"]}
        if drop:
            out["columns"] = drop
        return out

    model = {"name_or_path": case["model"], "disable_dropout": True}
    if case["gguf_file"]:
        model["gguf_file"] = case["gguf_file"]
    if case["pad_token"]:
        model["pad_token"] = case["pad_token"]
    recipe = {
        "model": model,
        "data": {
            "train": source(case["train"]),
            "eval": source(case["eval"]),
            "max_length": case["max_length"],
            "truncation": "filter",
        },
        "train": {
            "output_dir": str(output_dir),
            "learning_rate": case["learning_rate"],
            "per_device_batch_size": case["batch_size"],
            "gradient_accumulation_steps": 1,
            "num_epochs": 1,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": case["seed"],
            "bf16": False,
            "gradient_checkpointing": case["gradient_checkpointing"],
            "logging_steps": 10,
        },
    }
    if case["lora"]:
        lora = case["lora"]
        recipe["lora"] = {
            "r": lora["r"],
            "alpha": lora["alpha"],
            "dropout": 0.0,
            "target_modules": lora["target_modules"],
            "modules_to_save": lora["modules_to_save"],
        }
    return recipe


def trl_spec(case: dict, output_dir: Path) -> dict:
    keys = ("model", "gguf_file", "pad_token", "pretokenize", "train", "eval", "columns", "max_length",
            "batch_size", "learning_rate", "gradient_checkpointing", "seed", "lora")
    return {k: case[k] for k in keys} | {"output_dir": str(output_dir)}


# --------------------------------------------------------------------------------------------------
# Running


class RunFailed(RuntimeError):
    pass


def cpu_busy_seconds() -> float | None:
    """CPU time the whole machine has spent busy (all cores, all processes), from /proc/stat."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_child(cmd: list[str], log_file: Path, verbose: bool, stdout_file: Path | None = None) -> dict:
    """Run `cmd`; return wall seconds, peak RSS (KiB), its CPU seconds, and the CPU other processes used meanwhile
    (in cores, to flag a busy machine). Output goes to `log_file` (and the console if verbose)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "warning", "COLUMNS": "160"}
    busy_before = cpu_busy_seconds()
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tee = None
        if verbose:
            log_file.write_bytes(b"")
            tee = subprocess.Popen(["tee", "-a", str(log_file)], stdin=subprocess.PIPE, stdout=sys.stderr)
            stack.callback(tee.wait)
            stack.callback(tee.stdin.close)
            err = tee.stdin
        else:
            err = stack.enter_context(open(log_file, "wb"))
        out = stack.enter_context(open(stdout_file, "wb")) if stdout_file else err
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    busy_after = cpu_busy_seconds()
    cpu = usage.ru_utime + usage.ru_stime
    other = None
    if busy_before is not None and busy_after is not None:
        other = max(0.0, (busy_after - busy_before - cpu) / seconds)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise RunFailed(f"{' '.join(cmd)} exited with {proc.returncode}; last lines of {log_file}:\n{tail}")
    return {"wall_seconds": seconds, "peak_rss_kib": usage.ru_maxrss,  # KiB on Linux
            "cpu_seconds": cpu, "other_cpu_cores": other}


def run_rmtrain(case: dict, run_dir: Path, verbose: bool, train_overrides: dict | None = None) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "run"
    recipe_file = run_dir / "recipe.yaml"
    recipe = rmtrain_recipe(case, out)
    recipe["train"] |= train_overrides or {}
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    child = run_child([sys.executable, "-m", "rmtrain", "fit", str(recipe_file), "--overwrite"], run_dir / "log.txt", verbose)
    layout = re.search(r"batches: (.*?)(?:\n|$)", (run_dir / "log.txt").read_text(errors="replace"))
    info = json.loads((out / "run_info.json").read_text())
    t, ev = info["train"], info["final_eval"] or {}
    return {
        "tool": "rmtrain",
        "train_pairs": info["train_pairs"],
        "eval_pairs": info["eval_pairs"],
        "pairs_per_s": t["pairs_per_s"],
        "train_seconds": t["seconds"],
        "pairs_trained": t["pairs"],
        "computed_tokens": t["computed_tokens"],
        "real_tokens": t["real_tokens"],
        "eval_accuracy": ev.get("accuracy"),
        "eval_pairs_scored": ev.get("num_pairs", info["eval_pairs"]),
        "eval_loss": ev.get("loss"),
        "steps": info["steps"],
        "batches": layout.group(1).strip() if layout else None,
        **child,
        "raw": info,
    }


def run_trl(case: dict, run_dir: Path, verbose: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file = run_dir / "spec.json"
    spec_file.write_text(json.dumps(trl_spec(case, run_dir / "run"), indent=2))
    result_file = run_dir / "result.jsonl"
    child = run_child(
        [sys.executable, str(ROOT / "scripts" / "bench_trl.py"), str(spec_file)], run_dir / "log.txt", verbose, result_file
    )
    lines = [line for line in result_file.read_text().splitlines() if line.strip()]
    if len(lines) != 1:
        raise RunFailed(f"bench_trl.py printed {len(lines)} lines on stdout, expected one JSON line: {result_file}")
    res = json.loads(lines[0])
    t, ev = res["train"], res["eval"]
    return {
        "tool": "trl",
        "train_pairs": res["train_pairs"],
        "eval_pairs": res["eval_pairs"],
        "pairs_per_s": t["pairs_per_s"],
        "train_seconds": t["seconds"],
        "pairs_trained": t["pairs"],
        "computed_tokens": t["computed_tokens"],
        "real_tokens": t["real_tokens"],
        "eval_accuracy": ev["accuracy"],
        "eval_accuracy_per_pair": ev["accuracy_per_pair"],
        "eval_pairs_scored": ev["pairs"],
        "eval_loss": ev["loss"],
        "steps": t["steps"],
        "batches": "plain layout, random order",
        **child,
        "raw": res,
    }


def build_models(work: Path, cases: list[str], verbose: bool) -> Path:
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    if "qwen3-hh" in cases:
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.assets import build_tiny_qwen3; build_tiny_qwen3(sys.argv[1])"
        run_child([sys.executable, "-c", code, str(models / "tiny-qwen3")], work / "build-tiny-qwen3.log", verbose)
    return models


# --------------------------------------------------------------------------------------------------
# Ablation (--ablation): rmtrain alone, adding one technique at a time, same case and seed

# (label, train overrides, which models): one technique at a time from TRL-like batches, one pass per
# batch, every embedding row optimized. rmtrain's defaults (the main bench run: length-grouped, shared prefix
# for decoders, seen embedding rows, passes of at most max_tokens_per_forward: auto tokens) follow, then the
# earlier fixed pass budget. "decoders": not for encoders; "full": not for LoRA (its embedding is frozen).
TRL_LIKE = {"batching": "plain", "share_prefix": False, "padding_free": False, "embedding_rows": "all", "max_tokens_per_forward": None}
ABLATION = [
    ("plain: random batches, two padded rows per pair", TRL_LIKE, "all"),
    ("+ length-grouped batches", TRL_LIKE | {"batching": "length_grouped"}, "all"),
    ("+ length-grouped + padding-free", TRL_LIKE | {"batching": "length_grouped", "padding_free": True}, "decoders"),
    ("+ length-grouped + shared prefix", TRL_LIKE | {"batching": "length_grouped", "share_prefix": True}, "decoders"),
    ("+ length-grouped + seen embedding rows", TRL_LIKE | {"batching": "length_grouped", "embedding_rows": "seen"}, "encoders"),
    ("+ length-grouped + shared prefix + seen embedding rows",
     TRL_LIKE | {"batching": "length_grouped", "share_prefix": True, "embedding_rows": "seen"}, "full decoders"),
]
PASS_TOKENS = 8192
PASSES = (f"defaults with passes of at most {PASS_TOKENS} tokens (the fixed default before auto)", {"max_tokens_per_forward": PASS_TOKENS})


def ablation_table(name: str, case: dict, rows: list[tuple[str, dict]], trl: dict) -> str:
    header = ("rmtrain run", "pairs/s", "vs plain", "vs TRL", "computed tok", "computed/real", "peak RSS GiB", "RSS vs TRL",
              "eval acc", "acc - plain")
    lines = [f"**Ablation, {name}** (same settings and data as above, rmtrain only; TRL's run above for the ratios)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    plain = rows[0][1]
    for label, r in rows:
        cells = (label, f"{r['pairs_per_s']:.2f}", f"x{r['pairs_per_s'] / plain['pairs_per_s']:.2f}",
                 f"x{r['pairs_per_s'] / trl['pairs_per_s']:.2f}", f"{r['computed_tokens']:,}",
                 f"{r['computed_tokens'] / r['real_tokens']:.2f}", f"{r['peak_rss_kib'] / 2**20:.2f}",
                 f"x{r['peak_rss_kib'] / trl['peak_rss_kib']:.2f}", f"{r['eval_accuracy']:.3f}",
                 f"{r['eval_accuracy'] - plain['eval_accuracy']:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    busy = [r for _, r in rows if r["other_cpu_cores"] and r["other_cpu_cores"] > BUSY_CORES]
    if busy:
        lines.append(f"\nWARNING: other processes used up to {max(r['other_cpu_cores'] for r in busy):.1f} cores during {len(busy)} of these runs.")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reporting


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    by_tool = {tool: [r for r in runs if r["tool"] == tool] for tool in ("rmtrain", "trl")}
    summary = {}
    for tool, rs in by_tool.items():
        summary[tool] = {
            "pairs_per_s": _median(r["pairs_per_s"] for r in rs),
            "computed_tokens": _median(r["computed_tokens"] for r in rs),
            "real_tokens": _median(r["real_tokens"] for r in rs),
            "peak_rss_kib": max(r["peak_rss_kib"] for r in rs),
            "eval_accuracy": statistics.mean(r["eval_accuracy"] for r in rs),
            "eval_pairs_scored": _median(r["eval_pairs_scored"] for r in rs),
            "train_pairs": _median(r["train_pairs"] for r in rs),
        }
    a, b = summary["rmtrain"], summary["trl"]
    summary["ratio"] = {
        "pairs_per_s": a["pairs_per_s"] / b["pairs_per_s"],
        "computed_tokens": a["computed_tokens"] / b["computed_tokens"],
        "peak_rss": a["peak_rss_kib"] / b["peak_rss_kib"],
        "accuracy_diff": a["eval_accuracy"] - b["eval_accuracy"],
    }
    return summary


def case_title(name: str, case: dict) -> str:
    lora = ", LoRA r16" if case["lora"] else ""
    return (
        f"{name}: {case['n_train_rows']} train rows / {case['n_eval_rows']} eval rows, batch {case['batch_size']}, "
        f"max_length {case['max_length']}, lr {case['learning_rate']:g}, fp32, gradient checkpointing "
        f"{'on' if case['gradient_checkpointing'] else 'off'}{lora}, 1 epoch, seed {case['seed']}"
    )


def case_table(name: str, case: dict, runs: list[dict], summary: dict) -> str:
    header = ("run", "train pairs", "pairs/s", "train s", "computed tok", "real tok", "computed/real",
              "peak RSS GiB", "eval acc", "eval pairs")
    lines = [f"**{case_title(name, case)}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    count = {"rmtrain": 0, "trl": 0}
    for r in runs:
        count[r["tool"]] += 1
        label = ("rmtrain" if r["tool"] == "rmtrain" else "TRL") + (f" #{count[r['tool']]}" if len(runs) > 2 else "")
        acc = f"{r['eval_accuracy']:.3f}"
        if r["tool"] == "trl" and r.get("eval_accuracy_per_pair") is not None and abs(r["eval_accuracy_per_pair"] - r["eval_accuracy"]) > 5e-4:
            acc += f" ({r['eval_accuracy_per_pair']:.3f} per pair)"
        cells = (label, r["pairs_trained"], f"{r['pairs_per_s']:.2f}", f"{r['train_seconds']:.1f}",
                 f"{r['computed_tokens']:,}", f"{r['real_tokens']:,}", f"{r['computed_tokens'] / r['real_tokens']:.2f}",
                 f"{r['peak_rss_kib'] / 2**20:.2f}", acc, r["eval_pairs_scored"])
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    q = summary["ratio"]
    rm_batches = next((r["batches"] for r in runs if r["tool"] == "rmtrain" and r["batches"]), None)
    lines += [
        "",
        f"Batches: rmtrain {rm_batches or '?'} (its defaults); TRL plain layout (chosen and rejected as padded rows), "
        "random order.",
    ]
    busy = [r for r in runs if r["other_cpu_cores"] and r["other_cpu_cores"] > BUSY_CORES]
    if busy:
        lines.append(
            f"WARNING: other processes used up to {max(r['other_cpu_cores'] for r in busy):.1f} cores during "
            f"{len(busy)} of these runs; their timings are not comparable."
        )
    lines += [
        "",
        f"rmtrain / TRL: pairs/s x{q['pairs_per_s']:.2f}, tokens computed x{q['computed_tokens']:.2f}, "
        f"peak RSS x{q['peak_rss']:.2f}, eval accuracy {q['accuracy_diff']:+.3f}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def check_prerequisites() -> Path | None:
    """The shared data folder, or None after saying what is missing (TRL or ../shared/data)."""
    if importlib.util.find_spec("trl") is None:
        print("error: TRL is not installed in this environment: pip install trl==1.16.0", file=sys.stderr)
        return None
    data_dir = shared_data_dir()
    if data_dir is None:
        print("error: ../shared/data (the preference data) is absent", file=sys.stderr)
    return data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a ~5 minute smoke run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and case, alternating (default 1)")
    parser.add_argument("--out", default="bench-results.json", help="results JSON (default bench-results.json)")
    parser.add_argument("--work-dir", default=None, help="folder for recipes, logs and run outputs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (always kept on failure)")
    parser.add_argument("--verbose", action="store_true", help="stream the children's output")
    parser.add_argument("--ablation", action="store_true",
                        help="also run rmtrain with one technique at a time (plain, length-grouped, padding-free, shared prefix)")
    args = parser.parse_args()

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in SIZES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    data_dir = check_prerequisites()
    if data_dir is None:
        return 2

    machine = machine_info()
    print(f"Machine: {machine_line(machine)}")
    print(f"Sizes ({'--quick' if args.quick else 'default'}): " + "; ".join(
        f"{c} {SIZES[c]['quick' if args.quick else 'default'][0]} train / {SIZES[c]['quick' if args.quick else 'default'][1]} eval rows"
        for c in cases))
    print(f"Repeats: {args.repeats} per tool, alternating rmtrain / TRL; one subprocess per run.", flush=True)

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rmtrain-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.work_dir is not None
    results = {"machine": machine, "quick": args.quick, "repeats": args.repeats, "cases": {}}
    tables = []
    failed = False
    started = time.perf_counter()
    try:
        models = build_models(work, cases, args.verbose)
        for name in cases:
            case = case_setup(name, args.quick, data_dir, models)
            runs = []
            for rep in range(args.repeats):
                for tool, runner in (("rmtrain", run_rmtrain), ("trl", run_trl)):
                    run_dir = work / name / f"{tool}-{rep + 1}"
                    print(f"[{time.perf_counter() - started:6.0f}s] {name}: {tool} run {rep + 1}/{args.repeats} ...", end=" ", flush=True)
                    r = runner(case, run_dir, args.verbose)
                    runs.append(r)
                    busy = r["other_cpu_cores"]
                    print(f"{r['pairs_per_s']:.2f} pairs/s, peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB, "
                          f"eval acc {r['eval_accuracy']:.3f}, {r['wall_seconds']:.0f}s wall"
                          + (f"  [BUSY MACHINE: other processes used {busy:.1f} cores]" if busy and busy > BUSY_CORES else ""),
                          flush=True)
            summary = summarize(runs)
            results["cases"][name] = {"settings": {k: v for k, v in case.items()}, "runs": runs, "summary": summary}
            table = case_table(name, case, runs, summary)
            if args.ablation:
                kind = {"encoders"} if name == "minilm-helpful" else {"decoders"} | ({"full decoders"} if "lora" not in name else set())
                rows = []
                variants = [(label, o) for label, o, models in ABLATION if models == "all" or models in kind]
                for i, (label, overrides) in enumerate(variants + [PASSES]):
                    print(f"[{time.perf_counter() - started:6.0f}s] {name}: ablation {label} ...", end=" ", flush=True)
                    r = run_rmtrain(case, work / name / f"ablation-{i}", args.verbose, overrides)
                    print(f"{r['pairs_per_s']:.2f} pairs/s, peak RSS {r['peak_rss_kib'] / 2**20:.2f} GiB, eval acc {r['eval_accuracy']:.3f}", flush=True)
                    rows.append((label, r))
                default_run = next(r for r in runs if r["tool"] == "rmtrain")
                budget = default_run["raw"].get("max_tokens_per_forward")
                rows.insert(len(variants), (f"rmtrain defaults (auto: passes of at most {budget} tokens)", default_run))
                trl = next(r for r in runs if r["tool"] == "trl")
                results["cases"][name]["ablation"] = [{"label": label, **r} for label, r in rows]
                table += "\n\n" + ablation_table(name, case, rows, trl)
            tables.append(table)
            print("\n" + table + "\n", flush=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # partial results survive a later failure
    except RunFailed as error:
        failed = True
        print(f"\nerror: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("\ninterrupted", file=sys.stderr)
    finally:
        results["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        if keep or failed:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if tables:
        print(f"## rmtrain vs TRL {machine['versions']['trl']} RewardTrainer\n")
        print(f"Machine: {machine_line(machine)}\n")
        print("\n\n".join(tables))
        print(f"\nTotal {results['seconds'] / 60:.1f} min; results in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
