"""`make bench` (after bench.py): `rmtrain eval` vs TRL 1.16 `RewardTrainer.evaluate()`, same model and data.

    python scripts/bench_eval.py [--cases qwen3-hh,minilm-helpful] [--quick] [--repeats N] [--batch-size B]
                                 [--threads N] [--out bench-eval-results.json] [--work-dir DIR] [--keep] [--verbose]

Each run is its own subprocess, tools alternating: rmtrain `python -m rmtrain eval MODEL --data ROWS.jsonl
--max-length 512 --batch-size B --json OUT`, TRL `python scripts/bench_eval.py --trl-child SPEC.json` (a
RewardTrainer with the same model, rows, max_length and per-device eval batch size, then `evaluate()`).
Both score the same rows (written once to a .jsonl file), drop the pairs longer than max_length, and run
fp32 on the CPU.

Measured per run:
  pairs/s   pairs scored / seconds of scoring: rmtrain's `pairs_per_s` (its scoring loop, from the first
            batch to the gathered results); TRL's `eval_samples_per_second` (Trainer's clock around its
            evaluation loop). Neither includes model load or tokenization.
  accuracy  per pair, strict > (rmtrain `accuracy`; for TRL counted from its evaluation's own rewards, since
            its `eval_accuracy` is a mean of per-batch accuracies). Equal accuracies show both scored alike.
  pairs     pairs scored (after the max_length filter).
  peak RSS  ru_maxrss of the child process.

Each tool runs with its own defaults otherwise: TRL pads chosen and rejected as separate rows in file order
under torch.no_grad; rmtrain sorts pairs by length, runs under torch.inference_mode and, for decoders,
scores prompt + chosen + rejected as one sequence (shared prefix).

Cases (eval rows, default / --quick):
  qwen3-hh        tiny random Qwen3 (real Qwen tokenizer, built as in bench.py) on the last 512 / 128 rows
                  of hh_harmless_test.jsonl.
  minilm-helpful  MiniLM-L6 (BERT encoder) with a seeded random reward head saved once for both tools, on the
                  last 512 / 64 rows of hh_helpful_base_test.jsonl. TRL gets pre-tokenized ids (it crashes on
                  tokenizers without EOS), as in bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench import (  # noqa: E402
    BUSY_CORES,
    HH_ROWS,
    MAX_LENGTH,
    RunFailed,
    build_models,
    check_prerequisites,
    machine_info,
    machine_line,
    minilm_dir,
    run_child,
)

SIZES = {"qwen3-hh": {"default": 512, "quick": 128}, "minilm-helpful": {"default": 512, "quick": 64}}
CASES = list(SIZES)
BATCH_SIZE = 16


def save_minilm_with_head(models: Path) -> str:
    """MiniLM with a seeded random reward head saved next to it, so both tools score with the same head."""
    folder = models / "minilm-rm"
    if not (folder / "config.json").is_file():
        code = (
            "import sys, torch; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; "
            "torch.manual_seed(42); M.from_pretrained(sys.argv[1], num_labels=1).save_pretrained(sys.argv[2]); "
            "T.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"
        )
        run_child([sys.executable, "-c", code, minilm_dir(), str(folder)], models / "minilm-rm.log", False)
    return str(folder)


def case_setup(name: str, quick: bool, data_dir: Path, models: Path, work: Path, batch_size: int) -> dict:
    n_rows = SIZES[name]["quick" if quick else "default"]
    file = {"qwen3-hh": "hh_harmless_test.jsonl", "minilm-helpful": "hh_helpful_base_test.jsonl"}[name]
    with open(data_dir / file, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    assert len(lines) == HH_ROWS[file], (file, len(lines))
    rows_file = work / f"{name}-rows.jsonl"
    rows_file.write_text("".join(lines[-n_rows:]), encoding="utf-8")
    return {
        "model": str(models / "tiny-qwen3") if name == "qwen3-hh" else save_minilm_with_head(models),
        "rows_file": str(rows_file),
        "n_rows": n_rows,
        "source": f"last {n_rows} rows of {file}",
        "pretokenize": name == "minilm-helpful",
        "max_length": MAX_LENGTH,
        "batch_size": batch_size,
    }


def run_rmtrain(case: dict, run_dir: Path, verbose: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "metrics.json"
    cmd = [sys.executable, "-m", "rmtrain", "eval", case["model"], "--data", case["rows_file"],
           "--max-length", str(case["max_length"]), "--batch-size", str(case["batch_size"]), "--json", str(out)]
    child = run_child(cmd, run_dir / "log.txt", verbose)
    metrics = json.loads(out.read_text())
    return {"tool": "rmtrain", "pairs_per_s": metrics["pairs_per_s"], "seconds": metrics["seconds"],
            "pairs": metrics["num_pairs"], "accuracy": metrics["accuracy"], **child}


def run_trl(case: dict, run_dir: Path, verbose: bool) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = run_dir / "spec.json"
    spec.write_text(json.dumps(case | {"output_dir": str(run_dir / "out")}, indent=2))
    result_file = run_dir / "result.jsonl"
    child = run_child([sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec)], run_dir / "log.txt",
                      verbose, result_file)
    lines = [line for line in result_file.read_text().splitlines() if line.strip()]
    if len(lines) != 1:
        raise RunFailed(f"the TRL child printed {len(lines)} lines on stdout, expected one JSON line: {result_file}")
    res = json.loads(lines[0])
    return {"tool": "trl", **res, **child}


def trl_child(spec_file: str) -> None:
    """One TRL evaluation; prints one JSON line on stdout (everything else goes to stderr)."""
    spec = json.loads(Path(spec_file).read_text())
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    rows = [json.loads(line) for line in Path(spec["rows_file"]).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
    if spec["pretokenize"]:
        rows = [{"chosen_ids": tokenizer(r["chosen"])["input_ids"], "rejected_ids": tokenizer(r["rejected"])["input_ids"]} for r in rows]
    eval_dataset = Dataset.from_list(rows)
    args = RewardConfig(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch_size"],
        per_device_eval_batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        bf16=False,
        fp16=False,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_dropout=True,
        use_cpu=True,
        disable_tqdm=True,
        seed=42,
    )
    import torch

    class OutcomeRewardTrainer(RewardTrainer):
        """RewardTrainer unchanged, except that evaluation also keeps each pair's outcome (as bench_trl.py)."""

        outcomes: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).detach().float(), 2)
            self.outcomes.extend((chosen > rejected).tolist())
            return (loss, outputs) if return_outputs else loss

    # RewardTrainer requires a training set; one row keeps its preparation short (it is never trained on).
    trainer = OutcomeRewardTrainer(model=spec["model"], args=args, train_dataset=Dataset.from_list(rows[:1]),
                                   eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.outcomes = []
    metrics = trainer.evaluate()
    outcomes = trainer.outcomes
    result = {
        "pairs_per_s": metrics["eval_samples_per_second"],
        "seconds": metrics["eval_runtime"],
        "pairs": len(trainer.eval_dataset),
        "accuracy": sum(outcomes) / len(outcomes),
        "accuracy_trl": metrics.get("eval_accuracy"),
    }
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


def case_table(name: str, case: dict, runs: list[dict]) -> tuple[str, float]:
    header = ("run", "pairs", "pairs/s", "scoring s", "peak RSS GiB", "accuracy")
    lines = [f"**{name}: {case['source']}, batch {case['batch_size']} pairs, max_length {case['max_length']}, fp32**", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = ("rmtrain eval" if r["tool"] == "rmtrain" else "TRL evaluate()", r["pairs"], f"{r['pairs_per_s']:.2f}",
                 f"{r['seconds']:.2f}", f"{r['peak_rss_kib'] / 2**20:.2f}", f"{r['accuracy']:.3f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    median = {tool: statistics.median(r["pairs_per_s"] for r in runs if r["tool"] == tool) for tool in ("rmtrain", "trl")}
    ratio = median["rmtrain"] / median["trl"]
    busy = [r for r in runs if r["other_cpu_cores"] and r["other_cpu_cores"] > BUSY_CORES]
    if busy:
        lines.append(f"\nWARNING: other processes used up to {max(r['other_cpu_cores'] for r in busy):.1f} cores during "
                     f"{len(busy)} of these runs; their timings are not comparable.")
    lines.append(f"\nrmtrain eval / TRL evaluate(): pairs/s x{ratio:.2f}")
    return "\n".join(lines), ratio


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-child":
        trl_child(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from: {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="fewer rows, a ~2 minute smoke run")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tool and case, alternating (default 1)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"pairs per eval batch, both tools (default {BATCH_SIZE})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in both tools' children (OMP_NUM_THREADS; default: the libraries' own choice)")
    parser.add_argument("--out", default="bench-eval-results.json", help="results JSON")
    parser.add_argument("--work-dir", default=None, help="folder for data, logs and outputs (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (always kept on failure)")
    parser.add_argument("--verbose", action="store_true", help="stream the children's output")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in SIZES for c in cases):
        parser.error(f"unknown case in {args.cases!r}; choose from {', '.join(CASES)}")
    data_dir = check_prerequisites()
    if data_dir is None:
        return 2

    if args.threads:
        # Inherited by every child (run_child copies os.environ); torch reads it at start-up.
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    machine = machine_info()
    machine["threads"] = args.threads
    print(f"Machine: {machine_line(machine)}; torch threads: {args.threads or 'default'}", flush=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rmtrain-bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine, "quick": args.quick, "repeats": args.repeats, "cases": {}}
    tables, failed, started = [], False, time.perf_counter()
    try:
        models = build_models(work, cases, args.verbose)
        for name in cases:
            case = case_setup(name, args.quick, data_dir, models, work, args.batch_size)
            runs = []
            for rep in range(args.repeats):
                for tool, runner in (("rmtrain", run_rmtrain), ("trl", run_trl)):
                    print(f"[{time.perf_counter() - started:5.0f}s] {name}: {tool} eval {rep + 1}/{args.repeats} ...", end=" ", flush=True)
                    r = runner(case, work / name / f"{tool}-{rep + 1}", args.verbose)
                    runs.append(r)
                    busy = r["other_cpu_cores"]
                    print(f"{r['pairs_per_s']:.2f} pairs/s over {r['pairs']} pairs"
                          + (f"  [BUSY MACHINE: other processes used {busy:.1f} cores]" if busy and busy > BUSY_CORES else ""), flush=True)
            table, ratio = case_table(name, case, runs)
            tables.append(table)
            results["cases"][name] = {"settings": case, "runs": runs, "ratio_pairs_per_s": ratio}
            print("\n" + table + "\n", flush=True)
    except RunFailed as error:
        failed = True
        print(f"\nerror: {error}", file=sys.stderr)
    finally:
        results["seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        if args.keep or args.work_dir or failed:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if tables:
        print(f"## rmtrain eval vs TRL {machine['versions']['trl']} RewardTrainer.evaluate()\n\n"
              f"Machine: {machine_line(machine)}; torch threads: {args.threads or 'default'}\n")
        print("\n\n".join(tables))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
