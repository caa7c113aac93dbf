"""`rmtrain serve` over real HTTP on the loopback interface, bounded in requests and time: rewards of both
endpoints equal `rmtrain score`, concurrent clients all get their own answers, bad requests get a 400 and the
server goes on, SIGTERM ends it with status 0. Tiny Qwen3 (decoder: a group is one shared-prefix row) and
MiniLM (encoder)."""

import json
import math
import os
import random
import re
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



def read_reply(connection) -> str:
    """One whole HTTP reply from a raw socket: the headers and the body may come in separate packets."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = connection.recv(65536)
        if not part:
            return data.decode()
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
    while len(body) < length:
        part = connection.recv(65536)
        if not part:
            break
        body += part
    return (head + b"\r\n\r\n" + body).decode()

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

    def request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
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
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(thread.is_alive() for thread in threads), "clients did not finish in 300 s"
    assert failures == [], failures[:3]
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


def chat(content: object, role: object = "user") -> list:
    return [{"role": role, "content": content}]


# (path, JSON body or None, raw bytes or None, status, what the error says): each a request that once ended in a 500,
# a traceback, or a text scored as something else than what was sent.
BAD_REQUESTS = [
    ("/score", None, b"{not json", 400, "body: not valid JSON"),
    ("/score", None, b'{"prompt": "Q:", "completions": [' + b"9" * 5000 + b"]}", 400, "body: not valid JSON (Exceeds the limit"),
    ("/get_reward", None, b"[" * 5000 + b"]" * 5000, 400, "body: not valid JSON (nested too deeply)"),
    ("/get_reward", None, b'{"query": ["abc \\ud800 def"]}', 400, "'query[0]': not valid Unicode (a lone surrogate"),
    ("/get_reward", None, b"\xff\xfe", 400, "body: not valid JSON"),
    ("/get_reward", [1, 2], None, 400, "body: expected a JSON object, got list"),
    ("/score", {"completions": ["a"]}, None, 400, "body: missing 'prompt' (a string or a list of messages)"),
    ("/score", {"prompt": "Q:", "completions": []}, None, 400, "body: 'completions' must be a non-empty list of completions, got an empty list"),
    ("/score", {"prompt": "Q:", "completions": [" a", 3]}, None, 400, "body: 'completions[1]' must be a string or a message list, got int"),
    ("/score", {"prompt": chat("hi"), "completions": ["text"]}, None, 400,
     "body: mixes plain strings and message lists in prompt/completions; use one shape"),
    ("/score", {"prompt": chat("hi"), "completions": [chat("x", role=["assistant"])]}, None, 400,
     "body: completions[0]: message 0 has unknown role a list"),
    ("/score", {"prompt": chat("hi"), "completions": [chat(7, role="assistant")]}, None, 400,
     "body: completions[0]: message 0 'content' must be a string, got int"),
    ("/score", {"prompt": chat("hi"), "completions": [chat(None, role="assistant")]}, None, 400, "'content' must be a string, got null"),
    ("/score", {"prompt": chat("hi"), "completions": [chat([{"type": "text", "text": "x"}], role="assistant")]}, None, 400,
     "'content' must be a string, got list"),
    ("/score", {"groups": []}, None, 400, "groups: expected a non-empty list"),
    ("/score", {"groups": [{"prompt": "Q:", "completions": [" a"]}, {"prompt": 5, "completions": [" a"]}]}, None, 400,
     "groups[1]: 'prompt' must be a string or a message list, got int"),
    ("/get_reward", {"query": "one text"}, None, 400, "query: expected a non-empty list of strings"),
    ("/get_reward", {"query": ["fine", ""]}, None, 400, "body: 'query[1]' is empty; fill it in or remove it"),
    ("/classify", {"input": [[1, 2, 3]]}, None, 400, "input[0]: expected a string, got token ids (send text)"),
    ("/classify", {"input": "x", "use_activation": "no"}, None, 400, "use_activation: expected true or false, got 'no'"),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 0}, None, 400, "truncate_prompt_tokens: expected a whole number >= 1, or -1"),
    ("/v1/embeddings", {"model": "m"}, None, 400, "input: expected a string or a non-empty list of strings, got missing"),
    ("/v1/score/evaluation", {"model": "model", "messages": []}, None, 400, "messages: expected a non-empty list of strings"),
    ("/v1/score/evaluation", {"model": "model", "messages": ["x"], "max_length": -3}, None, 400, "max_length: expected a whole number >= 1"),
    ("/get_reward", {"query": [f"text {i}" for i in range(21)]}, None, 413, "body: 21 texts, more than this server takes in one request (20"),
    ("/get_reward", {"query": ["x" * 70_000]}, None, 413, "bytes, more than this server reads (52,428, --max-body-mb)"),
]


@pytest.fixture(scope="module")
def door(tiny_qwen3, tmp_path_factory):
    """A server with small limits: 64 tokens, 0.05 MB a body, 20 texts a request, 2 s to send a request."""
    server = Server(tiny_qwen3, tmp_path_factory.mktemp("door"), "--max-length", "64", "--max-body-mb", "0.05",
                    "--max-texts-per-request", "20", "--read-timeout", "2")
    yield server
    status = server.terminate()
    assert status == 0, server.log.read_text()[-3000:]


def test_every_bad_request_gets_its_status_and_one_error_and_the_server_goes_on(door, tiny_qwen3, tmp_path):
    for path, body, raw, status, message in BAD_REQUESTS:
        got, answer = door.post(path, body, raw)
        assert (got, list(answer)) == (status, ["error"]) and message in answer["error"], (path, body, raw and raw[:60], answer)
    # Unknown routes and methods answer in the same shape.
    assert door.request("GET", "/get_reward") == (405, {"error": "/get_reward: GET is not allowed here"})
    status, answer = door.request("POST", "/v2/rewards", b"{}")
    assert status == 404 and answer["error"].startswith("/v2/rewards: no such route (POST /get_reward, /score, /classify")
    # Still serving; an over-long input is cut from the left, as rmtrain score cuts it, and flagged.
    long_prompt = "Human: " + "why " * 200 + "\n\nAssistant:"
    status, body = door.post("/score", {"prompt": long_prompt, "completions": [" Because.", " No."]})
    assert status == 200 and body["truncated"] == [True, True] and len(body["rewards"]) == 2
    rows, out = tmp_path / "cut.jsonl", tmp_path / "cut.scores.jsonl"
    rows.write_text(json.dumps({"prompt": long_prompt, "completion": " Because."}) + "\n")
    run_score(tiny_qwen3, str(rows), str(out), max_length=64)  # rmtrain score with the same --max-length
    line = json.loads(out.read_text())
    assert line["truncated"] and abs(line["reward"] - body["rewards"][0]) < 1e-4


def test_a_client_that_stalls_is_cut(door):
    """Half a body: a 408 once nothing more arrives for --read-timeout (2 s). Half the headers: the connection is
    closed. Each wait is bounded by the socket's own timeout, not measured."""
    import socket

    with socket.create_connection(("127.0.0.1", door.port), timeout=120) as stalled:
        stalled.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"query\": [")
        reply = read_reply(stalled)
    assert reply.startswith("HTTP/1.1 408") and "--read-timeout" in reply, reply
    with socket.create_connection(("127.0.0.1", door.port), timeout=120) as stalled:
        stalled.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert stalled.recv(65536) == b""  # closed by the server
    assert door.get("/health")[0] == 200


def test_out_of_memory_on_a_batch_is_a_503_for_its_requests_and_the_server_goes_on(tiny_qwen3, shared_data):
    """In process (FastAPI's test client over the real app and worker): a real allocator failure in the first
    forward of a round, which holds only the long request's first chunk. The long request gets its 503; the short
    one, gathered into the same round, is answered with its rewards, also from the batch it shares with the long
    request's last chunk; then a round that fails otherwise is a 500, and every request after is answered."""
    import torch
    from fastapi.testclient import TestClient

    from rmtrain.inference import batches, prepare_inference
    from rmtrain.saved import load_saved
    from rmtrain.rounds import Scorer
    from rmtrain.routes import Tokens
    from rmtrain.serve import create_app

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
        assert status == 503 and "out of memory on a batch this request was in" in body["error"], body
        assert answers["short"][0] == 200 and answers["short"][1]["rewards"] == pytest.approx(expected, abs=1e-5)
        rm.model.forward = forward_that_breaks
        response = client.post("/score", json=short_group)
        assert response.status_code == 500 and "ValueError: something else went wrong" in response.json()["error"]
        rm.model.forward = forward
        response = client.post("/score", json=long_group)
        assert response.status_code == 200 and len(response.json()["rewards"]) == len(long_group["completions"])


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


# --------------------------------------------------------------------------------------------------
# The RL frameworks' clients, as their code sends and reads


def openrlhf_reward(server: Server, query: str, prompt: str) -> dict:
    """OpenRLHF, openrlhf/utils/agent.py (SingleTurnAgentExecutor, `_fetch_rewards_via_http`): one query per request,
    `payload = {"query": ..., "prompts": ..., "labels": ...}`; reads `rewards`, `scores` (else `rewards`), `extra_logs`."""
    status, body = server.post("/get_reward", {"query": [query], "prompts": [prompt], "labels": [""]})
    assert status == 200, body
    return {"reward": body.get("rewards"), "scores": body.get("scores") or body.get("rewards"), "extra_logs": body.get("extra_logs") or {}}


def verl_vllm_reward(server: Server, model_path: str, text: str, old: bool = False) -> float:
    """verl, verl/experimental/reward_loop/reward_loop.py `compute_score_disrm` (vLLM engine): posts
    `{"model": model_name, "input": disrm_prompt, "use_activation": False}` to `/classify` (older verl:
    `"activation": False`) and reads `output["data"][-1]["probs"][-1]`."""
    payload = {"model": model_path, "input": text, "activation" if old else "use_activation": False}
    status, output = server.post("/classify", payload)
    assert status == 200, output
    return output["data"][-1]["probs"][-1]


def verl_sglang_reward(server: Server, model_path: str, text: str) -> float:
    """verl, the same function (SGLang engine): posts `{"model": model_name, "input": disrm_prompt}` to
    `v1/embeddings` and reads `output["data"][-1]["embedding"][-1]`."""
    status, output = server.post("/v1/embeddings", {"model": model_path, "input": text})
    assert status == 200, output
    return output["data"][-1]["embedding"][-1]


def llamafactory_rewards(server: Server, messages: list[str]) -> list[float]:
    """LLaMA-Factory, src/llamafactory/train/ppo/ppo_utils.py `get_rewards_from_server`: `payload = {"model": "model",
    "messages": messages}`, `requests.post(server_url, json=payload, headers=headers)`, then
    `json.loads(response.text)["scores"]` (server_url: the recipe's `reward_model`, here .../v1/score/evaluation)."""
    import requests

    response = requests.post(server.url + "/v1/score/evaluation", json={"model": "model", "messages": messages},
                             headers={"Content-Type": "application/json"}, timeout=120)
    body = json.loads(response.text)
    assert body["object"] == "score.evaluation" and body["id"].startswith("scoreval-") and body["model"] == "model"
    return body["scores"]


def texts_ending_every_way(tokenizer) -> list[str]:
    """Texts as RL workers send them: without the EOS, ending in it (OpenRLHF and LLaMA-Factory decode with
    `skip_special_tokens=False`), ending in it and a newline (a chat template's turn end, verl), holding the pad
    token's text inside (a base policy's end-of-text), and a whole rendered chat."""
    eos, pad = tokenizer.eos_token, tokenizer.pad_token
    turn = "Human: What is the capital of France?\n\nAssistant: Paris, of course."
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello there."}], tokenize=False)
    return [turn, turn + eos, turn + eos + "\n", f"Human: say {pad} back.\n\nAssistant: {pad} is a token." + eos, rendered]


def test_every_rl_framework_gets_the_rewards_rmtrain_score_gives(door, tiny_qwen3, tmp_path):
    """OpenRLHF, verl (vLLM and SGLang paths, old and new field), LLaMA-Factory and the model list, with each client's
    own request and read-out, against `rmtrain score` on `{"text": ...}` (the same max_length, 64)."""
    from transformers import AutoTokenizer

    texts = texts_ending_every_way(AutoTokenizer.from_pretrained(tiny_qwen3))
    data, out = tmp_path / "texts.jsonl", tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run_score(tiny_qwen3, str(data), str(out), max_length=64, in_order=True)
    expected = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    # A text ending in the EOS is the text without it: one EOS either way.
    assert abs(expected[0] - expected[1]) < 1e-6
    for text, want in zip(texts, expected):
        got = openrlhf_reward(door, text, "Human: prompt")
        assert got["reward"] == got["scores"] and abs(got["reward"][0] - want) < 1e-5 and got["extra_logs"] == {}
        assert abs(verl_vllm_reward(door, tiny_qwen3, text) - want) < 1e-5
        assert abs(verl_vllm_reward(door, tiny_qwen3, text, old=True) - want) < 1e-5
        assert abs(verl_sglang_reward(door, tiny_qwen3, text) - want) < 1e-5
    assert max(abs(a - b) for a, b in zip(llamafactory_rewards(door, texts), expected)) < 1e-5
    # vLLM's /classify with its defaults: a list of inputs, activation on (a sigmoid for one label), vLLM's shape.
    status, body = door.post("/v1/classify", {"input": texts[:2]})
    assert status == 200 and body["object"] == "list" and body["id"].startswith("classify-") and body["usage"]["prompt_tokens"] > 0
    assert [d["index"] for d in body["data"]] == [0, 1] and all(d["num_classes"] == 1 and d["label"] == "LABEL_0" for d in body["data"])
    assert max(abs(d["probs"][0] - 1 / (1 + math.exp(-want))) for d, want in zip(body["data"], expected)) < 1e-6
    status, models = door.get("/v1/models")
    assert status == 200 and models["object"] == "list" and models["data"][0]["id"] == tiny_qwen3 and models["data"][0]["max_model_len"] == 64


def test_run_folder_exported_folder_score_and_every_route_agree_on_how_a_text_ends(tiny_qwen3, shared_data, tmp_path):
    """One rule for a text that already ends in the EOS (none added, also by an exported folder's tokenizer, which
    appends the EOS itself) and for the pad token's text inside a text (read as any token): the run folder and its
    export give the same rewards through `rmtrain score` and through every route of `rmtrain serve`."""
    from transformers import AutoTokenizer

    from rmtrain.export import export_model

    exported = tmp_path / "exported"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n" for r in read_jsonl(shared_data / "hh_harmless_test.jsonl", limit=12)))
    export_model(tiny_qwen3, str(exported), merge=False, data_path=str(pairs), check_pairs=4)
    texts = texts_ending_every_way(AutoTokenizer.from_pretrained(tiny_qwen3))
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    rewards = {}
    for name, folder in (("run", tiny_qwen3), ("exported", str(exported))):
        out = tmp_path / f"{name}.scores.jsonl"
        run_score(folder, str(data), str(out), in_order=True)
        rewards[name, "score"] = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
        server = Server(folder, tmp_path)
        try:
            rewards[name, "/get_reward"] = server.post("/get_reward", {"query": texts})[1]["rewards"]
            rewards[name, "/classify"] = [d["probs"][0] for d in server.post("/classify", {"input": texts, "use_activation": False})[1]["data"]]
            rewards[name, "/v1/embeddings"] = [d["embedding"][0] for d in server.post("/v1/embeddings", {"input": texts})[1]["data"]]
            rewards[name, "/v1/score/evaluation"] = server.post("/v1/score/evaluation", {"model": "m", "messages": texts})[1]["scores"]
        finally:
            assert server.terminate() == 0
    reference = rewards["run", "score"]
    assert abs(reference[0] - reference[1]) < 1e-6  # the EOS once, whether the text brought it or not
    for key, values in rewards.items():
        assert max(abs(a - b) for a, b in zip(values, reference)) < 1e-5, key


def test_a_key_is_required_on_every_route_but_health(tiny_qwen3, tmp_path):
    server = Server(tiny_qwen3, tmp_path, "--api-key", "s3cret")
    try:
        assert server.get("/health")[0] == 200
        for method, path, data in (("POST", "/get_reward", b'{"query": ["hi"]}'), ("GET", "/v1/models", None), ("POST", "/classify", b'{"input": "hi"}')):
            status, body = server.request(method, path, data, {"Content-Type": "application/json"})
            assert status == 401 and body == {"error": "Unauthorized: send the server's key as 'Authorization: Bearer KEY'"}
            status, _ = server.request(method, path, data, {"Content-Type": "application/json", "Authorization": "Bearer wrong"})
            assert status == 401
            status, _ = server.request(method, path, data, {"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
            assert status == 200
    finally:
        assert server.terminate() == 0
    assert "key required" in " ".join(server.log.read_text().split())  # the console wraps long lines


def test_sigterm_with_a_client_stalled_in_its_body_answers_it_503_and_exits_0(tiny_qwen3, tmp_path):
    """A body that stopped arriving holds neither the worker nor the stop: SIGTERM answers it 503 at once (its read
    timeout is 10 minutes, the graceful timeout 1 minute) and the process exits 0, no traceback."""
    import socket

    server = Server(tiny_qwen3, tmp_path, "--read-timeout", "600", "--graceful-timeout", "60")
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as stalled:
        stalled.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"query\":")
        while server.get("/health")[1]["requests_in_flight"] < 1:
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        reply = read_reply(stalled)
    status = server.process.wait(timeout=300)
    assert reply.startswith("HTTP/1.1 503") and "shutting down" in reply, reply
    assert status == 0 and "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]


def test_a_host_that_listens_everywhere_must_say_so(tmp_path):
    from rmtrain.errors import UserError
    from rmtrain.log import RunLog
    from rmtrain.serve import api_key_from, check_host

    for host in ("", " ", "*", "[::]"):
        with pytest.raises(UserError, match="to listen on every interface, say so: --host 0.0.0.0"):
            check_host(host, None, RunLog())
    warned = []
    log = RunLog()
    log.warn = warned.append
    check_host("127.0.0.1", None, log)
    check_host("0.0.0.0", "key", log)
    assert warned == []
    check_host("0.0.0.0", None, log)
    assert warned == ["listening on 0.0.0.0 without --api-key: anyone who can reach this address can use the model"]
    os.environ["RMTRAIN_API_KEY"] = "from-env"
    try:
        assert api_key_from(None) == "from-env" and api_key_from("flag") == "flag"
    finally:
        del os.environ["RMTRAIN_API_KEY"]
    assert api_key_from(None) is None
