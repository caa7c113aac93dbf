"""The reward server's worker (rmtrain.rounds) in this process: which requests make a round (its gathering window,
the open-connection rule, requests still being parsed; an injectable clock and events, no wall-clock assertions), a
large request taken in parts that interleave with small ones, and every caller answered as soon as its own rewards
are in."""

import threading
import time

from rmtrain.rounds import Job, Rounds, Scorer


def job(groups: list | None = None) -> Job:
    return Job(groups or [])


def taken(rounds: Rounds) -> tuple[list[Job], bool]:
    """`rounds.take()` with each part named by its job."""
    parts, done = rounds.take()
    return [part.job for part in parts], done


def as_jobs(results: list) -> list:
    return [([part.job for part in parts], done) for parts, done in results]


def test_a_round_takes_the_requests_already_queued_even_with_no_wait():
    """`--max-wait-ms 0` means "do not wait for more", not "one request per batch": what is queued when a round
    starts joins it; the stop ends the gathering and is reported."""

    rounds = Rounds(max_wait_s=0.0)
    jobs = [job() for _ in range(4)]
    for j in jobs:
        rounds.jobs.put(j)
    assert taken(rounds) == (jobs, False)
    more = [job(), job()]
    rounds.jobs.put(more[0])
    assert taken(rounds) == ([more[0]], False)
    rounds.jobs.put(more[1])
    rounds.stop()
    assert taken(rounds) == ([more[1]], True)
    assert taken(rounds) == ([], True)


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

    rounds = Rounds(max_wait_s=60.0, open_connections=lambda: 3, clock=Clock())
    jobs = [job() for _ in range(3)]
    rounds.jobs.put(jobs[0])
    rounds.jobs.put(jobs[1])
    thread, result = take_in_thread(rounds)
    rounds.jobs.put(jobs[2])  # the last connection sends a little later
    thread.join(timeout=300)
    assert as_jobs(result) == [(jobs, False)]

    clock = Clock()
    rounds = Rounds(max_wait_s=1.0, open_connections=lambda: 5, clock=clock)
    jobs = [job() for _ in range(3)]
    rounds.jobs.put(jobs[0])
    rounds.jobs.put(jobs[1])
    thread, result = take_in_thread(rounds)
    rounds.jobs.put(jobs[2])  # within the window: it joins (3 of 5 connections have sent)
    while rounds.jobs.qsize():
        time.sleep(0.01)
    assert thread.is_alive() and not result  # still gathering: the clock has not left the window
    clock.now = 1.5
    thread.join(timeout=300)
    assert as_jobs(result) == [(jobs, False)]


def test_a_round_waits_for_the_requests_that_arrived_in_its_window_while_they_are_parsed():
    """A request that reaches the server within the window joins the round even when its parsing ends after the
    window (up to as long again); one that arrives after the window, or whose parsing fails, does not hold it.
    The window starts when the worker takes the round's first job (here: at once, it is queued)."""

    def parsed(rounds: Rounds, arrived: threading.Event, finish: threading.Event, fails: bool = False) -> None:
        with rounds.arriving():
            arrived.set()
            finish.wait(300)
            if not fails:
                rounds.submit([])

    for arrives, fails in ((0.2, False), (1.2, False), (0.2, True)):
        clock = Clock()
        rounds = Rounds(max_wait_s=1.0, clock=clock)
        rounds.jobs.put(first := job())
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
        assert len(result[0][0]) == 1 + joined and result[0][0][0].job is first, (arrives, fails, result)

    # Waited for at most as long again: past 2.0 the round goes without a request still being parsed.
    clock = Clock()
    rounds = Rounds(max_wait_s=1.0, clock=clock)
    rounds.jobs.put(first := job())
    thread, result = take_in_thread(rounds)
    clock.now = 0.5
    arrived, finish = threading.Event(), threading.Event()
    threading.Thread(target=parsed, args=(rounds, arrived, finish), daemon=True).start()
    assert arrived.wait(300)
    clock.now = 1.5
    assert thread.is_alive() and not result
    clock.now = 2.1
    thread.join(timeout=300)
    assert as_jobs(result) == [([first], False)]
    finish.set()


def test_a_request_is_answered_as_soon_as_its_own_batches_are_scored(tiny_qwen3):
    """A round cut into several batches (here one group each, longest first) answers each request when its last
    sequence is scored, so its caller turns around while the round's other batches run, with the rewards it gets
    when scored alone."""
    import torch

    from rmtrain.inference import prepare_inference
    from rmtrain.routes import Tokens
    from rmtrain.saved import load_saved

    rm, max_length = load_saved(tiny_qwen3)
    tokens = Tokens(rm, max_length or 1024)
    prompt = "Human: Can you help me?\n\nAssistant:"
    (long_group, short_group), _ = tokens.groups([(prompt, [" Yes, " * 20, " No, " * 20, " Maybe, " * 20], ""),
                                                  (prompt, [" Hello.", " Go away.", " Hi there."], "")])
    scorer = Scorer(prepare_inference(rm, None, 3), max_wait_s=0.0)
    alone = []
    for group in (short_group, long_group):
        job = Job([group])
        scorer.score([job.next_part()])
        alone.append(job.future.result())
    short_job, long_job = Job([short_group]), Job([long_group])
    forward, answered = rm.model.forward, []

    def forward_noting_answers(*args, **kwargs):
        answered.append((long_job.future.done(), short_job.future.done()))
        return forward(*args, **kwargs)

    rm.model.forward = forward_noting_answers
    try:
        scorer.score([short_job.next_part(), long_job.next_part()])
    finally:
        rm.model.forward = forward
        scorer.stop()
    assert answered == [(False, False), (True, False)]
    assert [short_job.future.result(), long_job.future.result()] == alone


def test_a_large_request_is_taken_in_parts_and_a_small_one_that_comes_meanwhile_joins_the_next_round(tiny_qwen3):
    """A request of 40 texts is scored in parts of 4 sequences (the batch size); a one-text request submitted after
    the first round is scored in the second, beside the large one's next part, and answered while the large one is
    still being scored. The large one's rewards are those of its texts scored one by one."""
    from rmtrain.inference import prepare_inference
    from rmtrain.routes import Tokens
    from rmtrain.saved import load_saved

    rm, _ = load_saved(tiny_qwen3)
    tokens = Tokens(rm, 1024)
    scorer = Scorer(prepare_inference(rm, None, 4), max_wait_s=0.0)
    texts = [f"Human: what is {i} + {i}?\n\nAssistant: {2 * i}, I think." for i in range(40)]
    big = scorer.rounds.submit(tokens.groups([(None, [text], "") for text in texts])[0])
    parts, _ = scorer.rounds.take()
    assert [len(part.groups) for part in parts] == [4]
    scorer.score(parts)
    small = scorer.rounds.submit(tokens.groups([(None, ["Human: hi\n\nAssistant: hello"], "")])[0])
    parts, _ = scorer.rounds.take()
    assert [len(part.groups) for part in parts] == [4, 1] and not big.done()
    scorer.score(parts)
    assert small.done() and not big.done()  # answered while the large request waits for its other 8 parts
    rounds = 2
    while not big.done():
        parts, _ = scorer.rounds.take()
        scorer.score(parts)
        rounds += 1
    assert rounds == 10
    alone = []
    for text in texts:
        future = scorer.rounds.submit(tokens.groups([(None, [text], "")])[0])
        scorer.score(scorer.rounds.take()[0])
        alone.append(future.result()[0].reward[0])
    assert max(abs(a.reward[0] - b) for a, b in zip(big.result(), alone)) < 1e-5
