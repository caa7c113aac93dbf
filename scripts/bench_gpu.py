"""rmtrain vs TRL 1.16 `RewardTrainer` on real model sizes: Qwen3-0.6B and Qwen3-1.7B, random weights, one GPU.

    python scripts/bench_gpu.py [--models qwen3-0.6b,qwen3-1.7b] [--attn sdpa,flash_attention_2] [--gc on,off]
                                [--repeats N] [--pairs N] [--batch-size 8] [--max-length 1024] [--dtype bfloat16]
                                [--autocast auto|bf16|off] [--peak-tflops T] [--out bench-gpu-results.json]
                                [--work-dir DIR] [--keep] [--verbose]
    python scripts/bench_gpu.py --smoke [--out FILE]    # the same code path on CPU in under 2 minutes

What runs. Each model is built from its config (`scripts/configs/<name>.json`: the official Qwen3 config.json,
`num_labels: 1`) with random weights (seed 42) and saved with the real Qwen tokenizer (tests.assets, built offline),
so both tools load the same weights; no checkpoint is downloaded. The rows are the first `--pairs` rows of the
UltraFeedback sample (`split == train_sample`, explicit prompt, no margin) whose chosen and rejected both fit
`--max-length` tokens (the filter both tools apply; rows with an empty answer, which rmtrain refuses, are left
out), written to one file both tools read: both train the same pairs. Then, for every model x attention x gradient
checkpointing setting, `rmtrain fit` and TRL's `RewardTrainer` each in its own subprocess, alternating (rmtrain,
TRL, rmtrain, ... with --repeats), as scripts/bench.py does: same batch size (pairs), max_length, learning rate
(1e-4, linear decay, no warm-up, AdamW, clipping 1.0), weights dtype (`--dtype`, both tools' `dtype` load argument),
bf16 autocast (`--autocast`; auto: on where CUDA supports bf16), attention implementation, gradient checkpointing,
seed, dropout off, 1 epoch, no evaluation. Each tool otherwise keeps its defaults: TRL pads chosen and rejected
as separate rows in random batches; rmtrain groups batches by length and computes prompt + chosen + rejected as
one sequence (shared prefix) with sdpa; with `flash_attention_2`, which takes no custom masks, rmtrain runs
`padding_free` (every sequence of a pass in one row, varlen kernels) and TRL its padded batches.

Measured per run:
  pairs/s      training only: rmtrain run_info.json train.pairs_per_s (its loop clock); TRL trainer.train()'s
               train_samples_per_second. Neither includes loading, tokenization or saving.
  tokens/s     real tokens (every sequence in full, padding excluded: the same count for both tools) per second.
  peak mem     GPU: torch.cuda.max_memory_allocated() of the run's process (the peak is reset at its start);
               CPU: the process's peak RSS.
  TFLOP/s, MFU model FLOPs (rmtrain/flops.py: matmuls per token + attention per query-key pair, x3 for forward
               and backward; padding, masked blocks and checkpointing's recomputation not counted) of what the
               tool's layout needs, per second of training, over the device's dense bf16 peak
               (rmtrain.flops.PEAK_BF16_TFLOPS, or --peak-tflops). TRL: its batches' sequences, each causal over
               itself (counted from its collator); rmtrain: its layout (shared prefix: the prompt once, each
               answer against prompt and itself; padding-free/plain: each sequence on its own). What kernels do
               on top is not counted: a pair's shared-prefix row goes through SDPA with a 4D mask, which computes
               the whole (P + C1 + C2)^2 square, and TRL's padded rows compute their padding.
  2-seq MFU    the same pairs counted as two separate sequences each (TRL's work without padding) over the run's
               time: a common yardstick, proportional to pairs/s; for rmtrain it exceeds its MFU by what the
               shared prefix does not compute. On CPU, GFLOP/s in place of MFU.

--smoke: a tiny Qwen3 (scripts/configs/qwen3-tiny.json: 2 layers, hidden 64), 16 pairs that fit 128 tokens,
batch 4, fp32 weights, no autocast, sdpa, checkpointing on and off, one repeat, on the CPU (on the GPU if there
is one). Its timings are start-up noise (4 optimizer steps); it checks that every part runs.

Needs TRL (`pip install -e '.[bench]'`, as `make bench` does), ../shared/data, and for the GPU a CUDA build of torch
(and `flash_attn` for the flash_attention_2 rows).

Results: a markdown table per setting with rmtrain / TRL ratios, and `--out` JSON. Exit status 1 if a run failed
for another reason than running out of memory (a setting that does not fit is reported as OOM in the table).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "configs"
DATA_FILE = "ultrafeedback_binarized_sample.jsonl"
SEED = 42
LEARNING_RATE = 1e-4
GPU_MODELS = ["qwen3-0.6b", "qwen3-1.7b"]
SMOKE = {"models": ["qwen3-tiny"], "pairs": 16, "batch_size": 4, "max_length": 128, "dtype": "float32",
         "autocast": "off", "attn": ["sdpa"], "gc": ["on", "off"], "repeats": 1}
GIB = 2**30


# --------------------------------------------------------------------------------------------------
# Children: each runs in its own process (`--child KIND SPEC.json`) and writes its result to spec["result"].


def child_build(spec: dict) -> None:
    """Random-initialized model from a config file, saved with the Qwen tokenizer; and what the device is."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from bench import machine_info
    from tests.assets import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    values = json.loads(Path(spec["config"]).read_text())
    for key in ("architectures", "torch_dtype", "dtype", "transformers_version"):
        values.pop(key, None)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    config.num_labels = 1
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert len(tokenizer) <= config.vocab_size
    cuda = torch.cuda.is_available()
    torch.manual_seed(spec["seed"])
    with torch.device("cuda" if cuda else "cpu"):  # initializing 1.7B weights is minutes on a CPU, seconds on a GPU
        model = AutoModelForSequenceClassification.from_config(config)
    model.to(getattr(torch, spec["dtype"]))
    model.save_pretrained(spec["out"], safe_serialization=True)
    tokenizer.save_pretrained(spec["out"])
    device = {
        "type": "cuda" if cuda else "cpu",
        "name": torch.cuda.get_device_name() if cuda else machine_info()["cpu"],
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "total_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "cuda": torch.version.cuda,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None,
    }
    result = {"device": device, "parameters": sum(p.numel() for p in model.parameters())}
    if spec.get("select"):  # the pairs both tools train on, chosen with this tokenizer (every Qwen3 model's)
        select = spec["select"]
        rows, groups = select_rows(Path(select["data"]), tokenizer, select["max_length"], select["limit"])
        Path(select["out"]).write_text("".join(json.dumps(r) + "\n" for r in rows))
        result["groups"] = [[len(g.prefix), [len(c) for c in g.completions]] for g in groups]
    Path(spec["result"]).write_text(json.dumps(result))


def child_rmtrain(spec: dict) -> None:
    """`rmtrain fit RECIPE --overwrite` in this process, then its peak GPU memory."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    from rmtrain.cli import main

    sys.argv = ["rmtrain", "fit", spec["recipe"], "--overwrite"]
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    Path(spec["result"]).write_text(json.dumps({"max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None}))
    sys.exit(code)


def child_trl(spec: dict) -> None:
    """One TRL RewardTrainer run (scripts/bench_trl.py's, on the GPU, with dtype, attention and autocast)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from bench_trl import CountingCollator, read_rows

    class PairCountingCollator(CountingCollator):
        """Also counts the query-key pairs its sequences need (each causal over itself, padding excluded)."""

        def __call__(self, examples):
            batch = super().__call__(examples)
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            c = self.counts[self.mode]
            c["attention_pairs"] = c.get("attention_pairs", 0) + sum(n * (n + 1) // 2 for n in lengths)
            return batch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    train = Dataset.from_list(read_rows({"path": spec["data"]}, ["prompt", "chosen", "rejected"]))
    gc = spec["gradient_checkpointing"]
    args = RewardConfig(
        output_dir=spec["output_dir"],
        model_init_kwargs={"dtype": spec["dtype"], "attn_implementation": spec["attn"]},
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=spec["learning_rate"],
        num_train_epochs=1,
        max_length=spec["max_length"],
        activation_checkpointing=gc,  # transformers 5 name; `gradient_checkpointing` is its deprecated alias
        gradient_checkpointing=gc,
        bf16=spec["autocast"] == "bf16",
        fp16=False,
        seed=spec["seed"],
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_dropout=True,
        dataloader_drop_last=False,
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    collator = PairCountingCollator(DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id))
    trainer = RewardTrainer(model=spec["model"], args=args, data_collator=collator, train_dataset=train, processing_class=tokenizer)
    out = trainer.train()
    counts = collator.counts["train"]
    Path(spec["result"]).write_text(json.dumps({
        "train_pairs": len(trainer.train_dataset),
        "pairs": counts["pairs"],
        "seconds": out.metrics["train_runtime"],
        "pairs_per_s": out.metrics["train_samples_per_second"],
        "real_tokens": counts["real_tokens"],
        "computed_tokens": counts["computed_tokens"],
        "attention_pairs": counts.get("attention_pairs", 0),
        "steps": trainer.state.global_step,
        "train_loss": out.metrics.get("train_loss"),
        "model_dtype": str(next(trainer.model.parameters()).dtype),
        "attn_implementation": trainer.model.config._attn_implementation,
        "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
    }))


# --------------------------------------------------------------------------------------------------
# The pairs, and what they cost in FLOPs


def select_rows(data_file: Path, tokenizer, max_length: int, limit: int | None) -> tuple[list[dict], list]:
    """The first `limit` train_sample rows (all if None) whose both sides fit `max_length` tokens, and their
    tokenized groups (rmtrain.data's: prompt + answer + EOS, the common token prefix once), read in chunks so a
    small selection tokenizes little. Rows with an empty answer are left out (rmtrain refuses them)."""
    from rmtrain.groups import tokenize_rows
    from rmtrain.tokenizer import TokenFormat

    fmt = TokenFormat(append_eos=tokenizer.eos_token, pad_token_id=tokenizer.pad_token_id, is_encoder=False)
    rows = []
    with open(data_file, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row.get("split") == "train_sample" and row["chosen"].strip() and row["rejected"].strip():
                rows.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    kept_rows, groups, chunk = [], [], 256 if limit else len(rows)
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        got, _ = tokenize_rows(part, DATA_FILE, tokenizer, fmt, max_length, "filter")
        for g in got:
            kept_rows.append(part[g.row])
            groups.append(g)
        if limit and len(groups) >= limit:
            break
    if limit:
        kept_rows, groups = kept_rows[:limit], groups[:limit]
    return kept_rows, groups


def layout_costs(groups: list[tuple[int, list[int]]]) -> dict:
    """Tokens and attention query-key pairs of (prefix length, completion lengths) groups per layout: the shared
    prefix (rmtrain's default for decoders) and every sequence on its own (TRL, and rmtrain's padded or
    padding-free layouts), padding excluded."""
    from rmtrain.flops import attention_pairs

    shared = {"tokens": 0, "pairs": 0}
    separate = {"tokens": 0, "pairs": 0}
    for prefix, completions in groups:
        shared["tokens"] += prefix + sum(completions)
        shared["pairs"] += attention_pairs(prefix, completions)
        for c in completions:
            separate["tokens"] += prefix + c
            separate["pairs"] += attention_pairs(0, [prefix + c])
    return {"shared_prefix": shared, "separate": separate}


def model_config(path: Path) -> SimpleNamespace:
    """The sizes rmtrain.flops reads, straight from a config.json (the parent process imports no transformers)."""
    return SimpleNamespace(**json.loads(path.read_text()))


# --------------------------------------------------------------------------------------------------
# Runs


def rmtrain_recipe(setting: dict, data: Path, output_dir: Path) -> dict:
    init = {"dtype": setting["dtype"], "attn_implementation": setting["attn"]}
    train = {
        "output_dir": str(output_dir),
        "learning_rate": LEARNING_RATE,
        "per_device_batch_size": setting["batch_size"],
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "lr_scheduler": "linear",
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "seed": SEED,
        "bf16": setting["autocast"] == "bf16",
        "gradient_checkpointing": setting["gc"] == "on",
        "logging_steps": 10,
    }
    if setting["attn"] not in ("sdpa", "eager"):
        train["padding_free"] = True  # the shared prefix needs custom masks; flash attention takes varlen rows
    return {
        "model": {"name_or_path": setting["model_dir"], "init_kwargs": init, "disable_dropout": True},
        "data": {"train": {"path": str(data)}, "max_length": setting["max_length"], "truncation": "filter"},
        "train": train,
    }


def run_rmtrain(setting: dict, data: Path, run_dir: Path, verbose: bool) -> dict:
    import yaml

    from bench import run_child

    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "run"
    recipe = run_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(rmtrain_recipe(setting, data, out), sort_keys=False))
    spec = run_dir / "spec.json"
    spec.write_text(json.dumps({"recipe": str(recipe), "result": str(run_dir / "result.json")}))
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--child", "rmtrain", str(spec)], run_dir / "log.txt", verbose)
    log = (run_dir / "log.txt").read_text(errors="replace")
    layout = re.search(r"batches: (\w+) layout", log)
    info = json.loads((out / "run_info.json").read_text())
    memory = json.loads((run_dir / "result.json").read_text())["max_memory_allocated"]
    t = info["train"]
    return {
        "tool": "rmtrain",
        "train_pairs": info["train_pairs"],
        "pairs": t["pairs"],
        "seconds": t["seconds"],
        "pairs_per_s": t["pairs_per_s"],
        "real_tokens": t["real_tokens"],
        "computed_tokens": t["computed_tokens"],
        "steps": info["steps"],
        # The pre-flight line names the layout; without it, rmtrain's choice for this attention (README: share_prefix).
        "layout": layout.group(1) if layout else ("shared_prefix" if setting["attn"] in ("sdpa", "eager") else "packed"),
        "layout_from_log": layout is not None,
        "max_tokens_per_forward": info.get("max_tokens_per_forward"),
        "max_memory_allocated": memory,
        **child,
    }


def run_trl(setting: dict, data: Path, run_dir: Path, verbose: bool) -> dict:
    from bench import run_child

    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {k: setting[k] for k in ("dtype", "attn", "autocast", "batch_size", "max_length")} | {
        "model": setting["model_dir"], "data": str(data), "output_dir": str(run_dir / "run"), "seed": SEED,
        "learning_rate": LEARNING_RATE, "gradient_checkpointing": setting["gc"] == "on", "result": str(run_dir / "result.json"),
    }
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2))
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--child", "trl", str(run_dir / "spec.json")],
                      run_dir / "log.txt", verbose)
    return {"tool": "trl", "layout": "plain", **json.loads((run_dir / "result.json").read_text()), **child}


def add_rates(run: dict, costs: dict, config, peak: float | None, on_gpu: bool) -> None:
    """tokens/s, peak memory, model FLOPs of the run's layout and of two separate sequences per pair, and MFU."""
    from rmtrain.flops import mfu, training_flops

    seconds = run["seconds"]
    run["tokens_per_s"] = run["real_tokens"] / seconds
    run["peak_memory_bytes"] = run["max_memory_allocated"] if on_gpu else run["peak_rss_kib"] * 1024
    if run["tool"] == "trl":  # its own batches' sequences, counted by its collator
        own = training_flops(run["real_tokens"], run["attention_pairs"], config)
    else:
        layout = costs["shared_prefix" if run["layout"] == "shared_prefix" else "separate"]
        own = training_flops(layout["tokens"], layout["pairs"], config)
    separate = training_flops(costs["separate"]["tokens"], costs["separate"]["pairs"], config)
    run["model_flops"], run["two_sequence_flops"] = own, separate
    run["flops_per_s"], run["two_sequence_flops_per_s"] = own / seconds, separate / seconds
    run["mfu"], run["two_sequence_mfu"] = mfu(own, seconds, peak), mfu(separate, seconds, peak)
    run["tokens_match"] = run["real_tokens"] == costs["separate"]["tokens"]


# --------------------------------------------------------------------------------------------------
# Reporting


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rate(value: float) -> str:
    return f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def failure_reason(error: str, width: int = 100) -> str:
    """The last line of a failed run's log that names an error (rich draws boxes around tracebacks)."""
    lines = [line.strip(" │╰╯─|") for line in error.splitlines()]
    lines = [line for line in lines if line and not line.startswith(("work folder", "[")) and "exited with" not in line]
    said = [line for line in lines if re.search(r"Error\b|error:|out of memory", line)]
    reason = (said or lines or ["see its log"])[-1]
    return reason if len(reason) <= width else reason[: width - 3] + "..."


def setting_title(s: dict) -> str:
    return (f"{s['model']}, {s['attn']}, gradient checkpointing {s['gc']}: {s['n_pairs']} pairs, batch {s['batch_size']}, "
            f"max_length {s['max_length']}, {s['dtype']} weights, autocast {s['autocast']}")


def setting_table(s: dict, runs: list[dict], device: dict, peak: float | None) -> str:
    on_gpu = device["type"] == "cuda"
    unit, scale = ("TFLOP/s", 1e12) if on_gpu else ("GFLOP/s", 1e9)
    memory = "peak GPU mem GiB" if on_gpu else "peak RSS GiB"
    header = ["run", "pairs", "pairs/s", "tokens/s", memory, unit] + (["MFU"] if peak else []) + [f"2-seq {unit}"] + (["2-seq MFU"] if peak else [])
    lines = [f"**{setting_title(s)}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    count = {"rmtrain": 0, "trl": 0}
    for r in runs:
        count[r["tool"]] += 1
        label = ("rmtrain" if r["tool"] == "rmtrain" else "TRL") + (f" #{count[r['tool']]}" if len(runs) > 2 else "")
        if r.get("failed"):
            lines.append(f"| {label} | {'OOM' if r.get('oom') else 'failed'}: {failure_reason(r['error'])} |" + " |" * (len(header) - 2))
            continue
        pct = lambda v: f"{100 * v:.1f}%" if v is not None else "-"  # noqa: E731
        cells = [label, str(r["pairs"]), rate(r["pairs_per_s"]), f"{r['tokens_per_s']:,.0f}",
                 f"{r['peak_memory_bytes'] / GIB:.2f}", f"{r['flops_per_s'] / scale:.2f}"] + ([pct(r["mfu"])] if peak else []) + \
                [f"{r['two_sequence_flops_per_s'] / scale:.2f}"] + ([pct(r["two_sequence_mfu"])] if peak else [])
        lines.append("| " + " | ".join(cells) + " |")
    ok = {tool: [r for r in runs if r["tool"] == tool and not r.get("failed")] for tool in ("rmtrain", "trl")}
    if ok["rmtrain"]:
        lines += ["", f"Batches: rmtrain {ok['rmtrain'][0]['layout']} layout, length-grouped; TRL plain layout (chosen and rejected as "
                      "padded rows), random order."]
    if any(not r["tokens_match"] for rs in ok.values() for r in rs):
        lines.append("NOTE: a tool's real tokens differ from the selected pairs' tokens: its FLOPs are counted on other sequences.")
    busy = [r for rs in ok.values() for r in rs if r.get("other_cpu_cores") and r["other_cpu_cores"] > 0.25]
    if busy:
        lines.append(f"WARNING: other processes used up to {max(r['other_cpu_cores'] for r in busy):.1f} cores during {len(busy)} of these runs.")
    if ok["rmtrain"] and ok["trl"]:
        a = {k: _median(r[k] for r in ok["rmtrain"]) for k in ("pairs_per_s", "peak_memory_bytes", "flops_per_s", "mfu")}
        b = {k: _median(r[k] for r in ok["trl"]) for k in ("pairs_per_s", "peak_memory_bytes", "flops_per_s", "mfu")}
        line = f"rmtrain / TRL (medians): pairs/s x{a['pairs_per_s'] / b['pairs_per_s']:.2f}, peak memory x{a['peak_memory_bytes'] / b['peak_memory_bytes']:.2f}"
        line += f", MFU {100 * a['mfu']:.1f}% vs {100 * b['mfu']:.1f}%" if a["mfu"] is not None and b["mfu"] is not None else \
            f", {unit} {a['flops_per_s'] / scale:.2f} vs {b['flops_per_s'] / scale:.2f}"
        lines += ["", line]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny Qwen3 on the CPU, a handful of pairs: the same code path in under 2 minutes")
    parser.add_argument("--models", default=None, help=f"comma-separated names in scripts/configs or .json config files (default: {','.join(GPU_MODELS)})")
    parser.add_argument("--attn", default=None, help="comma-separated attention implementations (default: sdpa, and flash_attention_2 if flash_attn imports)")
    parser.add_argument("--gc", default=None, help="gradient checkpointing settings to run: on,off (default both)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per tool and setting, alternating (default 1)")
    parser.add_argument("--pairs", type=int, default=None, help="train on the first N pairs that fit max_length (default: all of them)")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per batch, both tools (default 8)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence at most (default 1024)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="weights dtype both tools load (default bfloat16)")
    parser.add_argument("--autocast", default=None, choices=["auto", "bf16", "off"], help="bf16 autocast (default auto: where CUDA supports bf16)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for MFU (default: from rmtrain.flops' table)")
    parser.add_argument("--out", default="bench-gpu-results.json", help="results JSON (default bench-gpu-results.json)")
    parser.add_argument("--work-dir", default=None, help="folder for models, data, recipes, logs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and the runs' saved models (always kept on failure)")
    parser.add_argument("--verbose", action="store_true", help="stream the children's output")
    args = parser.parse_args()
    defaults = SMOKE if args.smoke else {"models": GPU_MODELS, "pairs": None, "batch_size": 8, "max_length": 1024,
                                         "dtype": "bfloat16", "autocast": "auto", "attn": None, "gc": ["on", "off"], "repeats": 1}
    for key in ("models", "attn", "gc"):
        value = getattr(args, key)
        setattr(args, key, [v.strip() for v in value.split(",") if v.strip()] if value else defaults[key])
    for key in ("pairs", "batch_size", "max_length", "dtype", "autocast", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if set(args.gc) - {"on", "off"}:
        parser.error("--gc takes on, off or on,off")
    return args


def config_file(name: str) -> Path:
    path = Path(name) if name.endswith(".json") else CONFIGS / f"{name}.json"
    if not path.is_file():
        names = ", ".join(p.name[: -len(".json")] for p in sorted(CONFIGS.glob("*.json")))
        raise SystemExit(f"error: no config {path} (names: {names})")
    return path


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":  # a run's own process
        kind, spec = sys.argv[2], json.loads(Path(sys.argv[3]).read_text())
        {"build": child_build, "rmtrain": child_rmtrain, "trl": child_trl}[kind](spec)
        return 0

    args = parse_args()
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT))
    from bench import RunFailed, check_prerequisites, machine_info, machine_line, run_child

    from rmtrain.flops import attention_flops_per_pair, matmul_flops_per_token, peak_flops

    data_dir = check_prerequisites()  # TRL installed, ../shared/data present
    if data_dir is None:
        return 2
    machine = machine_info()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rmtrain-bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.keep or args.work_dir is not None
    results: dict = {"machine": machine, "smoke": args.smoke, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir")},
                     "models": {}, "cases": []}
    tables, other_failure = [], False
    started = time.perf_counter()
    clock = lambda: f"[{time.perf_counter() - started:6.0f}s]"  # noqa: E731
    try:
        models, device, groups, data = {}, None, None, work / "pairs.jsonl"
        for name in args.models:
            path = config_file(name)
            out = work / "models" / (path.name[: -len(".json")])  # not .stem: "qwen3-0.6b" has a dot
            print(f"{clock()} building {out.name}: random weights ({args.dtype}), the Qwen tokenizer"
                  + (", the pairs ..." if not models else " ..."), flush=True)
            spec = {"config": str(path), "out": str(out), "dtype": args.dtype, "seed": SEED, "result": str(work / f"build-{out.name}.json")}
            if not models:
                spec["select"] = {"data": str(data_dir / DATA_FILE), "max_length": args.max_length, "limit": args.pairs, "out": str(data)}
            (work / f"build-{out.name}.spec.json").write_text(json.dumps(spec))
            run_child([sys.executable, str(Path(__file__).resolve()), "--child", "build", str(work / f"build-{out.name}.spec.json")],
                      work / f"build-{out.name}.log", args.verbose)
            built = json.loads(Path(spec["result"]).read_text())
            device = built["device"]
            models[out.name] = {"dir": str(out), "config": model_config(path), "parameters": built["parameters"]}
            groups = built.get("groups", groups)
        on_gpu = device["type"] == "cuda"
        autocast = ("bf16" if on_gpu and device["bf16"] else "off") if args.autocast == "auto" else args.autocast
        attns = args.attn or (["sdpa"] + (["flash_attention_2"] if on_gpu and device["flash_attn"] else []))
        peak = peak_flops(device["name"], args.peak_tflops) if on_gpu or args.peak_tflops else None
        results["device"] = device | {"peak_flops": peak, "autocast": autocast}
        print(f"Machine: {machine_line(machine)}")
        print(f"Device: {device['name']}" + (f", peak {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else
              (", no peak in rmtrain.flops' table: pass --peak-tflops for MFU" if on_gpu else " (CPU: GFLOP/s, no MFU)")), flush=True)

        costs = layout_costs(groups)
        print(f"{clock()} {len(groups)} pairs of {DATA_FILE} (train_sample) within {args.max_length} tokens; tokens: "
              f"{costs['separate']['tokens']:,} as two sequences per pair, {costs['shared_prefix']['tokens']:,} with the prompt shared", flush=True)
        results["pairs"] = {"count": len(groups), "layouts": costs}
        for name, m in models.items():
            results["models"][name] = {"parameters": m["parameters"], "matmul_flops_per_token": matmul_flops_per_token(m["config"]),
                                       "attention_flops_per_pair": attention_flops_per_pair(m["config"])}

        for name, m in models.items():
            for attn in attns:
                for gc in args.gc:
                    setting = {"model": name, "model_dir": m["dir"], "attn": attn, "gc": gc, "dtype": args.dtype, "autocast": autocast,
                               "batch_size": args.batch_size, "max_length": args.max_length, "n_pairs": len(groups)}
                    runs = []
                    for rep in range(args.repeats):
                        for tool, runner in (("rmtrain", run_rmtrain), ("trl", run_trl)):
                            run_dir = work / "runs" / f"{name}-{attn}-gc{gc}" / f"{tool}-{rep + 1}"
                            print(f"{clock()} {name}, {attn}, checkpointing {gc}: {tool} run {rep + 1}/{args.repeats} ...", end=" ", flush=True)
                            try:
                                r = runner(setting, data, run_dir, args.verbose)
                            except (RunFailed, OSError, KeyError, ValueError) as error:
                                oom = "out of memory" in str(error).lower()
                                other_failure = other_failure or not oom
                                r = {"tool": tool, "failed": True, "oom": oom, "error": str(error)[-4000:]}
                                print("OOM" if oom else f"FAILED (log: {run_dir / 'log.txt'})", flush=True)
                            else:
                                add_rates(r, costs, m["config"], peak, on_gpu)
                                if not keep:
                                    shutil.rmtree(run_dir / "run", ignore_errors=True)  # the saved model
                                flops = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else f"{r['flops_per_s'] / 1e9:.2f} GFLOP/s"
                                print(f"{rate(r['pairs_per_s'])} pairs/s, {r['tokens_per_s']:,.0f} tokens/s, peak "
                                      f"{r['peak_memory_bytes'] / GIB:.2f} GiB, {flops}, {r['wall_seconds']:.0f}s wall", flush=True)
                            runs.append(r)
                    results["cases"].append({"setting": setting, "runs": runs})
                    tables.append(setting_table(setting, runs, device, peak))
                    print("\n" + tables[-1] + "\n", flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")  # partial results survive
    except KeyboardInterrupt:
        other_failure = True
        print("\ninterrupted", file=sys.stderr)
    except RunFailed as error:  # building a model or the data failed: nothing to compare
        other_failure = True
        print(f"\nerror: {error}", file=sys.stderr)
    finally:
        results["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
        if keep or other_failure:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    if tables:
        print(f"## rmtrain vs TRL {machine['versions']['trl']} RewardTrainer{' (smoke, CPU)' if args.smoke else ''}\n")
        print(f"Machine: {machine_line(machine)}; device: {results['device']['name']}\n")
        print("\n\n".join(tables))
        print(f"\nTotal {results['seconds'] / 60:.1f} min; results in {args.out}")
    return 1 if other_failure else 0


if __name__ == "__main__":
    sys.exit(main())
