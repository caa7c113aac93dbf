"""`rmtrain serve`: the reward model behind HTTP for RL workers, with dynamic batching.

Endpoints (FastAPI on uvicorn, the `serve` extra):
- `GET /health`: 200 once the model is loaded.
- `POST /get_reward`, OpenRLHF's shape: `{"query": [text, ...]}` (`prompts`, `labels` accepted and ignored) ->
  `{"rewards": [...], "scores": [...], "extra_logs": {}, "truncated": [...]}`. A query is scored as `rmtrain
  score` scores `{"text": query}`.
- `POST /score`: `{"prompt": text | messages, "completions": [...]}` -> `{"rewards": [...], "truncated": [...]}`,
  or `{"groups": [such objects]}` -> lists of lists. Each completion is scored as `rmtrain score` scores
  `{"prompt", "completion"}`; for decoders a group is one row, prompt + completions, each completion blind to
  the others (the shared prefix of training), so the prompt is computed once per group.

One worker owns the model: in `rmtrain serve` the main thread, which loaded it, while HTTP runs on a thread of
its own (torch's OpenMP threads belong to the thread that first ran a parallel region; another thread's regions
each wake a second team, which slows every small operation). A round is the request the worker takes and those
that arrive within `max_wait_ms` (waited for while they are parsed), or fewer once every open connection has
sent one (a connection has one request at a time: nothing more can come); it is cut into batches of bounded
tokens, longest first (rmtrain.batching's inference batches), and each caller gets its own rewards back once its
last sequence is scored. Bad input is a 400 with `{"error": "<field>: <what was expected>"}`; out of memory on a
batch is a 503 for the requests in it, and the server goes on.
"""


import itertools
import json
import queue
import socket
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from rmtrain.errors import DataError, UserError
from rmtrain.groups import Group, scoring_ids
from rmtrain.inference import Inference, batches, prepare_inference, score_batches
from rmtrain.model import RewardModel
from rmtrain.rows import check_texts, score_group


class BadRequest(ValueError):
    """A request that cannot be scored: answered 400 with this message."""


class Overloaded(RuntimeError):
    """Out of memory on the batch a request was in: answered 503."""


class ScoringFailed(RuntimeError):
    """Anything else that went wrong while scoring a request's round: answered 500; the worker goes on."""


# --------------------------------------------------------------------------------------------------
# Requests -> groups


@dataclass
class Scoring:
    """What a request asks for: groups of sequences to score, and which were cut to max_length."""

    groups: list[Group]
    truncated: list[list[bool]]
    nested: bool = False
    """/score with `groups`: the answer is a list of lists."""


class Tokens:
    """Texts -> token ids exactly as `rmtrain score` makes them (rmtrain.groups.scoring_ids), cut from the left beyond
    `max_length`."""

    def __init__(self, rm: RewardModel, max_length: int):
        self.rm = rm
        self.max_length = max_length

    def groups(self, requests: list[tuple[Any, list[Any], str]]) -> tuple[list[Group], list[list[bool]]]:
        try:
            encoded = scoring_ids(requests, self.rm.tokenizer, self.rm.fmt, self.max_length)
        except DataError as error:
            raise BadRequest(str(error)) from None
        return [Group.of(0, ids, []) for ids, _ in encoded], [cut for _, cut in encoded]


def checked(check, *args):
    """rmtrain.rows' check of a request's part, its DataError a 400."""
    try:
        return check(*args)
    except DataError as error:
        raise BadRequest(str(error)) from None


def parse_score(body: Any, tokens: Tokens) -> Scoring:
    """A /score body: one group `{"prompt", "completions"}`, or `{"groups": [such objects]}`; each checked as
    `rmtrain score` checks a row."""
    if isinstance(body, dict) and "groups" in body:
        groups = body["groups"]
        if not isinstance(groups, list) or not groups:
            raise BadRequest("groups: expected a non-empty list of {prompt, completions} objects")
        requests = [(*checked(score_group, g, f"groups[{i}]"), f"groups[{i}]") for i, g in enumerate(groups)]
        return Scoring(*tokens.groups(requests), nested=True)
    return Scoring(*tokens.groups([(*checked(score_group, body, "body"), "body")]))


def parse_get_reward(body: Any, tokens: Tokens) -> Scoring:
    """An OpenRLHF /get_reward body: each query is one whole text, scored as `rmtrain score` scores {"text": query}."""
    queries = body.get("query") if isinstance(body, dict) else None
    if not isinstance(queries, list) or not queries:
        raise BadRequest("query: expected a non-empty list of strings")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BadRequest(f"query[{i}]: expected a string, got {type(query).__name__}")
        checked(check_texts, None, [(f"query[{i}]", query)], "body")
    return Scoring(*tokens.groups([(None, [query], f"query[{i}]") for i, query in enumerate(queries)]))


# --------------------------------------------------------------------------------------------------
# The worker


@dataclass
class Job:
    groups: list[Group]
    future: Future = field(default_factory=Future)


class Rounds:
    """The jobs waiting for the worker, and which of them make its next round: the first it takes and the jobs of
    the requests that arrive within `max_wait_s` of then (those still being parsed when the window ends are waited
    for, up to `max_wait_s` more), or fewer once there is one job per open connection (`open_connections`, the
    HTTP server's count: a connection has one request at a time, so waiting longer would only leave the model
    idle). `clock` is injectable: the tests move time by hand."""

    POLL_S = 0.05
    """How often a gathering round looks at the clock while no job comes."""

    def __init__(self, max_wait_s: float, open_connections: Callable[[], int] | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_wait_s, self.open_connections, self.clock = max_wait_s, open_connections, clock
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.arrivals: dict[int, float] = {}  # requests received and not yet submitted (being read or parsed): when
        self.arrivals_lock, self.arrival_keys = threading.Lock(), itertools.count()

    def submit(self, groups: list[Group]) -> Future:
        job = Job(groups)
        self.jobs.put(job)
        return job.future

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Held by a request from its arrival until its job is submitted (or it fails)."""
        key = next(self.arrival_keys)
        with self.arrivals_lock:
            self.arrivals[key] = self.clock()
        try:
            yield
        finally:
            with self.arrivals_lock:
                del self.arrivals[key]

    def stop(self) -> None:
        """The worker ends once the jobs submitted so far are taken."""
        self.jobs.put(None)

    def take(self) -> tuple[list[Job], bool]:
        """The next round (blocking until a job comes), and whether the stop came; an empty round once stopped.
        Jobs already queued are taken even with no wait at all (`--max-wait-ms 0` scored one request per batch)."""
        first = self.jobs.get()
        if first is None:
            return [], True
        jobs, window_end = [first], self.clock() + self.max_wait_s
        while self.open_connections is None or len(jobs) < self.open_connections():
            now = self.clock()
            if now < window_end:
                timeout = min(window_end - now, self.POLL_S)
            elif now < window_end + self.max_wait_s and self._arrived_by(window_end):
                timeout = 0.001  # one is being parsed; look again shortly, as its parsing may also fail
            else:
                timeout = 0.0
            try:
                job = self.jobs.get(timeout=timeout) if timeout > 0 else self.jobs.get_nowait()
            except queue.Empty:
                if timeout > 0:
                    continue
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _arrived_by(self, moment: float) -> bool:
        with self.arrivals_lock:
            return any(received <= moment for received in self.arrivals.values())


class Scorer:
    """The worker that owns the model: it takes `rounds` of jobs, scores them in batches (rmtrain.inference: the
    batches and the loop `rmtrain score` uses) and answers each job."""

    def __init__(self, inference: Inference, max_wait_s: float):
        self.inference = inference
        self.rounds = Rounds(max_wait_s)
        self.stats = {"batches": 0, "sequences": 0, "computed_tokens": 0}
        self.thread: threading.Thread | None = None

    def start(self) -> "Scorer":
        """Run the worker on a thread of its own (in process: tests, benchmarks); `serve` runs it on the main thread."""
        self.thread = threading.Thread(target=self.run, name="rmtrain-scorer", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Finish what was submitted, then end the worker (waiting for its thread, if `start` made one)."""
        self.rounds.stop()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def run(self) -> None:
        """Score rounds until `stop`."""
        stopping = False
        while not stopping:
            jobs, stopping = self.rounds.take()
            try:
                if jobs:
                    self.score(jobs)
            except Exception as error:  # noqa: BLE001 -- the worker must outlive any one round, or every caller waits forever
                for job in jobs:
                    answer(job, exception=ScoringFailed(f"scoring failed: {type(error).__name__}: {error}"))

    def score(self, jobs: list[Job]) -> None:
        """Score the jobs' groups in batches, and answer each job as soon as its last sequence is scored: its caller
        turns around while the round's other batches run. A batch out of memory fails the jobs it holds (503)."""
        groups = [g for job in jobs for g in job.groups]
        owner = [j for j, job in enumerate(jobs) for g in job.groups for _ in g.completions]  # job of each sequence
        sizes = [sum(len(g.completions) for g in job.groups) for job in jobs]
        starts, left = [sum(sizes[:j]) for j in range(len(jobs))], list(sizes)  # left: sequences still to score
        loader, total = batches(self.inference, groups)
        rewards = torch.full((total,), float("nan"))
        failed: set[int] = set()
        for scored in score_batches(self.inference, loader):
            keys = scored.keys.tolist()
            if scored.rewards is None:
                failed.update(owner[k] for k in keys)
            else:
                rewards[scored.keys] = scored.rewards
                self.stats["batches"] += 1
                self.stats["sequences"] += len(keys)
                self.stats["computed_tokens"] += scored.tokens
            for k in keys:
                left[owner[k]] -= 1
            for j in sorted({owner[k] for k in keys}):
                if left[j] == 0:
                    self._answer(jobs[j], rewards[starts[j] : starts[j] + sizes[j]], j in failed)

    @staticmethod
    def _answer(job: Job, rewards: torch.Tensor, failed: bool) -> None:
        if failed:
            answer(job, exception=Overloaded("out of memory on the batch this request was in; retry, or send smaller requests"))
            return
        values, out, at = rewards.tolist(), [], 0
        for g in job.groups:
            out.append(values[at : at + len(g.completions)])
            at += len(g.completions)
        answer(job, result=out)


def answer(job: Job, result: Any = None, exception: BaseException | None = None) -> None:
    """Settle a job's future, unless it is settled already (its caller gave up: a cancelled request)."""
    if job.future.done():
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)


# --------------------------------------------------------------------------------------------------
# HTTP


def create_app(scorer: Scorer, tokens: Tokens):
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest(f"body: not valid JSON ({getattr(exc, 'msg', exc)})") from None

    in_flight = {"requests": 0}  # received and not yet answered (the event loop's thread alone counts them)

    async def answer(request: Request, parse, shape) -> JSONResponse:
        in_flight["requests"] += 1
        try:
            with scorer.rounds.arriving():
                scoring = await run_in_threadpool(parse, await read(request), tokens)
                future = scorer.rounds.submit(scoring.groups)
            rewards = await asyncio.wrap_future(future)
        except BadRequest as exc:
            return error(400, str(exc))
        except Overloaded as exc:
            return error(503, str(exc))
        except ScoringFailed as exc:
            return error(500, str(exc))
        finally:
            in_flight["requests"] -= 1
        return JSONResponse(shape(scoring, rewards))

    def reward_shape(scoring: Scoring, rewards: list[list[float]]) -> dict:
        flat = [r[0] for r in rewards]
        return {"rewards": flat, "scores": flat, "extra_logs": {}, "truncated": [c[0] for c in scoring.truncated]}

    def score_shape(scoring: Scoring, rewards: list[list[float]]) -> dict:
        if scoring.nested:
            return {"rewards": rewards, "truncated": scoring.truncated}
        return {"rewards": rewards[0], "truncated": scoring.truncated[0]}

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(scorer.stop)  # after the requests in flight are answered: the worker may end

    app = FastAPI(title="rmtrain serve", lifespan=lifespan)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "layout": scorer.inference.layout.name, "requests_in_flight": in_flight["requests"], **scorer.stats}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        return await answer(request, parse_get_reward, reward_shape)

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        return await answer(request, parse_score, score_shape)

    return app


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart's TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); pick another port") from None


def _announcing_server():
    import uvicorn

    class Server(uvicorn.Server):
        """`announce` is printed once the socket listens, so a launcher waiting for it can connect."""

        announce = ""

        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.started and self.announce:
                print(self.announce, flush=True)

    return Server


def serve(model_path: str, host: str, port: int, max_tokens_per_forward: int | str | None, max_wait_ms: float,
          batch_size: int, max_length: int | None, share_prefix: bool, log) -> None:
    """Load the model, then serve until SIGINT/SIGTERM (which finish what is in flight)."""
    import signal
    from pathlib import Path

    import uvicorn

    from rmtrain.saved import folder_kind, load_saved, load_saved_text, scoring_max_length

    Server = _announcing_server()
    folder_kind(Path(model_path))
    check_port(host, port)
    text = load_saved_text(model_path)
    rm, _ = load_saved(model_path, text=text)
    inference = prepare_inference(rm, max_tokens_per_forward, batch_size, share_prefix)
    scorer = Scorer(inference, max_wait_ms / 1000)
    tokens = Tokens(rm, scoring_max_length(max_length, text.max_length))
    layout = inference.layout
    log.info(
        f"rmtrain serve: {model_path} on {inference.accelerator.device}, {layout.name} layout"
        + (" (segment attention)" if layout.mask_format == "segments" else "")
        + f", at most {inference.max_tokens or 'unbounded'} tokens and {batch_size} sequences per batch, "
        f"requests gathered for up to {max_wait_ms:g} ms, max_length {tokens.max_length}"
    )
    app = create_app(scorer, tokens)
    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30))
    connections = getattr(getattr(server, "server_state", None), "connections", None)  # uvicorn's set of open connections
    if isinstance(connections, set):
        scorer.rounds.open_connections = connections.__len__
    server.announce = f"listening on http://{host}:{port}"

    def run_http() -> None:
        try:
            server.run()  # uvicorn handles no signals off the main thread
        finally:
            scorer.stop()  # also when the server could not start

    # SIGINT/SIGTERM start uvicorn's graceful shutdown (what is in flight is answered), and the process exits 0, as a
    # scheduler expects, rather than uvicorn's re-raised 128 + signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    http = threading.Thread(target=run_http, name="rmtrain-http")
    http.start()
    scorer.run()
    http.join()
    if not server.started:
        raise UserError(f"--host {host} --port {port}: the server did not start (see the message above)")
