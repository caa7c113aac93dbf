"""`rmtrain serve`: the reward model behind HTTP for RL workers (FastAPI on uvicorn, the `serve` extra). What each
client sends and gets back is rmtrain.routes; the worker that scores requests in rounds is rmtrain.rounds.

The server is a door. A body that is not JSON, or holds what a route cannot score, is a 400 naming the field; a body
larger than `--max-body-mb` (refused from its Content-Length before it is read, or once it grows past it) or a request
of more texts than `--max-texts-per-request` is a 413; a client that stalls while sending its headers is cut, and one
that stalls while sending its body gets a 408, after `--read-timeout` seconds. With `--api-key` (or RMTRAIN_API_KEY)
every route but `/health` needs `Authorization: Bearer KEY` (401 otherwise). Unknown routes and methods are 404 and
405; out of memory on a batch is a 503 for the requests in it; every error is `{"error": "..."}`. SIGINT/SIGTERM end
the server gracefully: what is in flight is answered (a body still being sent gets a 503), and the process exits 0.

One worker owns the model: in `rmtrain serve` the main thread, which loaded it, while HTTP runs on a thread of its
own (torch's OpenMP threads belong to the thread that first ran a parallel region; another thread's regions each
wake a second team, which slows every small operation).
"""

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from rmtrain.aggregate import Aggregate
from rmtrain.errors import UserError
from rmtrain.rounds import Overloaded, Scorer, ScoringFailed
from rmtrain.routes import (
    BadRequest,
    TooLarge,
    Tokens,
    classify_answer,
    embeddings_answer,
    models_answer,
    parse_classify,
    parse_embeddings,
    parse_get_reward,
    parse_score,
    parse_score_evaluation,
    reward_answer,
    score_answer,
    score_evaluation_answer,
)

ROUTES = {  # POST path: (parse the body, shape the answer)
    "/get_reward": (parse_get_reward, reward_answer),
    "/score": (parse_score, score_answer),
    "/classify": (parse_classify, classify_answer),
    "/v1/classify": (parse_classify, classify_answer),
    "/v1/embeddings": (parse_embeddings, embeddings_answer),
    "/v1/score/evaluation": (parse_score_evaluation, score_evaluation_answer),
}


@dataclass
class Door:
    """What the server lets in."""

    max_body_bytes: int = 32 << 20
    read_timeout_s: float = 30.0
    """A client stalled this long while sending its headers or its body is cut."""
    api_key: str | None = None


class Stalled(Exception):
    """A body that stopped arriving: answered 408."""


class ShuttingDown(Exception):
    """A body still arriving when the server began to stop: answered 503."""


async def read_body(request, door: Door) -> Any:
    """The request's body as JSON, read chunk by chunk: at most `door.max_body_bytes` (413), each chunk within
    `door.read_timeout_s` (408), given up when the server begins to stop (503)."""
    import asyncio

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > door.max_body_bytes:
        raise TooLarge(f"body: {int(length):,} bytes, more than this server reads ({door.max_body_bytes:,}, --max-body-mb)")
    chunks, size, stream = [], 0, request.stream().__aiter__()
    stopping = asyncio.ensure_future(request.app.state.stopping.wait())
    try:
        while True:
            chunk = asyncio.ensure_future(stream.__anext__())
            done, _ = await asyncio.wait({chunk, stopping}, timeout=door.read_timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if chunk not in done:
                chunk.cancel()
                raise ShuttingDown() if stopping in done else Stalled()
            try:
                data = chunk.result()
            except StopAsyncIteration:
                break
            size += len(data)
            if size > door.max_body_bytes:
                raise TooLarge(f"body: more than this server reads ({door.max_body_bytes:,} bytes, --max-body-mb)")
            chunks.append(data)
    finally:
        stopping.cancel()
    return parse_json(b"".join(chunks))


def error_response(status: int, message: str):
    """Every refusal in one shape: {"error": message}."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def create_app(scorer: Scorer, tokens: Tokens, door: Door | None = None, model_name: str = "rmtrain", root: str = ""):
    """The ASGI app: the routes of rmtrain.routes behind the door. `app.state.stopping` (an asyncio.Event, set from the
    event loop) makes bodies still arriving give up."""
    import asyncio
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    door = door or Door()
    created = int(time.time())
    in_flight = {"requests": 0}  # received and not yet answered (the event loop's thread alone counts them)

    @asynccontextmanager
    async def lifespan(app):
        app.state.stopping = asyncio.Event()
        yield
        await run_in_threadpool(scorer.stop)  # after the requests in flight are answered: the worker may end

    app = FastAPI(title="rmtrain serve", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"{request.url.path}: no such route (POST {', '.join(ROUTES)}; GET /health, /v1/models)"
        elif exc.status_code == 405:
            message = f"{request.url.path}: {request.method} is not allowed here"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message)

    @app.middleware("http")
    async def key(request: Request, call_next):
        if door.api_key and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or given != door.api_key:
                return error_response(401, "Unauthorized: send the server's key as 'Authorization: Bearer KEY'")
        return await call_next(request)

    async def answer(request: Request, parse, shape) -> JSONResponse:
        in_flight["requests"] += 1
        try:
            with scorer.rounds.arriving():
                body = await read_body(request, door)
                scoring = await run_in_threadpool(parse, body, tokens)
                future = scorer.rounds.submit(scoring.groups)
            rewards = await asyncio.wrap_future(future)
        except BadRequest as exc:
            return error_response(400, str(exc))
        except Stalled:
            return error_response(408, f"body: nothing arrived for {door.read_timeout_s:g} s (--read-timeout)")
        except TooLarge as exc:
            return error_response(413, str(exc))
        except ShuttingDown:
            return error_response(503, "the server is shutting down")
        except Overloaded as exc:
            return error_response(503, str(exc))
        except ScoringFailed as exc:
            return error_response(500, str(exc))
        finally:
            in_flight["requests"] -= 1
        return JSONResponse(shape(scoring, rewards, model_name))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "layout": scorer.inference.layout.name, "requests_in_flight": in_flight["requests"], **scorer.stats}

    @app.get("/v1/models")
    def models() -> dict:
        return models_answer(model_name, root, tokens.max_length, created)

    def endpoint(parse, shape):
        async def handle(request: Request) -> JSONResponse:
            return await answer(request, parse, shape)

        return handle

    for path, (parse, shape) in ROUTES.items():
        app.add_api_route(path, endpoint(parse, shape), methods=["POST"])
    return app


def parse_json(raw: bytes) -> Any:
    """The body as JSON; whatever Python's parser refuses (a number too long, nesting too deep, bytes that are not
    UTF-8) is a 400."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("body: not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError; so are over-long integers
        raise BadRequest(f"body: not valid JSON ({getattr(exc, 'msg', None) or exc})") from None


# --------------------------------------------------------------------------------------------------
# Listening


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def check_host(host: str, api_key: str | None, log) -> None:
    """`--host ""` or `*` would listen everywhere without saying so: refused unless spelled 0.0.0.0 (or ::). Beyond the
    loopback without a key, one warning line."""
    if not host.strip() or host.strip() in ("*", "[::]"):
        raise UserError(f"--host {host!r}: to listen on every interface, say so: --host 0.0.0.0 (and set --api-key)")
    if host not in LOOPBACK and not api_key:
        log.warn(f"listening on {host} without --api-key: anyone who can reach this address can use the model")


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart's TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(f"--host {host} --port {port}: cannot listen there ({error.strerror}); pick another port") from None


def timed_protocol(read_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that starts no request within `read_timeout_s` of opening or of
    its last answer (a client stalled in its headers would otherwise hold the connection, and a graceful stop, forever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            cycle = self.cycle
            self.loop.call_later(read_timeout_s, lambda: self._close_if_idle(cycle))

        def _close_if_idle(self, cycle) -> None:
            if self.cycle is cycle and (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _server_class():
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
          batch_size: int, max_length: int | None, share_prefix: bool, log, door: Door | None = None,
          max_texts: int | None = None, graceful_timeout_s: float = 30.0, model_name: str | None = None,
          aggregate: Aggregate = Aggregate()) -> None:
    """Load the model, then serve until SIGINT/SIGTERM (which finish what is in flight)."""
    import asyncio
    import signal
    from pathlib import Path

    import uvicorn

    from rmtrain.inference import prepare_inference
    from rmtrain.saved import folder_kind, load_saved, load_saved_text, scoring_max_length

    door = door or Door()
    check_host(host, door.api_key, log)
    folder_kind(Path(model_path))
    check_port(host, port)
    text = load_saved_text(model_path)
    rm, _ = load_saved(model_path, text=text)
    inference = prepare_inference(rm, max_tokens_per_forward, batch_size, share_prefix, aggregate)
    scorer = Scorer(inference, max_wait_ms / 1000)
    tokens = Tokens(rm, scoring_max_length(max_length, text.max_length), max_texts)
    layout = inference.layout
    log.info(
        f"rmtrain serve: {model_path} on {inference.accelerator.device}, {layout.name} layout"
        + (" (segment attention)" if layout.mask_format == "segments" else "")
        + f", at most {inference.max_tokens or 'unbounded'} tokens and {batch_size} sequences per batch, "
        f"requests gathered for up to {max_wait_ms:g} ms, max_length {tokens.max_length}"
        + (f", an ensemble of {rm.heads} read by {aggregate}" if rm.heads > 1 else "")
        + (", key required" if door.api_key else "")
    )
    app = create_app(scorer, tokens, door, model_name or model_path, str(Path(model_path).resolve()))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=timed_protocol(door.read_timeout_s),
                            timeout_keep_alive=5, timeout_graceful_shutdown=graceful_timeout_s)
    server = _server_class()(config)
    connections = getattr(getattr(server, "server_state", None), "connections", None)  # uvicorn's set of open connections
    if isinstance(connections, set):
        scorer.rounds.open_connections = connections.__len__
    server.announce = f"listening on http://{'[' + host + ']' if ':' in host else host}:{port}"
    loop: dict[str, Any] = {}

    def run_http() -> None:
        try:
            asyncio.run(serving(server, loop))  # uvicorn handles no signals off the main thread
        finally:
            scorer.stop()  # also when the server could not start

    def stop(signum, frame) -> None:
        # uvicorn's graceful shutdown (what is in flight is answered, then the process exits 0, as a scheduler expects,
        # rather than uvicorn's re-raised 128 + signal); bodies still arriving give up at once.
        server.handle_exit(signum, frame)
        if "loop" in loop:
            loop["loop"].call_soon_threadsafe(app.state.stopping.set)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http = threading.Thread(target=run_http, name="rmtrain-http")
    http.start()
    scorer.run()
    http.join()
    if not server.started:
        raise UserError(f"--host {host} --port {port}: the server did not start (see the message above)")


async def serving(server, loop: dict) -> None:
    import asyncio

    loop["loop"] = asyncio.get_running_loop()
    await server.serve()


def api_key_from(flag: str | None) -> str | None:
    """`--api-key`, else RMTRAIN_API_KEY; an empty key is none."""
    return flag or os.environ.get("RMTRAIN_API_KEY") or None
