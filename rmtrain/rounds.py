"""The reward server's worker: requests gathered into rounds, scored in batches, each caller answered with its own
rewards as soon as they are in.

A request is a job of groups (a prompt's completions; a query is a group of one). A job is cut into parts of at most
`part_sequences` sequences, and a round takes one part of every job that has parts left, oldest first: a request of
5,000 texts is scored over many rounds, and a one-text request that arrives meanwhile joins the next round instead
of waiting behind it. A round starting from idle gathers the requests that arrive within `max_wait_s` (waited for
while they are parsed), or fewer once every open connection has sent one (a connection has one request at a time:
nothing more can come). Each round's sequences are scored by rmtrain.inference's batches and loop; a batch out of
memory fails the jobs it holds (a 503), and the worker goes on.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from rmtrain.aggregate import Reading, read
from rmtrain.groups import Group
from rmtrain.inference import Inference, batches, score_batches


class Overloaded(RuntimeError):
    """Out of memory on a batch a request was in: answered 503."""


class ScoringFailed(RuntimeError):
    """Anything else that went wrong while scoring a request's round: answered 500; the worker goes on."""


class Job:
    """A request's groups, taken in parts, and its rewards as they come in (`future`: a Reading per group)."""

    def __init__(self, groups: list[Group], part_sequences: int | None = None):
        self.groups, self.future = groups, Future()
        self.rewards: list[Reading | None] = [None] * len(groups)
        self.failed = False
        self.parts: list[list[int]] = [[]]  # group indices of each part, at least one group a part
        filled = 0
        for i, g in enumerate(groups):
            if self.parts[-1] and part_sequences and filled + len(g.completions) > part_sequences:
                self.parts.append([])
                filled = 0
            self.parts[-1].append(i)
            filled += len(g.completions)
        self.taken = 0
        self.scored = 0

    def next_part(self) -> "Part":
        self.taken += 1
        return Part(self, self.parts[self.taken - 1])

    @property
    def fully_taken(self) -> bool:
        return self.taken == len(self.parts)

    def record(self, part: "Part", rewards: list[Reading] | None) -> None:
        """A part's rewards (None: its batch ran out of memory); the job is answered once every part is in."""
        if rewards is None:
            self.failed = True
        else:
            for i, values in zip(part.indices, rewards):
                self.rewards[i] = values
        self.scored += 1
        if self.scored < len(self.parts):
            return
        if self.failed:
            answer(self, exception=Overloaded("out of memory on a batch this request was in; retry, or send smaller requests"))
        else:
            answer(self, result=self.rewards)


class Part:
    def __init__(self, job: Job, indices: list[int]):
        self.job, self.indices = job, indices
        self.groups = [job.groups[i] for i in indices]


def answer(job: Job, result: Any = None, exception: BaseException | None = None) -> None:
    """Settle a job's future, unless it is settled already (its caller gave up: a cancelled request)."""
    if job.future.done():
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)


class Rounds:
    """The jobs waiting for the worker and which parts make its next round (see the module's docstring). `clock` is
    injectable: the tests move time by hand."""

    POLL_S = 0.05
    """How often a gathering round looks at the clock while no job comes."""

    def __init__(self, max_wait_s: float, open_connections: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic, part_sequences: int | None = None):
        self.max_wait_s, self.open_connections, self.clock = max_wait_s, open_connections, clock
        self.part_sequences = part_sequences
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.active: list[Job] = []  # jobs with parts not yet taken (the worker's thread alone touches it)
        self.stopping = False
        self.arrivals: dict[int, float] = {}  # requests received and not yet submitted (being read or parsed): when
        self.arrivals_lock, self.arrival_keys = threading.Lock(), itertools.count()

    def submit(self, groups: list[Group]) -> Future:
        job = Job(groups, self.part_sequences)
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
        """The worker ends once the jobs submitted so far are scored."""
        self.jobs.put(None)

    def take(self) -> tuple[list[Part], bool]:
        """The next round's parts (blocking until a job comes), and whether the worker may end after it (the stop
        came and no job has parts left). Jobs already queued join even with no wait at all (`--max-wait-ms 0`)."""
        if not self.active and not self.stopping:
            self._gather()
        else:  # jobs in progress: the round starts now, with whatever else has come
            self._drain()
        parts = [job.next_part() for job in self.active]
        self.active = [job for job in self.active if not job.fully_taken]
        return parts, self.stopping and not self.active

    def _gather(self) -> None:
        first = self.jobs.get()
        if first is None:
            self.stopping = True
            return
        self.active.append(first)
        window_end = self.clock() + self.max_wait_s
        while self.open_connections is None or len(self.active) < self.open_connections():
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
                return
            if job is None:
                self.stopping = True
                return
            self.active.append(job)

    def _drain(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                self.stopping = True
            else:
                self.active.append(job)

    def _arrived_by(self, moment: float) -> bool:
        with self.arrivals_lock:
            return any(received <= moment for received in self.arrivals.values())


class Scorer:
    """The worker that owns the model: it takes `rounds` of parts, scores them in batches (rmtrain.inference: the
    batches and the loop `rmtrain score` uses) and answers each job as soon as its last part is scored."""

    def __init__(self, inference: Inference, max_wait_s: float):
        self.inference = inference
        self.rounds = Rounds(max_wait_s, part_sequences=inference.max_sequences)
        self.stats = {"batches": 0, "sequences": 0, "computed_tokens": 0, "rounds": 0}
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
        done = False
        while not done:
            parts, done = self.rounds.take()
            try:
                if parts:
                    self.score(parts)
            except Exception as error:  # noqa: BLE001 -- the worker must outlive any one round, or every caller waits forever
                for part in parts:
                    answer(part.job, exception=ScoringFailed(f"scoring failed: {type(error).__name__}: {error}"))

    def score(self, parts: list[Part]) -> None:
        """Score the parts' groups in batches; each part is recorded in its job as soon as its last sequence is scored,
        so a caller turns around while the round's other batches run."""
        self.stats["rounds"] += 1
        groups = [g for part in parts for g in part.groups]
        owner = [p for p, part in enumerate(parts) for g in part.groups for _ in g.completions]  # part of each sequence
        sizes = [sum(len(g.completions) for g in part.groups) for part in parts]
        starts, left = [0, *itertools.accumulate(sizes)], list(sizes)  # left: sequences still to score
        loader, total = batches(self.inference, groups)
        rewards = torch.full((total, self.inference.rm.heads), float("nan"))
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
            for p in sorted({owner[k] for k in keys}):
                if left[p] == 0:
                    parts[p].job.record(parts[p], None if p in failed else self._per_group(parts[p], rewards[starts[p] : starts[p] + sizes[p]]))


    def _per_group(self, part: Part, rewards: torch.Tensor) -> list[Reading]:
        """Each group's rewards read out as `rmtrain score` reads them (rmtrain.aggregate): the part read at once, then
        cut into its groups."""
        whole = read(self.inference.aggregate, rewards)
        bounds = [0, *itertools.accumulate(len(g.completions) for g in part.groups)]
        return [Reading(*(None if values is None else values[a:b] for values in whole)) for a, b in zip(bounds, bounds[1:])]
