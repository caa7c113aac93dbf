"""`make bench`, the reward server: `rmtrain serve` against TRL GRPOTrainer's in-process reward scoring.

    python scripts/bench_serve.py [--models tiny-qwen3,smollm2] [--clients 8] [--requests 8] [--group 8] [--quick]
                                  [--repeats N] [--scorings a,b,c,d] [--alternating] [--out FILE]
                                  [--work-dir DIR]

Workload: groups of G=8 completions per prompt, as GRPO samples them. Prompts are HH-harmless conversations up
to their last "Assistant:" (../shared/data/hh_harmless_test.jsonl); completions are the last answers of other
rows (chosen and rejected), so they read like replies. Every client sends its requests one after the other on
one kept-alive connection, `--clients` clients at once, each request one group (`POST /score`).

Compared, on the same groups and model folder (fp32):
  (a) in-process, as TRL 1.16's GRPOTrainer scores a reward model: the group's texts `prompt + completion`
      through plain transformers in one padded batch (`tokenizer(texts, padding=True, padding_side="right",
      add_special_tokens=False)`), one group after another -- its `_calculate_rewards` for a per-device batch
      of one prompt's G generations. The texts get the EOS training appended, so both read the same tokens.
  (b) `rmtrain serve --no-share-prefix`: the same server, every completion its own padded sequence;
  (c) `rmtrain serve` (defaults): a group is one row, its prompt computed once (segment attention);
  (d) (c) without HTTP: the same clients as threads calling the server's parsing and `Scorer` in this process
      (its worker on the main thread, as the server runs it).
With `--alternating`, also (a)'s scoring and the server's tokenizing and worker one group each in turn in this
process (the machine's drift falls on both alike): the ratio of their times.
Measured: completions/s over the whole workload, latency per request (p50, p99), tokens computed (the server's
/health counts; (a) the padded batch sizes), and failed requests (must be zero).

Models: tiny random Qwen3 (real Qwen tokenizer) and SmolLM2-135M-Instruct (GGUF, dequantized; its randomly
initialised score head, seeded), each saved as a plain model folder first.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import ROOT, check_prerequisites, machine_info, machine_line  # noqa: E402


def groups_from_hh(data_dir: Path, count: int, size: int, seed: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (data_dir / "hh_harmless_test.jsonl").read_text().splitlines()[: count + 400]]
    answers = [r[side].rsplit("\n\nAssistant:", 1)[1] for r in rows for side in ("chosen", "rejected")]
    answers = [a for a in answers if a.strip()]
    rng = random.Random(seed)
    return [{"prompt": r["chosen"].rsplit("\n\nAssistant:", 1)[0] + "\n\nAssistant:", "completions": rng.sample(answers, size)}
            for r in rows[:count]]


def save_models(work: Path, names: list[str]) -> dict[str, Path]:
    """Plain model folders (as a run or an export leaves them) for each model, built with rmtrain's own loader."""
    code = """
import sys, torch
sys.path.insert(0, sys.argv[3])
from rmtrain.config import ModelConfig
from rmtrain.model import load_reward_model
from rmtrain.saved import save_model_folder
from tests.assets import SMOLLM2_GGUF, build_tiny_qwen3, smollm2_dir
name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(42)
mc = ModelConfig(name_or_path=build_tiny_qwen3(out + "-base")) if name == "tiny-qwen3" else ModelConfig(name_or_path=smollm2_dir(), gguf_file=SMOLLM2_GGUF)
rm = load_reward_model(mc)
save_model_folder(rm.model, None, rm.tokenizer, rm.fmt, 1024, out)
"""
    folders = {}
    for name in names:
        out = work / name
        if not (out / "config.json").is_file():
            subprocess.run([sys.executable, "-c", code, name, str(out), str(ROOT)], check=True, cwd=ROOT,
                           env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True)
        folders[name] = out
    return folders


def grpo_scoring(folder: Path):
    """(a)'s scoring of one group, GRPOTrainer's way: its `prompt + completion` texts in one right-padded batch
    through plain transformers. Returns a function of a group giving the tokens it computed."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=torch.float32).eval()
    eos = json.loads((folder / "rmtrain_format.json").read_text()).get("append_eos") or ""

    @torch.inference_mode()  # as GRPOTrainer scores its reward model
    def score(group: dict) -> int:
        texts = [group["prompt"] + c + eos for c in group["completions"]]
        batch = tokenizer(texts, padding=True, padding_side="right", add_special_tokens=False, return_tensors="pt")
        model(**batch).logits[:, 0].tolist()
        return batch["input_ids"].numel()

    return score


def in_process(folder: Path, groups: list[dict]) -> dict:
    """(a): GRPOTrainer's way, one padded batch per group, in this process."""
    score = grpo_scoring(folder)
    latencies, tokens, completions = [], 0, 0
    score(groups[0])  # warm-up, as the servers get one
    start = time.perf_counter()
    for group in groups:
        t0 = time.perf_counter()
        tokens += score(group)
        latencies.append(time.perf_counter() - t0)
        completions += len(group["completions"])
    seconds = time.perf_counter() - start
    return {"completions_per_s": completions / seconds, "latencies": latencies, "computed_tokens": tokens, "failed": 0, "seconds": seconds}


def server_scorer(folder: Path):
    """The server's worker and tokenizing, with the server's defaults, in this process (the worker to be run on this,
    the main, thread, as `rmtrain serve` runs it)."""
    import torch

    from rmtrain.inference import prepare_inference
    from rmtrain.saved import load_saved, scoring_max_length
    from rmtrain.rounds import Scorer
    from rmtrain.routes import Tokens

    rm, max_length = load_saved(str(folder))
    return Scorer(prepare_inference(rm, "auto", 64), 0.005), Tokens(rm, scoring_max_length(None, max_length))


def alternating(folder: Path, groups: list[dict]) -> dict:
    """(a)'s scoring and the server's (its tokenizing, then `Scorer.score` called in this thread), one group each in
    turn: texts to rewards on both sides. The machine's speed drifts over minutes, which the whole-workload runs
    above feel one at a time; here the drift falls on both alike. The ratio of their summed times is what the
    server's forward buys on these groups (the prompt once, no padding), without HTTP, clients or batching across
    requests."""
    from rmtrain.rounds import Job
    from rmtrain.routes import parse_score

    score = grpo_scoring(folder)
    scorer, tokens = server_scorer(folder)
    score(groups[0])  # warm-up, both
    scorer.score([Job(parse_score(groups[0], tokens).groups).next_part()])
    seconds = {"a": 0.0, "server": 0.0}
    for group in groups:
        t0 = time.perf_counter()
        score(group)
        t1 = time.perf_counter()
        scorer.score([Job(parse_score(group, tokens).groups).next_part()])
        seconds["a"] += t1 - t0
        seconds["server"] += time.perf_counter() - t1
    scorer.stop()
    return {"seconds_a": seconds["a"], "seconds_server": seconds["server"], "ratio": seconds["a"] / seconds["server"]}


def run_clients(groups: list[dict], clients: int, requests: int, rewards_of) -> dict:
    """`clients` threads, each sending its `requests` groups one after the other through `rewards_of(group)`;
    completions/s over the whole workload, each request's latency, and the requests that failed."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()

    def client(number: int) -> None:
        for i in range(requests):
            group = groups[(number * requests + i) % len(groups)]
            t0 = time.perf_counter()
            try:
                ok = len(rewards_of(group)) == len(group["completions"])
            except (urllib.error.URLError, ConnectionError, KeyError):
                ok = False
            with lock:
                latencies.append(time.perf_counter() - t0)
                failed[0] += not ok

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    completions = sum(len(groups[(n * requests + i) % len(groups)]["completions"]) for n in range(clients) for i in range(requests))
    return {"completions_per_s": completions / seconds, "latencies": latencies, "failed": failed[0], "seconds": seconds}


def without_http(folder: Path, groups: list[dict], clients: int, requests: int) -> dict:
    """(d): what (c) does without HTTP: the same clients as threads of this process, each parsing and tokenizing its
    group (`rmtrain.routes.parse_score`) and handing it to the server's `Scorer` (server defaults). (c) against (d) is
    what HTTP, JSON and the client processes cost."""
    from rmtrain.routes import parse_score

    scorer, tokens = server_scorer(folder)
    result: dict = {}

    def clients_then_stop() -> None:
        try:
            scorer.rounds.submit(parse_score(groups[0], tokens).groups).result()  # warm-up
            before = scorer.stats["computed_tokens"]
            result.update(run_clients(groups, clients, requests, lambda group: scorer.rounds.submit(parse_score(group, tokens).groups).result()[0]))
            result["computed_tokens"] = scorer.stats["computed_tokens"] - before
        except BaseException as error:  # noqa: BLE001 -- raised again on the main thread
            result["error"] = error
        finally:
            scorer.stop()

    thread = threading.Thread(target=clients_then_stop)
    thread.start()
    scorer.run()  # on the main thread, as the server runs it
    thread.join()
    if "error" in result:
        raise result["error"]
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_connections = threading.local()


def post_kept_alive(port: int, path: str, body: dict) -> dict:
    """POST on this thread's own connection, kept open between requests as an RL worker's HTTP session keeps it
    (`requests.Session`, httpx, aiohttp): no TCP connection set up and torn down per request."""
    connection = getattr(_connections, "connection", None)
    if connection is None or connection.port != port:
        connection = _connections.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    except (OSError, http.client.HTTPException) as error:
        _connections.connection = None
        connection.close()
        raise ConnectionError(str(error)) from error
    if response.status != 200:
        raise ConnectionError(f"{path}: HTTP {response.status}: {payload[:200]!r}")
    return json.loads(payload)


def served(folder: Path, groups: list[dict], clients: int, requests: int, extra: list[str], log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "rmtrain", "serve", str(folder), "--port", str(port), *extra],
                               cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                               env=os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                call("/health")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        call("/score", groups[0])  # warm-up
        before = call("/health")
        result = run_clients(groups, clients, requests, lambda group: post_kept_alive(port, "/score", group)["rewards"])
        after = call("/health")
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)
    return {**result, "computed_tokens": after["computed_tokens"] - before["computed_tokens"], "exit_status": status,
            "batches": after["batches"] - before["batches"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_run(runs: list[dict]) -> dict:
    """The repeat with the median completions/s, its latency percentiles; failures summed over every repeat."""
    ordered = sorted(runs, key=lambda r: r["completions_per_s"])
    middle = ordered[len(ordered) // 2]
    return {**middle, "p50": percentile(middle["latencies"], 0.5), "p99": percentile(middle["latencies"], 0.99),
            "latencies": None, "failed": sum(r["failed"] for r in runs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny-qwen3,smollm2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--quick", action="store_true", help="2 requests per client")
    parser.add_argument("--repeats", type=int, default=1, help="alternate (a) to (d) this many times; medians")
    parser.add_argument("--scorings", default="a,b,c,d", help="which of (a)-(d) to run; (a) and (c) always run")
    parser.add_argument("--alternating", action="store_true", help="also time (a) and the server's tokenizing and worker group by group in turn")
    parser.add_argument("--out", default="bench-serve-results.json")
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    data_dir = check_prerequisites()
    if data_dir is None:
        return 2
    requests = 2 if args.quick else args.requests
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="rmtrain-bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(machine_line(machine), flush=True)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    folders = save_models(work, names)
    groups = groups_from_hh(data_dir, args.clients * requests, args.group)
    results: dict = {"machine": machine, "clients": args.clients, "requests_per_client": requests, "group": args.group, "models": {}}
    labels = ("(a) in-process, GRPOTrainer's way", "(b) rmtrain serve --no-share-prefix", "(c) rmtrain serve",
              "(d) (c) without HTTP: its Scorer in process")
    chosen = [label for label in labels if label[1] in set(args.scorings.split(",")) | {"a", "c"}]
    for name in names:
        repeats: list[dict] = []
        for rep in range(args.repeats):  # alternating, since this machine is noisy
            print(f"{name}: repeat {rep + 1}/{args.repeats} ...", flush=True)
            runs_of = {
                labels[0]: lambda: in_process(folders[name], [groups[i % len(groups)] for i in range(args.clients * requests)]),
                labels[1]: lambda: served(folders[name], groups, args.clients, requests, ["--no-share-prefix"], work / f"{name}-b.log"),
                labels[2]: lambda: served(folders[name], groups, args.clients, requests, [], work / f"{name}-c.log"),
                labels[3]: lambda: without_http(folders[name], groups, args.clients, requests),
            }
            repeats.append({label: run() for label, run in runs_of.items() if label in chosen})
        runs = {label: median_run([r[label] for r in repeats]) for label in chosen}
        base = runs[labels[0]]["completions_per_s"]
        paired = [r[labels[2]]["completions_per_s"] / r[labels[0]]["completions_per_s"] for r in repeats]
        each = ", ".join(f"x{ratio:.2f}" for ratio in paired) + (f" (median x{statistics.median(paired):.2f})" if len(paired) > 1 else "")
        lines = [f"**{name}: {args.clients} clients x {requests} requests, G={args.group} completions per request (HH prompts)"
                 + (f", median of {args.repeats} alternating repeats" if args.repeats > 1 else "") + "**", "",
                 "| scoring | completions/s | vs (a) | p50 latency s | p99 latency s | tokens computed | failed |", "|---|---|---|---|---|---|---|"]
        for label, r in runs.items():
            spread = f" ({min(x[label]['completions_per_s'] for x in repeats):.1f}-{max(x[label]['completions_per_s'] for x in repeats):.1f})" if args.repeats > 1 else ""
            lines.append(f"| {label} | {r['completions_per_s']:.1f}{spread} | x{r['completions_per_s'] / base:.2f} | {r['p50']:.3f} | "
                         f"{r['p99']:.3f} | {r['computed_tokens']:,} | {r['failed']} |")
        lines += ["", f"(c) / (a) in each repeat: {each}"]
        turns = alternating(folders[name], groups) if args.alternating else None
        if turns:
            lines.append(f"(a) and the server's tokenizing and worker in turn, group by group, in one process: {turns['seconds_a']:.1f} s against "
                         f"{turns['seconds_server']:.1f} s, x{turns['ratio']:.2f}")
        table = "\n".join(lines)
        print("\n" + table + "\n", flush=True)
        results["models"][name] = {"alternating": turns, "runs": runs, "repeats": [{k: {**v, "latencies": None} for k, v in r.items()} for r in repeats], "table": table}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
