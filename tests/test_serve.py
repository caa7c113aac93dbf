"""`rmtrain serve` over real HTTP on the loopback interface, bounded in requests and time: rewards of both
endpoints equal `rmtrain score`, concurrent clients all get their own answers, bad requests get a 400 and the
server goes on, SIGTERM ends it with status 0. Tiny Qwen3 (decoder: a group is one shared-prefix row) and
MiniLM (encoder)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from rmtrain.score import run_score
from tests.conftest import ROOT, read_jsonl
from tests.launch import free_port

pytestmark = pytest.mark.shared_data


def hh_groups(shared_data: Path, count: int, size: int, seed: int = 0) -> list[dict]:
    """Prompts of HH conversations (up to the last "Assistant:") with `size` completions each: the row's own
    two answers and answers of other rows, short enough for quick tests."""
    rows = read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=200)
    answers = [r[side].rsplit("\n\nAssistant:", 1)[1][:300] for r in rows for side in ("chosen", "rejected")]
    rng = random.Random(seed)
    groups = []
    for r in rows[:count]:
        prompt = r["chosen"].rsplit("\n\nAssistant:", 1)[0][-600:] + "\n\nAssistant:"
        groups.append({"prompt": prompt, "completions": [a for a in rng.sample(answers, size) if a.strip()]})
    return groups


class Server:
    def __init__(self, model: str, tmp_path: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rmtrain", "serve", model, "--host", "127.0.0.1", "--port", str(self.port), *extra],
            cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"the server did not answer /health:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        assert f"listening on http://127.0.0.1:{self.port}" in self.log.read_text()

    def get(self, path: str) -> tuple[int, dict]:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.status, json.loads(response.read())

    def post(self, path: str, body, raw: bytes | None = None) -> tuple[int, dict]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def scores_of(model: str, rows: list[dict], tmp_path: Path, name: str) -> list[float]:
    data, out = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_score(model, str(data), str(out), in_order=True)
    return [json.loads(line)["reward"] for line in out.read_text().splitlines()]


def concurrent_clients(server: Server, groups: list[dict], expected: list[float]) -> None:
    offsets = [sum(len(g["completions"]) for g in groups[:i]) for i in range(len(groups))]
    failures: list[str] = []

    def client(number: int) -> None:
        rng = random.Random(number)
        for _ in range(16):
            i = rng.randrange(len(groups))
            status, body = server.post("/score", groups[i])
            want = expected[offsets[i] : offsets[i] + len(groups[i]["completions"])]
            if status != 200 or max(abs(a - b) for a, b in zip(body["rewards"], want)) >= 1e-4:
                failures.append(f"client {number}, group {i}: {status} {body}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "clients did not finish in 300 s"
    assert failures == [], failures[:3]
    assert time.monotonic() - start < 300
    assert server.get("/health")[1]["batches"] < 8 * 16 + 2  # concurrent requests shared batches


@pytest.fixture(scope="module")
def minilm_folder(minilm, tmp_path_factory) -> str:
    """MiniLM with its reward head saved: the pretrained folder has none, so every load would draw another."""
    from rmtrain.config import ModelConfig
    from rmtrain.model import load_reward_model
    from rmtrain.saved import save_model_folder

    rm = load_reward_model(ModelConfig(name_or_path=minilm))
    out = tmp_path_factory.mktemp("minilm-rm")
    save_model_folder(rm.model, None, rm.tokenizer, rm.fmt, 512, out)
    return str(out)


@pytest.mark.parametrize("model_name", ["tiny_qwen3", "minilm_folder"])
def test_server_rewards_equal_rmtrain_score_and_concurrent_clients_get_theirs(model_name, request, tmp_path, shared_data):
    model = request.getfixturevalue(model_name)
    groups = hh_groups(shared_data, 24, 8)
    # What `rmtrain score` gives: every completion as {prompt, completion}; every query as {text}.
    expected = scores_of(model, [{"prompt": g["prompt"], "completion": c} for g in groups for c in g["completions"]], tmp_path, "pc")
    queries = [g["prompt"] + c for g in groups[:4] for c in g["completions"][:2]]
    expected_queries = scores_of(model, [{"text": q} for q in queries], tmp_path, "text")
    server = Server(model, tmp_path)
    try:
        status, body = server.post("/get_reward", {"query": queries, "prompts": ["ignored"], "labels": ["ignored"]})
        assert status == 200 and body["scores"] == body["rewards"] and body["extra_logs"] == {}
        assert max(abs(a - b) for a, b in zip(body["rewards"], expected_queries)) < 1e-4
        status, body = server.post("/score", {"groups": groups[:3]})
        assert status == 200 and [len(r) for r in body["rewards"]] == [len(g["completions"]) for g in groups[:3]]
        flat = [r for rewards in body["rewards"] for r in rewards]
        assert max(abs(a - b) for a, b in zip(flat, expected)) < 1e-4
        if model_name == "tiny_qwen3":  # a decoder's group is one row: its prompt computed once
            assert server.get("/health")[1]["layout"] == "shared_prefix"

        # 8 concurrent clients x 16 requests, each one group: every answer is its own group's rewards (tiny Qwen3:
        # the worker and its batching are the same code for an encoder).
        if model_name == "tiny_qwen3":
            concurrent_clients(server, groups, expected)
    finally:
        status = server.terminate()
    assert status == 0, server.log.read_text()[-3000:]


BAD_REQUESTS = [
    ("/score", None, b"{not json", "body: not valid JSON"),
    ("/score", {"completions": ["a"]}, None, "body: missing 'prompt' (a string or a list of messages)"),
    ("/score", {"prompt": "Q:", "completions": []}, None, "body: 'completions' must be a non-empty list of completions, got an empty list"),
    ("/score", {"prompt": "Q:", "completions": [" a", 3]}, None, "body: 'completions[1]' must be a string or a message list, got int"),
    ("/score", {"prompt": [{"role": "user", "content": "hi"}], "completions": ["text"]}, None,
     "body: mixes plain strings and message lists in prompt/completions; use one shape"),
    ("/score", {"groups": []}, None, "groups: expected a non-empty list"),
    ("/score", {"groups": [{"prompt": "Q:", "completions": [" a"]}, {"prompt": 5, "completions": [" a"]}]}, None,
     "groups[1]: 'prompt' must be a string or a message list, got int"),
    ("/get_reward", {"query": "one text"}, None, "query: expected a non-empty list of strings"),
    ("/get_reward", {"query": ["fine", ""]}, None, "body: 'query[1]' is empty; fill it in or remove it"),
    ("/get_reward", {"query": ["has <|endoftext|> in it"]}, None, "query[0]: contains the pad token"),
]


def test_bad_requests_get_400_and_the_server_goes_on_then_sigterm_exits_0(tiny_qwen3, tmp_path, shared_data):
    server = Server(tiny_qwen3, tmp_path, "--max-length", "64")
    try:
        for path, body, raw, message in BAD_REQUESTS:
            status, answer = server.post(path, body, raw)
            assert status == 400 and message in answer["error"], (path, body, answer)
        # Still serving; an over-long input is cut from the left, as rmtrain score cuts it, and flagged.
        long_prompt = "Human: " + "why " * 200 + "\n\nAssistant:"
        status, body = server.post("/score", {"prompt": long_prompt, "completions": [" Because.", " No."]})
        assert status == 200 and body["truncated"] == [True, True] and len(body["rewards"]) == 2
        rows, out = tmp_path / "cut.jsonl", tmp_path / "cut.scores.jsonl"
        rows.write_text(json.dumps({"prompt": long_prompt, "completion": " Because."}) + "\n")
        run_score(tiny_qwen3, str(rows), str(out), max_length=64)  # rmtrain score with the same --max-length
        line = json.loads(out.read_text())
        assert line["truncated"] and abs(line["reward"] - body["rewards"][0]) < 1e-4
    finally:
        status = server.terminate()
    assert status == 0, server.log.read_text()[-3000:]


def test_out_of_memory_on_a_batch_is_a_503_for_its_requests_and_the_server_goes_on(tiny_qwen3, shared_data):
    """In process (FastAPI's test client over the real app and worker): a real allocator failure in the first
    forward of a round, which holds only the long request's first chunk. The long request gets its 503; the short
    one, gathered into the same round, is answered with its rewards, also from the batch it shares with the long
    request's last chunk; then a round that fails otherwise is a 500, and every request after is answered."""
    import torch
    from fastapi.testclient import TestClient

    from rmtrain.inference import batches, prepare_inference
    from rmtrain.saved import load_saved
    from rmtrain.serve import Scorer, Tokens, create_app

    rm, max_length = load_saved(tiny_qwen3)
    tokens = Tokens(rm, max_length or 1024)
    prompt = hh_groups(shared_data, 1, 1)[0]["prompt"][-300:]
    long_group = {"prompt": prompt, "completions": [" Yes, " * 20, " No, " * 20, " I can not say."]}
    short_group = {"prompt": "Human: hi\n\nAssistant:", "completions": [" Hello.", " Go away.", " Hi there."]}
    scorer = Scorer(prepare_inference(rm, 160, 64), max_wait_s=0.5).start()
    # The round's batches: the long request's chunks, longest first; its last chunk shares a batch with the short one.
    groups, _ = tokens.groups([(g["prompt"], g["completions"], "") for g in (long_group, short_group)])
    keys = [batch["key"].tolist() for batch in batches(scorer.inference, groups)[0]]
    assert len(keys) >= 2 and max(keys[0]) < 3 and any(k < 3 for k in keys[-1]) and any(k >= 3 for k in keys[-1]), keys
    forward, calls = rm.model.forward, []

    def forward_that_runs_out_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            torch.empty(1 << 62, dtype=torch.uint8)  # a real allocator failure: 4 EiB
        return forward(*args, **kwargs)

    def forward_that_breaks(*args, **kwargs):
        raise ValueError("something else went wrong")

    with TestClient(create_app(scorer, tokens)) as client:
        expected = client.post("/score", json=short_group).json()["rewards"]
        rm.model.forward = forward_that_runs_out_first
        answers: dict[str, tuple[int, dict]] = {}

        def post(name: str, body: dict) -> None:
            response = client.post("/score", json=body)
            answers[name] = (response.status_code, response.json())

        threads = [threading.Thread(target=post, args=args) for args in (("long", long_group), ("short", short_group))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        status, body = answers["long"]
        assert status == 503 and "out of memory on the batch this request was in" in body["error"], body
        assert answers["short"][0] == 200 and answers["short"][1]["rewards"] == pytest.approx(expected, abs=1e-5)
        rm.model.forward = forward_that_breaks
        response = client.post("/score", json=short_group)
        assert response.status_code == 500 and "ValueError: something else went wrong" in response.json()["error"]
        rm.model.forward = forward
        response = client.post("/score", json=long_group)
        assert response.status_code == 200 and len(response.json()["rewards"]) == len(long_group["completions"])


def test_a_request_is_answered_as_soon_as_its_own_batches_are_scored(tiny_qwen3):
    """A round cut into several batches (here one group each, longest first) answers each request when its last
    sequence is scored, so its caller turns around while the round's other batches run, with the rewards it gets
    when scored alone."""
    import torch

    from rmtrain.inference import prepare_inference
    from rmtrain.saved import load_saved
    from rmtrain.serve import Job, Scorer, Tokens

    rm, max_length = load_saved(tiny_qwen3)
    tokens = Tokens(rm, max_length or 1024)
    prompt = "Human: Can you help me?\n\nAssistant:"
    (long_group, short_group), _ = tokens.groups([(prompt, [" Yes, " * 20, " No, " * 20, " Maybe, " * 20], ""),
                                                  (prompt, [" Hello.", " Go away.", " Hi there."], "")])
    scorer = Scorer(prepare_inference(rm, None, 3), max_wait_s=0.0)
    alone = []
    for group in (short_group, long_group):
        job = Job([group])
        scorer.score([job])
        alone.append(job.future.result())
    short_job, long_job = Job([short_group]), Job([long_group])
    forward, answered = rm.model.forward, []

    def forward_noting_answers(*args, **kwargs):
        answered.append((long_job.future.done(), short_job.future.done()))
        return forward(*args, **kwargs)

    rm.model.forward = forward_noting_answers
    try:
        scorer.score([short_job, long_job])
    finally:
        rm.model.forward = forward
        scorer.stop()
    assert answered == [(False, False), (True, False)]
    assert [short_job.future.result(), long_job.future.result()] == alone


def test_a_round_takes_the_requests_already_queued_even_with_no_wait():
    """`--max-wait-ms 0` means "do not wait for more", not "one request per batch": what is queued when a round
    starts joins it; the stop ends the gathering and is reported."""
    from rmtrain.serve import Job, Rounds

    rounds = Rounds(max_wait_s=0.0)
    jobs = [Job([]) for _ in range(4)]
    for job in jobs:
        rounds.jobs.put(job)
    assert rounds.take() == (jobs, False)
    rounds.jobs.put(jobs[0])
    assert rounds.take() == ([jobs[0]], False)
    rounds.jobs.put(jobs[0])
    rounds.jobs.put(jobs[1])
    rounds.stop()
    assert rounds.take() == ([jobs[0], jobs[1]], True)
    rounds.stop()
    assert rounds.take() == ([], True)


class Clock:
    """A clock that moves only when told (Rounds' `clock`)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def take_in_thread(rounds) -> tuple[threading.Thread, list]:
    """`rounds.take()` on a thread of its own; its result lands in the list."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(rounds.take()), daemon=True)
    thread.start()
    return thread, result


def test_a_round_stops_gathering_once_every_open_connection_has_sent_a_request():
    """A connection has one request at a time: once the round holds a job per open connection nothing more can
    come, and the round starts without waiting out `--max-wait-ms`; while a connection is still to send, the window
    holds. The clock stands still unless moved: only the open-connection rule can end the first round."""
    from rmtrain.serve import Job, Rounds

    rounds = Rounds(max_wait_s=60.0, open_connections=lambda: 3, clock=Clock())
    jobs = [Job([]) for _ in range(3)]
    rounds.jobs.put(jobs[0])
    rounds.jobs.put(jobs[1])
    thread, result = take_in_thread(rounds)
    rounds.jobs.put(jobs[2])  # the last connection sends a little later
    thread.join(timeout=300)
    assert result == [(jobs, False)]

    clock = Clock()
    rounds = Rounds(max_wait_s=1.0, open_connections=lambda: 5, clock=clock)
    jobs = [Job([]) for _ in range(3)]
    rounds.jobs.put(jobs[0])
    rounds.jobs.put(jobs[1])
    thread, result = take_in_thread(rounds)
    rounds.jobs.put(jobs[2])  # within the window: it joins (3 of 5 connections have sent)
    while rounds.jobs.qsize():
        time.sleep(0.01)
    assert thread.is_alive() and not result  # still gathering: the clock has not left the window
    clock.now = 1.5
    thread.join(timeout=300)
    assert result == [(jobs, False)]


def test_a_round_waits_for_the_requests_that_arrived_in_its_window_while_they_are_parsed():
    """A request that reaches the server within the window joins the round even when its parsing ends after the
    window (up to as long again); one that arrives after the window, or whose parsing fails, does not hold it.
    The window starts when the worker takes the round's first job (here: at once, it is queued)."""
    from rmtrain.serve import Job, Rounds

    def parsed(rounds: Rounds, arrived: threading.Event, finish: threading.Event, fails: bool = False) -> None:
        with rounds.arriving():
            arrived.set()
            finish.wait(300)
            if not fails:
                rounds.submit([])

    for arrives, fails in ((0.2, False), (1.2, False), (0.2, True)):
        clock = Clock()
        rounds = Rounds(max_wait_s=1.0, clock=clock)
        rounds.jobs.put(first := Job([]))
        thread, result = take_in_thread(rounds)  # the window: 0 to 1.0
        clock.now = arrives
        arrived, finish = threading.Event(), threading.Event()
        threading.Thread(target=parsed, args=(rounds, arrived, finish, fails), daemon=True).start()
        assert arrived.wait(300)
        clock.now = max(clock.now, 1.1)  # the window is over while the request is parsed
        if arrives < 1.0:  # arrived within the window: the round waits for its parsing to end
            assert thread.is_alive() and not result
            finish.set()
            thread.join(timeout=300)
        else:  # arrived after it: the round goes without it, while it is still being parsed
            thread.join(timeout=300)
            finish.set()
        joined = arrives < 1.0 and not fails
        assert len(result[0][0]) == 1 + joined and result[0][0][0] is first, (arrives, fails, result)

    # Waited for at most as long again: past 2.0 the round goes without a request still being parsed.
    clock = Clock()
    rounds = Rounds(max_wait_s=1.0, clock=clock)
    rounds.jobs.put(first := Job([]))
    thread, result = take_in_thread(rounds)
    clock.now = 0.5
    arrived, finish = threading.Event(), threading.Event()
    threading.Thread(target=parsed, args=(rounds, arrived, finish), daemon=True).start()
    assert arrived.wait(300)
    clock.now = 1.5
    assert thread.is_alive() and not result
    clock.now = 2.1
    thread.join(timeout=300)
    assert result == [([first], False)]
    finish.set()


def test_the_server_does_not_wait_out_its_window_once_every_connection_is_in(tiny_qwen3, tmp_path, shared_data):
    """Over HTTP: with an hour's gathering window, two concurrent requests (the only open connections) are answered,
    so the server counts its open connections (were it to wait out the window, the requests would not be answered)."""
    groups = hh_groups(shared_data, 2, 3)
    server = Server(tiny_qwen3, tmp_path, "--max-wait-ms", "3600000")
    answers: list[tuple[int, dict]] = []
    try:
        threads = [threading.Thread(target=lambda g=g: answers.append(server.post("/score", g)), daemon=True) for g in groups]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        status = server.terminate()
    assert [code for code, _ in answers] == [200, 200], answers
    assert status == 0


def test_sigterm_answers_the_requests_in_flight_then_exits_0(tiny_qwen3, tmp_path, shared_data):
    """Requests in flight when SIGTERM lands (the server counts them received; a 5 s gathering window, which an idle
    open connection keeps open, holds them) are all answered with their rewards; then the server exits with status
    0 and refuses new connections."""
    import socket

    groups = hh_groups(shared_data, 6, 4)
    server = Server(tiny_qwen3, tmp_path, "--max-wait-ms", "5000")
    answers: list[tuple[int, dict]] = []
    idle = socket.create_connection(("127.0.0.1", server.port))  # a client that has not sent its request yet
    try:
        threads = [threading.Thread(target=lambda g=g: answers.append(server.post("/score", g))) for g in groups]
        for thread in threads:
            thread.start()
        while server.get("/health")[1]["requests_in_flight"] < len(groups):  # all received, held by the window
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        status = server.process.wait(timeout=60)
    finally:
        idle.close()
        server.kill()
    assert status == 0, server.log.read_text()[-3000:]
    assert sorted(len(body["rewards"]) for code, body in answers if code == 200) == [4] * len(groups), answers
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        server.get("/health")
