"""Ensembles of reward models: one model, K heads on one trunk, K bootstrap heads, K seed members and the weight
average (WARM) of the K seeds, each read with mean / min / mean-std, on held-out pairs and best-of-n lists.

    python scripts/bench_ensembles.py [--cases minilm-hh,qwen3-hh,qwen3-uf,qwen3-arena] [--quick]
                                      [--k 4] [--repeats 2] [--out FILE] [--work-dir /tmp/bench_ens]

Every step is its own subprocess of the real CLI (`python -m rmtrain fit | ensemble | average | score`), run from
the repository so that its rmtrain is the one imported.

Cases (model x data), default / --quick sizes (default cases: minilm-hh, qwen3-hh, qwen3-uf, qwen3-arena; --quick:
qwen3-hh, qwen3-arena, one timing repeat: a few minutes):
  minilm-*     MiniLM-L6 (pretrained encoder, models/all-MiniLM-L6-v2).
  qwen3-*      tiny random Qwen3 (2 layers, hidden 128, real Qwen tokenizer: tests.assets.build_tiny_qwen3).
  minilm-hh    hh_harmless_test.jsonl: train the first 192 / 32 pairs, held out the last 256 / 32 pairs.
  qwen3-hh     the same file: train the first 384 / 32 pairs, held out the last 512 / 32.
  qwen3-uf     ultrafeedback_binarized_sample.jsonl: train the first 256 / 32 rows of split train_sample (the file's
               margins dropped: plain Bradley-Terry), held out the 175 / 32 rows of split eval_sample.
  qwen3-arena  arena_bench_v1_lists.jsonl (GPT-4 grades 1-10), split by prompt: of the first half (146 prompts) the
               first 96 / 16 lists train, as one best-versus-worst pair each, 1 epoch; best-of-n on the first 48 / 4
               lists of the other half: every completion scored, the grade of the one an aggregate ranks first.
  minilm-uf, minilm-arena (256 / 175 rows; 96 / 24 lists): not in the default list, for time (a shared 2-core CPU:
               one MiniLM case takes ~20 min); pass them with --cases.
Each fit: batch 16 pairs, lr 1e-4, max_length 256, fp32, 1 epoch, linear decay, no warm-up, truncation truncate (a
text keeps its last tokens, as `rmtrain score` cuts), gradient checkpointing off, no eval set (held-out data is read by `rmtrain score`).

Variants (K = --k):  single (seed 0) | heads (model.heads=K, seed 0) | boot heads (model.heads=K,
train.head_bootstrap=true) | members (seeds 0..K-1, `rmtrain ensemble`; the seed-0 run is the single model) |
WARM (`rmtrain average` of the K seed runs; one plain model). Held-out texts are scored with `rmtrain score
--aggregate mean-std:1 --in-order` (a pair is its chosen and its rejected text as two rows, prompt + completion);
the script reads each member's reward (`rewards`) and computes every aggregate itself, checking that `reward`
equals its own mean - std (and that member 0 of the seed ensemble is the single model's reward).

Measured:
  acc <agg>        held-out pairs ranked right by the aggregate (mean, min, mean-std:1; a tie counts 1/2).
  avg member acc   the members' (heads') accuracies averaged.
  AUROC spread     how well the spread (std over members of the margin r_chosen - r_rejected) ranks the pairs the
                   ensemble mean gets wrong above those it gets right (rank-based, ties 1/2; 0.5 is chance).
  picked grade     lists: mean grade of the completion an aggregate ranks first, beside the lists' best and mean.
  costs            train s/step (run_info.json: the training loop's clock / steps) of heads and boot heads against
                   the single model; scoring seconds (`rmtrain score` of the first 96 held-out texts, in-process
                   clock after imports: model load + tokenize + forward) of heads, WARM and the seed ensemble
                   against the single model. Timings alternate order over --repeats (train: the main fits, then
                   repeats of max_steps 4 fits in reverse order); medians of ratios are reported.

Results: a markdown table per case on stdout and `--out` JSON (default /tmp/bench_ens/results.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, machine_info, machine_line, run_child  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.assets import shared_data_dir  # noqa: E402

HH = "hh_harmless_test.jsonl"
UF = "ultrafeedback_binarized_sample.jsonl"
LISTS = "arena_bench_v1_lists.jsonl"
AGGREGATES = ("mean", "min", "mean-std:1")
MODELS = {"minilm": "models/all-MiniLM-L6-v2", "qwen3": None}  # qwen3: built into the work folder
# (train, held out): pairs for hh/uf, (train lists, held-out lists) for arena
SIZES = {  # MiniLM is far slower than the tiny Qwen3 on 2 cores: smaller sizes keep the run under ~45 min
    "minilm-hh": {"default": (192, 256), "quick": (32, 32)},
    "minilm-uf": {"default": (256, 175), "quick": (32, 32)},
    "minilm-arena": {"default": (96, 24), "quick": (16, 4)},
    "qwen3-hh": {"default": (384, 512), "quick": (32, 32)},
    "qwen3-uf": {"default": (256, 175), "quick": (32, 32)},
    "qwen3-arena": {"default": (96, 48), "quick": (16, 4)},
}
EPOCHS = {"minilm-arena": 1, "qwen3-arena": 1}
CASES = ["minilm-hh", "minilm-uf", "minilm-arena", "qwen3-hh", "qwen3-uf", "qwen3-arena"]
DEFAULT_CASES = ["minilm-hh", "qwen3-hh", "qwen3-uf", "qwen3-arena"]
QUICK_CASES = ["qwen3-hh", "qwen3-arena"]
MAX_LENGTH = 256
TIMING_TEXTS = 96
TIMING_STEPS = 4

TIMED_SCORE = """
import json, sys, time
import torch, transformers  # imported before the clock starts: the timing is load + tokenize + forward
import rmtrain, rmtrain.score, rmtrain.inference
from rmtrain.cli import app
print("rmtrain from", rmtrain.__file__, file=sys.stderr)
start = time.perf_counter()
try:
    app(sys.argv[2:], prog_name="rmtrain", standalone_mode=False)
finally:
    seconds = time.perf_counter() - start
open(sys.argv[1], "w").write(json.dumps({"seconds": seconds}))
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def rmtrain_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "rmtrain", *args]


# --------------------------------------------------------------------------------------------------
# Data: the training source of each recipe, and the held-out texts to score


def hh_split(text: str) -> dict:
    prompt, answer = text.rsplit("\n\nAssistant:", 1)
    return {"prompt": prompt + "\n\nAssistant:", "completion": answer}


def prepare_data(case: str, quick: bool, data_dir: Path, work: Path) -> dict:
    """{"train": data.train source, "epochs", "kind": pairs|lists, "texts": score rows file, "pairs" or "lists"}."""
    dataset = case.split("-")[1]
    n_train, n_eval = SIZES[case]["quick" if quick else "default"]
    work.mkdir(parents=True, exist_ok=True)
    if dataset == "hh":
        rows = read_jsonl(data_dir / HH)
        held = rows[-n_eval:]
        texts = [hh_split(r[side]) for r in held for side in ("chosen", "rejected")]
        train = {"path": str(data_dir / HH), "limit": n_train}
        out = {"kind": "pairs", "epochs": 1, "n_train": n_train, "n_eval": len(held)}
    elif dataset == "uf":
        rows = read_jsonl(data_dir / UF)
        held = [r for r in rows if r["split"] == "eval_sample"][:n_eval]
        texts = [{"prompt": r["prompt"], "completion": r[side]} for r in held for side in ("chosen", "rejected")]
        train = {"path": str(data_dir / UF), "where": {"split": "train_sample"}, "limit": n_train, "columns": {"margin": None}}
        out = {"kind": "pairs", "epochs": 1, "n_train": n_train, "n_eval": len(held)}
    else:
        rows = read_jsonl(data_dir / LISTS)
        half = len(rows) // 2
        train_lists = rows[:half][:n_train]
        held = rows[half:][:n_eval]
        pairs = []
        for r in train_lists:  # one best-versus-worst pair per list (first best, first worst)
            s = r["scores"]
            best, worst = s.index(max(s)), s.index(min(s))
            if s[best] > s[worst]:
                pairs.append({"prompt": r["prompt"], "chosen": r["completions"][best], "rejected": r["completions"][worst]})
        train = {"path": str(write_jsonl(work / "train-pairs.jsonl", pairs))}
        texts = [{"prompt": r["prompt"], "completion": c} for r in held for c in r["completions"]]
        out = {"kind": "lists", "epochs": 1 if quick else EPOCHS[case], "n_train": len(pairs), "n_train_lists": len(train_lists),
               "n_eval": len(held), "lists": [{"scores": r["scores"], "n": len(r["completions"])} for r in held]}
    write_jsonl(work / "texts.jsonl", texts)
    write_jsonl(work / "timing-texts.jsonl", texts[:TIMING_TEXTS])
    return out | {"train": train, "texts": work / "texts.jsonl", "timing_texts": work / "timing-texts.jsonl", "n_texts": len(texts)}


# --------------------------------------------------------------------------------------------------
# Runs


def recipe(model: str, data: dict, out: Path, seed: int, heads: int = 1, bootstrap: bool = False, max_steps: int | None = None) -> dict:
    train = {"output_dir": str(out), "seed": seed, "learning_rate": 1e-4, "per_device_batch_size": 16, "num_epochs": data["epochs"],
             "bf16": False, "lr_scheduler": "linear", "warmup_ratio": 0.0, "gradient_checkpointing": False, "logging_steps": 5}
    if bootstrap:
        train["head_bootstrap"] = True
    if max_steps:
        train["max_steps"] = max_steps
    return {"model": {"name_or_path": model, "heads": heads, "disable_dropout": True},
            "data": {"train": data["train"], "max_length": MAX_LENGTH, "truncation": "truncate"}, "train": train}


def fit(tree: dict, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    child = run_child(rmtrain_cmd("fit", str(folder / "recipe.yaml"), "--overwrite"), folder / "fit.log", False)
    info = json.loads((Path(tree["train"]["output_dir"]) / "run_info.json").read_text())
    t = info["train"]
    return {"wall_seconds": child["wall_seconds"], "other_cpu_cores": child["other_cpu_cores"], "steps": info["steps"],
            "train_seconds": t["seconds"], "s_per_step": t["seconds"] / max(1, info["steps"]), "pairs": t["pairs"]}


def score(model: Path, texts: Path, out: Path, aggregate: str = "mean-std:1") -> dict:
    """`rmtrain score` in a child, timed after its imports; returns seconds and the rows."""
    timing = out.with_suffix(".time.json")
    cmd = [sys.executable, "-c", TIMED_SCORE, str(timing), "score", str(model), "--data", str(texts), "--out", str(out),
           "--aggregate", aggregate, "--in-order", "--batch-size", "16"]
    child = run_child(cmd, out.with_suffix(".log"), False)
    if not out.is_file():
        raise RuntimeError(f"rmtrain score wrote nothing; see {out.with_suffix('.log')}")
    rows = read_jsonl(out)
    return {"seconds": json.loads(timing.read_text())["seconds"], "wall_seconds": child["wall_seconds"],
            "other_cpu_cores": child["other_cpu_cores"], "rows": rows}


# --------------------------------------------------------------------------------------------------
# Metrics (plain Python: the numbers are the members' rewards as `rmtrain score` wrote them)


def members_of(rows: list[dict]) -> list[list[float]]:
    return [r["rewards"] if "rewards" in r else [r["reward"]] for r in rows]


def pstd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def aggregate(how: str, xs: list[float]) -> float:
    if how == "min":
        return min(xs)
    mean = sum(xs) / len(xs)
    return mean - pstd(xs) if how == "mean-std:1" else mean


def auroc(scores: list[float], positive: list[bool]) -> float | None:
    """P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney with mid-ranks)."""
    pos, neg = sum(positive), len(positive) - sum(positive)
    if pos == 0 or neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def win(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def pair_metrics(rows: list[dict]) -> dict:
    r = members_of(rows)
    chosen, rejected = r[0::2], r[1::2]
    k = len(r[0])
    out = {f"acc {how}": statistics.fmean(win(aggregate(how, c), aggregate(how, j)) for c, j in zip(chosen, rejected))
           for how in AGGREGATES}
    member_acc = [statistics.fmean(win(c[m], j[m]) for c, j in zip(chosen, rejected)) for m in range(k)]
    out["member accs"] = member_acc
    out["avg member acc"] = statistics.fmean(member_acc)
    if k > 1:
        margins = [[c[m] - j[m] for m in range(k)] for c, j in zip(chosen, rejected)]
        wrong = [sum(m) / k <= 0 for m in margins]
        out["AUROC spread"] = auroc([pstd(m) for m in margins], wrong)
        out["mean errors"] = sum(wrong)
    return out


def list_metrics(rows: list[dict], lists: list[dict]) -> dict:
    r = members_of(rows)
    k = len(r[0])
    picked = {how: [] for how in AGGREGATES}
    member_picked = [[] for _ in range(k)]
    at = 0
    for lst in lists:
        rewards, grades = r[at : at + lst["n"]], lst["scores"]
        at += lst["n"]
        for how in AGGREGATES:
            values = [aggregate(how, x) for x in rewards]
            picked[how].append(grades[values.index(max(values))])
        for m in range(k):
            values = [x[m] for x in rewards]
            member_picked[m].append(grades[values.index(max(values))])
    out = {f"picked {how}": statistics.fmean(picked[how]) for how in AGGREGATES}
    out["avg member picked"] = statistics.fmean(statistics.fmean(p) for p in member_picked)
    return out


def check_rows(rows: list[dict]) -> float:
    """Largest |reward - (mean - std)| over rows with members: `rmtrain score --aggregate mean-std:1` against the
    script's own reading of `rewards` (0 for a single model)."""
    return max((abs(r["reward"] - aggregate("mean-std:1", r["rewards"])) for r in rows if "rewards" in r), default=0.0)


# --------------------------------------------------------------------------------------------------


def run_case(name: str, args, data_dir: Path, work: Path) -> dict:
    model_key, dataset = name.split("-")
    k = args.k
    case_dir = work / name
    data = prepare_data(name, args.quick, data_dir, case_dir / "data")
    model = MODELS[model_key] or str(work / "models" / "tiny-qwen3")
    runs = case_dir / "runs"
    started = time.perf_counter()
    log = lambda msg: print(f"[{name} {time.perf_counter() - started:6.0f}s] {msg}", flush=True)  # noqa: E731

    fits = {}
    specs = [("single", 0, 1, False), ("heads", 0, k, False), ("boot heads", 0, k, True)] + [(f"seed {s}", s, 1, False) for s in range(1, k)]
    for label, seed, heads, boot in specs:
        folder = runs / label.replace(" ", "-")
        fits[label] = fit(recipe(model, data, folder / "run", seed, heads, boot), folder) | {"folder": str(folder / "run")}
        log(f"fit {label}: {fits[label]['steps']} steps, {fits[label]['s_per_step']:.3f} s/step")
    seeds = [fits["single"]["folder"]] + [fits[f"seed {s}"]["folder"] for s in range(1, k)]
    ens, warm = runs / "members", runs / "warm"
    run_child(rmtrain_cmd("ensemble", *seeds, "--out", str(ens), "--overwrite"), runs / "ensemble.log", False)
    run_child(rmtrain_cmd("average", *seeds, "--out", str(warm), "--overwrite"), runs / "average.log", False)
    log("ensemble and average written")

    # Training cost: the main fits are repeat 1 (single first); then heads first, max_steps fits.
    step_ratio = [{"single": fits["single"]["s_per_step"], "heads": fits["heads"]["s_per_step"],
                   "boot heads": fits["boot heads"]["s_per_step"]}]
    for rep in range(1, args.repeats):
        order = [("boot heads", k, True), ("heads", k, False), ("single", 1, False)]
        if rep % 2 == 0:
            order.reverse()
        times = {}
        for label, heads, boot in order:
            folder = case_dir / "timing" / f"{label.replace(' ', '-')}-{rep}"
            times[label] = fit(recipe(model, data, folder / "run", 0, heads, boot, max_steps=TIMING_STEPS), folder)["s_per_step"]
            shutil.rmtree(folder / "run", ignore_errors=True)
        step_ratio.append(times)
        log(f"timing fits, repeat {rep + 1}: " + ", ".join(f"{a} {b:.3f}" for a, b in times.items()))

    # Held-out reading: every variant once on all texts.
    models = {"single": Path(fits["single"]["folder"]), "heads": Path(fits["heads"]["folder"]),
              "boot heads": Path(fits["boot heads"]["folder"]), "members": ens, "WARM": warm}
    scored = {}
    out_dir = case_dir / "scores"
    out_dir.mkdir(exist_ok=True)
    for label, folder in models.items():
        scored[label] = score(folder, data["texts"], out_dir / f"{label.replace(' ', '-')}.jsonl")
        log(f"scored {label}: {len(scored[label]['rows'])} texts in {scored[label]['seconds']:.1f} s")
    metric = pair_metrics if data["kind"] == "pairs" else (lambda rows: list_metrics(rows, data["lists"]))
    results = {label: metric(s["rows"]) | {"score_check": check_rows(s["rows"])} for label, s in scored.items()}
    single = [r["reward"] for r in scored["single"]["rows"]]
    member0 = [r["rewards"][0] for r in scored["members"]["rows"]]
    results["members"]["member 0 = single (max abs diff)"] = max(abs(a - b) for a, b in zip(single, member0))
    if data["kind"] == "lists":
        results["lists"] = {"best grade": statistics.fmean(max(l["scores"]) for l in data["lists"]),
                            "mean grade": statistics.fmean(statistics.fmean(l["scores"]) for l in data["lists"])}

    # Scoring cost: the first TIMING_TEXTS texts, alternating order.
    score_times = []
    for rep in range(args.repeats):
        order = ["single", "heads", "WARM", "members"]
        if rep % 2:
            order.reverse()
        times = {}
        for label in order:
            times[label] = score(models[label], data["timing_texts"], out_dir / f"timing-{label}-{rep}.jsonl", "mean")["seconds"]
        score_times.append(times)
        log(f"timing scores, repeat {rep + 1}: " + ", ".join(f"{a} {b:.2f}" for a, b in times.items()))

    def ratio(table: list[dict], label: str) -> float:
        return statistics.median(t[label] / t["single"] for t in table)

    costs = {
        "train s/step single (median)": statistics.median(t["single"] for t in step_ratio),
        "train step heads / single": ratio(step_ratio, "heads"),
        "train step boot heads / single": ratio(step_ratio, "boot heads"),
        "train members / single": float(k),  # K separate runs of the same steps
        "score s single (median)": statistics.median(t["single"] for t in score_times),
        "score heads / single": ratio(score_times, "heads"),
        "score WARM / single": ratio(score_times, "WARM"),
        "score members / single": ratio(score_times, "members"),
        "score s all held-out texts (once each)": {label: sc["seconds"] for label, sc in scored.items()},
        "train repeats": step_ratio,
        "score repeats": score_times,
    }
    busy = max((f["other_cpu_cores"] or 0) for f in fits.values())
    return {"case": name, "model": model, "dataset": dataset, "data": {k2: v for k2, v in data.items() if k2 not in ("lists", "train", "texts", "timing_texts")},
            "train_source": data["train"], "fits": fits, "results": results, "costs": costs,
            "max_other_cpu_cores_during_fits": busy, "minutes": (time.perf_counter() - started) / 60}


def fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def case_table(c: dict, k: int) -> str:
    d, res, cost = c["data"], c["results"], c["costs"]
    model = "MiniLM-L6" if c["case"].startswith("minilm") else "tiny random Qwen3"
    if d["kind"] == "pairs":
        title = (f"**{c['case']}**: {model}, train {d['n_train']} pairs, held out {d['n_eval']} pairs, "
                 f"max_length {MAX_LENGTH}, batch 16, lr 1e-4, 1 epoch, K = {k}")
        head = ["variant", *[f"acc {a}" for a in AGGREGATES], "avg member acc", "AUROC spread", "train cost", "score cost"]
    else:
        title = (f"**{c['case']}**: {model}, train {d['n_train']} best-vs-worst pairs from {d['n_train_lists']} lists "
                 f"({d['epochs']} epochs), best-of-n on {d['n_eval']} held-out lists ({d['n_texts']} completions), "
                 f"max_length {MAX_LENGTH}, K = {k}; best grade {res['lists']['best grade']:.2f}, mean grade "
                 f"{res['lists']['mean grade']:.2f}")
        head = ["variant", *[f"picked {a}" for a in AGGREGATES], "avg member picked", "train cost", "score cost"]
    train_cost = {"single": "1", "heads": f"x{cost['train step heads / single']:.2f} /step",
                  "boot heads": f"x{cost['train step boot heads / single']:.2f} /step", "members": f"{k} runs", "WARM": f"{k} runs"}
    score_cost = {"single": f"1 ({cost['score s single (median)']:.1f} s)", "heads": f"x{cost['score heads / single']:.2f}",
                  "boot heads": f"x{cost['score heads / single']:.2f} (as heads)", "members": f"x{cost['score members / single']:.2f}",
                  "WARM": f"x{cost['score WARM / single']:.2f}"}
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in ("single", "heads", "boot heads", "members", "WARM"):
        r = res[label]
        name = {"heads": f"{k} heads", "boot heads": f"{k} bootstrap heads", "members": f"{k} seed members",
                "WARM": f"WARM of {k} seeds", "single": "single (seed 0)"}[label]
        if d["kind"] == "pairs":
            cells = [name, *[fmt(r[f"acc {a}"]) for a in AGGREGATES], fmt(r["avg member acc"]), fmt(r.get("AUROC spread"))]
        else:
            cells = [name, *[fmt(r[f"picked {a}"], 2) for a in AGGREGATES], fmt(r["avg member picked"], 2)]
        lines.append("| " + " | ".join(cells + [train_cost[label], score_cost[label]]) + " |")
    checks = max(r["score_check"] for key, r in res.items() if key != "lists")
    once = cost.get("score s all held-out texts (once each)")
    if once:
        lines += ["", f"scoring all {d['n_texts']} held-out texts once each (not alternated): "
                  + ", ".join(f"{label} {sec:.1f} s" for label, sec in once.items())]
    lines += ["", f"train s/step single {cost['train s/step single (median)']:.3f}; scoring the first {min(TIMING_TEXTS, d['n_texts'])} texts "
              f"(medians of {len(cost['score repeats'])} alternating repeats); score check |reward - (mean-std)| max {checks:.1e}, "
              f"member 0 vs single max diff {res['members']['member 0 = single (max abs diff)']:.1e}; {c['minutes']:.1f} min"]
    if c["max_other_cpu_cores_during_fits"] > 0.25:
        lines.append(f"WARNING: other processes used up to {c['max_other_cpu_cores_during_fits']:.1f} cores during the fits.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help=f"comma-separated from {', '.join(CASES)} (default: {', '.join(DEFAULT_CASES)}; "
                                                      f"--quick: {', '.join(QUICK_CASES)})")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps per fit, a few held-out rows")
    parser.add_argument("--k", type=int, default=4, help="heads / members (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing repeats (default 2; --quick: 1)")
    parser.add_argument("--work-dir", default="/tmp/bench_ens", help="runs, scores and logs (default /tmp/bench_ens)")
    parser.add_argument("--out", default=None, help="results JSON (default WORK_DIR/results.json)")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 2)
    cases = [c.strip() for c in (args.cases or ",".join(QUICK_CASES if args.quick else DEFAULT_CASES)).split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or args.k < 2 or args.repeats < 1:
        parser.error(f"unknown cases {unknown}" if unknown else "--k must be >= 2 and --repeats >= 1")
    data_dir = shared_data_dir()
    if data_dir is None:
        print("error: ../shared/data (the preference data) is absent", file=sys.stderr)
        return 2
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    if any(c.startswith("qwen3") for c in cases):
        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.assets import build_tiny_qwen3; build_tiny_qwen3(sys.argv[1])"
        run_child([sys.executable, "-c", code, str(work / "models" / "tiny-qwen3")], work / "build-tiny-qwen3.log", False)
    machine = machine_info()
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = Path(args.out) if args.out else Path(args.work_dir) / ("results-quick.json" if args.quick else "results.json")
    results = {"date": date, "machine": machine, "command": " ".join(["python", *sys.argv]), "k": args.k, "cases": []}
    for name in cases:
        results["cases"].append(run_case(name, args, data_dir, work))
        out.write_text(json.dumps(results, indent=1) + "\n")  # after every case: a partial run keeps what it did
        print("\n" + case_table(results["cases"][-1], args.k) + "\n", flush=True)
    print(f"{date}; {machine_line(machine)}; fp32\n")
    for case in results["cases"]:
        print(case_table(case, args.k) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
