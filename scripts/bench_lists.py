"""`make bench`, ranked lists: rmtrain training on lists against TRL 1.16 on their binarized pairs, and list
training against one best-versus-worst pair per prompt on held-out lists.

    python scripts/bench_lists.py [--cases speed,quality] [--quick] [--repeats N] [--objectives bradley_terry,per_list,plackett_luce]
                                  [--hold-out last|first]
                                  [--out FILE] [--work-dir DIR] [--keep]

Data: `../shared/data/arena_bench_v1_lists.jsonl` (293 prompts, 12-15 completions each, GPT-4 grades 1-10).

speed    tiny random Qwen3 (real Qwen tokenizer) on the first 12 lists (--quick: 3), max_length 1024, lr 1e-4,
         fp32, gradient checkpointing on (both tools' default), seed 42, 1 epoch. rmtrain trains on the lists
         (one list per batch: prompt + completions as one row, each completion computed once); TRL's
         RewardTrainer on every pair of them with different scores (`rmtrain binarize --pairs all`), batch 8 --
         what a TRL user builds from lists. Both drop what does not fit max_length alike (a completion, or a
         pair with a side, longer than 1024 tokens), so both train the same pairs. Tools alternate (--repeats).
         Measured per run: pairs/s (training only, as scripts/bench.py), tokens computed, peak RSS.
quality  MiniLM-L6 (pretrained encoder) on the same prompts, split by prompt: the first 233 lists train, the last
         60 are held out (--quick: 40 / 12; `--hold-out first`: the last 233 train, the first 60 are held out).
         max_length 256, truncation truncate (a text keeps its last 256 tokens: the end of the answer), passes of
         4096 tokens, lr 5e-5, batch 8 rows, 2 epochs, seed 42, fp32. Trained on the lists (each of `--objectives`:
         Bradley-Terry over every pair weighted per pair, or per list, or Plackett-Luce) and on one
         best-versus-worst pair per list (`--pairs best-worst`, the binarized datasets people ship), the same
         number of optimizer steps; then `rmtrain eval` of each on the held-out lists: pairwise accuracy over
         every pair with different scores, top-1 accuracy (best-of-n: the highest reward is a best-graded
         completion) and mean Kendall tau per list.

Results: markdown tables (docs/benchmarks.md) and `--out` JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, build_models, check_prerequisites, machine_info, machine_line, run_child, run_trl  # noqa: E402

from tests.assets import minilm_dir  # noqa: E402

LISTS = "arena_bench_v1_lists.jsonl"
SIZES = {"speed": {"default": 12, "quick": 3}, "quality": {"default": (233, 60), "quick": (40, 12)}}
SEED = 42


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def binarize(lists: Path, out: Path, pairs: str) -> Path:
    run_child([sys.executable, "-m", "rmtrain", "binarize", str(lists), str(out), "--pairs", pairs, "--overwrite"],
              out.with_suffix(".log"), False)
    return out


def fit(recipe: dict, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = run_dir / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    child = run_child([sys.executable, "-m", "rmtrain", "fit", str(recipe_file), "--overwrite"], run_dir / "log.txt", False)
    info = json.loads((Path(recipe["train"]["output_dir"]) / "run_info.json").read_text())
    return child | {"info": info}


def recipe(model: str, train: Path, eval_: Path | None, out: Path, **train_keys) -> dict:
    data = {"train": {"path": str(train)}, "max_length": train_keys.pop("max_length"), "truncation": train_keys.pop("truncation", "filter")}
    if eval_ is not None:
        data["eval"] = {"path": str(eval_)}
    return {
        "model": {"name_or_path": model, "disable_dropout": True},
        "data": data,
        "train": {"output_dir": str(out), "seed": SEED, "bf16": False, "lr_scheduler": "linear", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "logging_steps": 10, **train_keys},
    }


# --------------------------------------------------------------------------------------------------


def speed_case(work: Path, data_dir: Path, models: Path, quick: bool, repeats: int, ablation: bool = False) -> dict:
    rows = [json.loads(line) for line in (data_dir / LISTS).read_text(encoding="utf-8").splitlines()]
    n = SIZES["speed"]["quick" if quick else "default"]
    keep = ("prompt", "completions", "scores")
    train_lists = write_jsonl(work / "speed-lists.jsonl", [{k: r[k] for k in keep} for r in rows[:n]])
    eval_lists = write_jsonl(work / "speed-eval-lists.jsonl", [{k: r[k] for k in keep} for r in rows[n : n + 1]])
    train_pairs = binarize(train_lists, work / "speed-pairs.jsonl", "all")
    eval_pairs = binarize(eval_lists, work / "speed-eval-pairs.jsonl", "all")
    model = str(models / "tiny-qwen3")
    trl_case = {
        "model": model, "gguf_file": None, "pad_token": None, "pretokenize": False,
        "train": {"path": str(train_pairs)}, "eval": {"path": str(eval_pairs)},
        "columns": ["prompt", "chosen", "rejected"], "max_length": 1024, "batch_size": 8, "learning_rate": 1e-4,
        "gradient_checkpointing": True, "seed": SEED, "lora": None,
    }
    runs = []
    for rep in range(repeats):
        for tool in ("rmtrain", "trl"):
            print(f"speed: {tool} run {rep + 1}/{repeats} ...", end=" ", flush=True)
            run_dir = work / f"speed-{tool}-{rep}"
            if tool == "rmtrain":
                child = fit(recipe(model, train_lists, eval_lists, run_dir / "run", max_length=1024, learning_rate=1e-4,
                                   per_device_batch_size=1, num_epochs=1, gradient_checkpointing=True), run_dir)
                t = child["info"]["train"]
                run = {"tool": "rmtrain", "pairs_per_s": t["pairs_per_s"], "pairs": t["pairs"], "seconds": t["seconds"],
                       "computed_tokens": t["computed_tokens"], "lists_per_s": t.get("lists_per_s"), **child}
            else:
                result = run_trl(trl_case, run_dir, False)
                run = {"tool": "trl", "pairs_per_s": result["pairs_per_s"], "pairs": result["pairs_trained"],
                       "seconds": result["train_seconds"], "computed_tokens": result["computed_tokens"],
                       "peak_rss_kib": result["peak_rss_kib"], "other_cpu_cores": result["other_cpu_cores"]}
            runs.append(run)
            print(f"{run['pairs_per_s']:.2f} pairs/s, {run['pairs']} pairs, peak RSS {run['peak_rss_kib'] / 2**20:.2f} GiB", flush=True)
    if ablation:  # the same lists with the shared prefix's attention as one 4D mask over the row, and without sharing
        for label, keys in (("rmtrain on lists, 4D mask", {"prefix_attention": "mask"}),
                            ("rmtrain on lists, no shared prefix", {"share_prefix": False})):
            print(f"speed: {label} ...", end=" ", flush=True)
            run_dir = work / ("speed-ablation-" + str(len(runs)))
            child = fit(recipe(model, train_lists, eval_lists, run_dir / "run", max_length=1024, learning_rate=1e-4,
                               per_device_batch_size=1, num_epochs=1, gradient_checkpointing=True, **keys), run_dir)
            t = child["info"]["train"]
            runs.append({"tool": label, "pairs_per_s": t["pairs_per_s"], "pairs": t["pairs"], "seconds": t["seconds"],
                         "computed_tokens": t["computed_tokens"], **child})
            print(f"{t['pairs_per_s']:.2f} pairs/s", flush=True)
    median = {tool: {k: statistics.median(r[k] for r in runs if r["tool"] == tool) for k in ("pairs_per_s", "computed_tokens")}
              for tool in ("rmtrain", "trl")}
    peak = {tool: max(r["peak_rss_kib"] for r in runs if r["tool"] == tool) for tool in ("rmtrain", "trl")}
    lines = [
        f"**speed: tiny Qwen3, the first {n} lists of {LISTS}, max_length 1024, lr 1e-4, fp32, gradient checkpointing, 1 epoch**",
        "", "| run | pairs trained | pairs/s | train s | tokens computed | peak RSS GiB |", "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs):
        label = {"rmtrain": "rmtrain on lists", "trl": "TRL on all pairs"}.get(r["tool"], r["tool"])
        label += f" #{i // 2 + 1}" if r["tool"] in ("rmtrain", "trl") else ""
        lines.append(f"| {label} | {r['pairs']:,} | {r['pairs_per_s']:.2f} | {r['seconds']:.1f} | {r['computed_tokens']:,} | {r['peak_rss_kib'] / 2**20:.2f} |")
    ratio = median["rmtrain"]["pairs_per_s"] / median["trl"]["pairs_per_s"]
    tokens = median["rmtrain"]["computed_tokens"] / median["trl"]["computed_tokens"]
    lines += ["", f"rmtrain / TRL (medians): pairs/s x{ratio:.2f}, tokens computed x{tokens:.3f} (1/{1 / tokens:.1f}), "
                  f"peak RSS x{peak['rmtrain'] / peak['trl']:.2f}"]
    busy = [r for r in runs if r.get("other_cpu_cores") and r["other_cpu_cores"] > 0.25]
    if busy:
        lines.append(f"WARNING: other processes used up to {max(r['other_cpu_cores'] for r in busy):.1f} cores during {len(busy)} runs.")
    return {"runs": [{k: v for k, v in r.items() if k != "info"} for r in runs], "pairs_per_s_ratio": ratio,
            "tokens_ratio": tokens, "peak_rss_ratio": peak["rmtrain"] / peak["trl"], "table": "\n".join(lines)}


LIST_OBJECTIVES = {
    "bradley_terry": ("lists, Bradley-Terry, every pair weighs the same (default)", {}),
    "per_list": ("lists, Bradley-Terry, every list weighs the same", {"list_weighting": "list"}),
    "plackett_luce": ("lists, Plackett-Luce", {"list_loss": "plackett_luce"}),
}


def quality_case(work: Path, data_dir: Path, quick: bool, objectives: list[str] | None = None, hold_out: str = "last") -> dict:
    rows = [json.loads(line) for line in (data_dir / LISTS).read_text(encoding="utf-8").splitlines()]
    n_train, n_eval = SIZES["quality"]["quick" if quick else "default"]
    keep = ("prompt", "completions", "scores")
    train_rows, eval_rows = (rows[:n_train], rows[-n_eval:]) if hold_out == "last" else (rows[-n_train:], rows[:n_eval])
    train_lists = write_jsonl(work / "quality-train-lists.jsonl", [{k: r[k] for k in keep} for r in train_rows])
    held_out = write_jsonl(work / "quality-held-out-lists.jsonl", [{k: r[k] for k in keep} for r in eval_rows])
    best_worst = binarize(train_lists, work / "quality-best-worst.jsonl", "best-worst")
    results = {}
    runs = [(LIST_OBJECTIVES[o][0], train_lists, LIST_OBJECTIVES[o][1], o) for o in objectives or ["bradley_terry"]]
    for name, train, keys, tag in runs + [("best-worst pairs", best_worst, {}, "best-worst")]:
        run_dir = work / ("quality-" + tag)
        print(f"quality: training on {name} ...", end=" ", flush=True)
        start = time.perf_counter()
        child = fit(recipe(minilm_dir(), train, None, run_dir / "run", max_length=256, truncation="truncate", learning_rate=5e-5,
                           per_device_batch_size=8, num_epochs=2, gradient_checkpointing=False, max_tokens_per_forward=4096, **keys), run_dir)
        report = run_dir / "eval"
        run_child([sys.executable, "-m", "rmtrain", "eval", str(run_dir / "run"), "--data", str(held_out), "--truncation", "truncate",
                   "--max-length", "256", "--report", str(report)], run_dir / "eval.log", False)
        metrics = json.loads((report / "metrics.json").read_text())
        results[name] = {"pairs_trained": child["info"]["train"]["pairs"], "steps": child["info"]["steps"],
                         "accuracy": metrics["accuracy"], "top1_accuracy": metrics["top1_accuracy"],
                         "mean_kendall_tau": metrics["mean_kendall_tau"], "eval_pairs": metrics["num_pairs"], "eval_lists": metrics["num_lists"],
                         "seconds": time.perf_counter() - start}
        print(f"pairwise {metrics['accuracy']:.3f}, top-1 {metrics['top1_accuracy']:.3f}", flush=True)
    lines = [
        f"**quality: MiniLM-L6, {n_train} lists train, the {hold_out} {n_eval} held out (split by prompt), max_length 256 (truncate), "
        "lr 5e-5, batch 8 rows, 2 epochs, fp32**", "",
        "| trained on | pairs trained | steps | held-out pairwise accuracy | top-1 accuracy | mean Kendall tau |", "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['pairs_trained']:,} | {r['steps']} | {r['accuracy']:.3f} ({r['eval_pairs']:,} pairs) | "
                     f"{r['top1_accuracy']:.3f} ({r['eval_lists']} lists) | {r['mean_kendall_tau']:.3f} |")
    return {"runs": results, "table": "\n".join(lines)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="speed,quality")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="bench-lists-results.json")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="speed: also the 4D mask and no shared prefix")
    parser.add_argument("--hold-out", choices=("last", "first"), default="last",
                        help="quality: hold out the file's last lists (train on the first) or its first (train on the last)")
    parser.add_argument("--objectives", default="bradley_terry",
                        help=f"quality: list objectives to train, from {', '.join(LIST_OBJECTIVES)} (default: bradley_terry)")
    args = parser.parse_args()
    data_dir = check_prerequisites()
    if data_dir is None:
        return 2
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rmtrain-bench-lists-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(machine_line(machine), flush=True)
    results: dict = {"machine": machine, "quick": args.quick}
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if "speed" in cases:
        results["speed"] = speed_case(work, data_dir, build_models(work, ["qwen3-hh"], False), args.quick, args.repeats, args.ablation)
        print("\n" + results["speed"]["table"] + "\n", flush=True)
    if "quality" in cases:
        results["quality"] = quality_case(work, data_dir, args.quick, [o.strip() for o in args.objectives.split(",") if o.strip()], args.hold_out)
        print("\n" + results["quality"]["table"] + "\n", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not args.keep and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"results in {args.out}; run from {ROOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
