"""The OpenAI-compatible HTTP app: ``create_app`` builds a FastAPI app over one engine.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both streamed as server-sent
events ending in ``data: [DONE]`` with ``"stream": true``), ``GET /v1/models``, ``GET /health``
(200 once the model is loaded and warmed, 503 before) and ``GET /metrics`` (Prometheus).

Each choice of a request is one engine request (engine/server/runner.py): the engine's threads
decode, the event loop only moves chunks to sockets. A client that goes away mid-request (the
stream's generator is cancelled, or a polled ``is_disconnected()`` for a plain response) cancels
its requests: their batch rows are freed at the next step. Admission is bounded: more than
``max_batch + max_queue`` choices in flight answers 429 with ``Retry-After``. With an API key every
path but ``/health`` needs ``Authorization: Bearer KEY``. Bodies are bounded (``max_body_bytes``),
``max_tokens`` by the engine's ``max_length``; no error body carries a stack trace.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import EngineError, InvalidRequestError
from ..generation import Engine
from ..request import GenerationResult, StreamChunk
from .metrics import CONTENT_TYPE_LATEST, ServerMetrics
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    finish_reason,
    from_engine_error,
    from_validation_error,
)
from .runner import EngineRunner, Event, Job, Mailbox

_log = logging.getLogger("engine.server")
_POLL_S = 0.25  # a plain (non-streamed) request checks for a gone client this often
_MASK64 = 2**64 - 1
_INLINE_START = 4096  # prompt characters or ids (times n) below which a request is queued from the loop


@dataclass
class ServerConfig:
    """Server settings (the CLI's ``serve`` flags)."""

    model_name: str = "engine"  # the id /v1/models lists and responses carry
    api_key: str | None = None  # None: no auth
    max_queue: int = 64  # choices waiting beyond the engine's batch rows; more are answered 429
    request_timeout_s: float = 600.0  # a request still running after this is cancelled (504)
    max_body_bytes: int = 1 << 20  # larger request bodies are answered 413


class ServerState:
    """The engine, its runner and metrics of one app; loads the model once, off the event loop."""

    def __init__(self, config: ServerConfig, engine: Engine | None, loader: Callable[[], Engine] | None) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.runner: EngineRunner | None = None
        self.load_error: str | None = None
        self.inflight = 0  # choices admitted and not yet answered (event loop only)
        self._engine = engine
        self._loader = loader
        self._loading = threading.Lock()
        self._started = False
        self._tokens: dict[int, str] = {}  # token id -> its text, for logprobs
        self.metrics.bind(lambda: self.runner.queued if self.runner else 0, self._running)

    def _running(self) -> float:
        if self.runner is None:
            return 0
        return max(0, self.inflight - self.runner.queued)

    def ensure_loading(self) -> None:
        """Start loading (and warming) the model in a thread, once."""
        with self._loading:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._load, name="engine-server-load", daemon=True).start()

    def _load(self) -> None:
        try:
            engine = self._engine if self._engine is not None else self._loader()  # type: ignore[misc]
            warm(engine)
            self.runner = EngineRunner(engine)
        except Exception as e:  # reported by /health and every request; the server stays up
            _log.error("loading the model failed: %s", e)
            self.load_error = f"{type(e).__name__}: {e}"

    @property
    def ready(self) -> bool:
        return self.runner is not None

    def require_ready(self) -> EngineRunner:
        if self.runner is not None:
            return self.runner
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error")
        raise APIError(503, "the model is loading; retry shortly", type="server_error", headers={"Retry-After": "1"})

    def admit(self, choices: int) -> None:
        """Reserve ``choices`` slots or answer 429 (the waiting queue is full)."""
        runner = self.require_ready()
        capacity = runner.max_batch + self.config.max_queue
        if choices > capacity:
            raise APIError(400, f"this request asks for {choices} choices; allowed: at most {capacity}", param="n")
        if self.inflight + choices > capacity:
            raise APIError(
                429,
                f"the server is at capacity ({runner.max_batch} running + {self.config.max_queue} queued); retry later",
                type="rate_limit_exceeded",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.inflight += choices

    def token_text(self, token_id: int) -> str:
        """A token's own text (for logprobs); ``token_id:N`` for a model without a tokenizer."""
        text = self._tokens.get(token_id)
        if text is None:
            tok = self.runner.engine.tokenizer if self.runner else None
            text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else f"token_id:{token_id}"
            self._tokens[token_id] = text
        return text

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


def warm(engine: Engine) -> None:
    """One tiny batched request (the Engine warmed its single path at load), so the first client
    does not pay ORT's first-run costs of the batched shapes."""
    if engine.auto_batch and engine.max_length >= 3:
        engine.generate([[0, 0], [0, 0]], 1)


# ------------------------------------------------------------------------------------------------
# middleware: auth and body size, before any route (404s included)


class _Guard:
    """Pure ASGI middleware (it does not wrap streaming responses): Bearer auth on every path but
    /health, and the declared body size."""

    def __init__(self, app: ASGIApp, config: ServerConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error: APIError | None = None
        key = self.config.api_key
        if key is not None and scope.get("path") != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                error = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if error is None and length is not None:
            if not length.isdigit():
                error = APIError(400, "Content-Length is not a number")
            elif int(length) > self.config.max_body_bytes:
                error = _too_large(self.config.max_body_bytes)
        if error is not None:
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes")


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
    try:
        body = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _parse(model: type[Any], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


# ------------------------------------------------------------------------------------------------
# the app


def create_app(
    engine: Engine | None = None,
    *,
    loader: Callable[[], Engine] | None = None,
    config: ServerConfig | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``engine`` (or over the engine ``loader()`` returns, loaded in
    a thread at startup: /health answers 503 until it is ready). Use ``auto_batch=True`` engines
    for continuous batching; a plain engine serves one request at a time."""
    if (engine is None) == (loader is None):
        raise ValueError("create_app takes an engine or a loader, not both or neither")
    cfg = config or ServerConfig()
    state = ServerState(cfg, engine, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.ensure_loading()
        yield
        state.close()

    app = FastAPI(title="engine", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_middleware(_Guard, config=cfg)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        _count(state, request, e.status)
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        _log.exception("unexpected error on %s", request.url.path)
        _count(state, request, 500)
        return _error_response(APIError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health() -> Response:
        state.ensure_loading()
        if state.ready:
            return JSONResponse({"status": "ok"})
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        runner = state.require_ready()
        card = {
            "id": cfg.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "engine",
            "max_model_len": runner.engine.max_length,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def accept(request: Request, model: type[Any]) -> Any:
        """The body of a completion request, bounded, parsed and checked (the model starts loading
        if it has not)."""
        state.ensure_loading()
        req = _parse(model, await _read_json(request, cfg.max_body_bytes))
        req.check_stream_options()
        return req

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req: ChatCompletionRequest = await accept(request, ChatCompletionRequest)
        runner = state.require_ready()
        sampling = req.sampling()
        lp = req.logprobs_n()
        if lp is not None:
            sampling["logprobs"] = lp
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        loop = asyncio.get_running_loop()
        try:
            ids = await loop.run_in_executor(None, runner.engine.render_chat, messages)
        except EngineError as e:
            raise from_engine_error(e) from None
        return await _complete(state, request, "chat", [ids], req, req.max_new_tokens(), sampling, t0)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req: CompletionRequest = await accept(request, CompletionRequest)
        req.check()
        state.require_ready()
        sampling = req.sampling()
        if req.logprobs is not None:
            sampling["logprobs"] = req.logprobs
        return await _complete(state, request, "completion", req.prompts(), req, req.max_tokens, sampling, t0)

    return app


def _count(state: ServerState, request: Request, status: int) -> None:
    path = request.url.path
    endpoint = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models") else "other"
    state.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


# ------------------------------------------------------------------------------------------------
# running a request


async def _complete(
    state: ServerState,
    request: Request,
    kind: str,
    prompts: Sequence[str | list[int]],
    req: ChatCompletionRequest | CompletionRequest,
    max_new_tokens: int | None,
    sampling: dict[str, Any],
    t0: float,
) -> Response:
    runner = state.require_ready()
    n = req.n
    count = len(prompts) * n
    state.admit(count)
    loop = asyncio.get_running_loop()
    events = Mailbox(loop)
    jobs = [Job(i, events) for i in range(count)]
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            state.inflight -= count
            for job in jobs:
                if not job.done:
                    job.cancel()

    def start_all() -> None:
        for i, job in enumerate(jobs):
            kw = dict(sampling)
            if "seed" in kw and i % n:  # choice j of a prompt: seed + j, so that n > 1 gives n samples
                kw["seed"] = (kw["seed"] + i % n) & _MASK64 if isinstance(kw["seed"], int) else kw["seed"]
            runner.start(job, prompts[i // n], max_new_tokens, req.stop, kw, stream=req.stream)

    try:
        if sum(len(p) for p in prompts) * n <= _INLINE_START:
            start_all()  # short prompts: checking and queueing them costs less than a thread hop
        else:
            await loop.run_in_executor(None, start_all)  # tokenizing long text must not stall the loop
    except EngineError as e:
        release()
        raise from_engine_error(e) from None
    except BaseException:
        release()
        raise
    call = _Call(state, request, kind, req, jobs, events, t0, len(prompts))
    if req.stream:
        _count(state, request, 200)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _EventStream(call.sse(release), release, headers=headers)
    try:
        body = await call.collect()
    finally:
        release()
    if body is None:  # the client went away: nobody reads an answer
        _count(state, request, 499)
        return Response(status_code=499)
    _count(state, request, 200)
    return JSONResponse(body)


class _EventStream(StreamingResponse):
    """A server-sent-events response that releases its request's slots and cancels its choices
    however it ends, also when the client left before the first event (the body's generator,
    never started, would not run its ``finally``)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Call:
    """One HTTP request's choices in flight: collects them into a body, or streams them."""

    def __init__(
        self,
        state: ServerState,
        request: Request,
        kind: str,
        req: ChatCompletionRequest | CompletionRequest,
        jobs: list[Job],
        events: Mailbox,
        t0: float,
        prompts: int,
    ) -> None:
        self.state, self.request, self.kind, self.req = state, request, kind, req
        self.jobs, self.events, self.t0 = jobs, events, t0
        self.n = req.n
        self.prompts = prompts
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = state.config.model_name
        self.deadline = t0 + state.config.request_timeout_s
        self.results: list[GenerationResult | None] = [None] * len(jobs)
        self.last_t: list[float | None] = [None] * len(jobs)  # when each choice's last chunk came

    async def _next(self, poll: bool) -> list[Event] | None:
        """The events there now, or the next; None when the request timed out (or, ``poll``,
        its client left)."""
        while True:
            left = self.deadline - time.perf_counter()
            if left <= 0:
                return None
            events = await self.events.get(min(left, _POLL_S) if poll else left)
            if events:
                return events
            if poll and await self.request.is_disconnected():
                return None

    def _final(self, ev: Event) -> None:
        """A choice ended: record its result (or raise its error)."""
        job = self.jobs[ev.index]
        job.done = True
        if ev.error is not None:
            if isinstance(ev.error, InvalidRequestError):
                raise from_engine_error(ev.error)
            _log.error("a request failed in the engine: %r", ev.error)
            raise APIError(500, "the engine failed on this request", type="server_error")
        res = ev.result
        assert res is not None
        self.results[ev.index] = res
        m = self.state.metrics
        m.generation_tokens.inc(len(res.token_ids))
        if ev.index % self.n == 0:
            m.prompt_tokens.inc(res.stats.prompt_tokens)
        if not self.req.stream:
            m.ttft.observe(res.stats.ttft_s)
            if res.stats.new_tokens > 1:
                m.itl.observe(res.stats.decode_s / (res.stats.new_tokens - 1))

    def _timeout(self) -> APIError:
        return APIError(
            504,
            f"the request did not finish within {self.state.config.request_timeout_s:g} s",
            type="timeout",
            code="timeout",
        )

    # -- plain responses --------------------------------------------------------------------------

    async def collect(self) -> dict[str, Any] | None:
        """Wait for every choice; the response body (None when the client left)."""
        pending = len(self.jobs)
        while pending:
            events = await self._next(poll=True)
            if events is None:
                if time.perf_counter() >= self.deadline:
                    raise self._timeout()
                return None
            for ev in events:
                if ev.final:
                    self._final(ev)
                    pending -= 1
        choices = []
        for i, res in enumerate(self.results):
            assert res is not None
            choice: dict[str, Any] = {"index": i, "finish_reason": finish_reason(res.finish_reason)}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": res.text}
                choice["logprobs"] = self._chat_logprobs(res.token_ids, res.logprobs, res.top_logprobs)
            else:
                choice["text"] = res.text
                choice["logprobs"] = self._completion_logprobs(res.token_ids, res.logprobs, res.top_logprobs)
            choices.append(choice)
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(),
        }

    def _usage(self) -> dict[str, int]:
        prompt = sum(r.stats.prompt_tokens for i, r in enumerate(self.results) if r is not None and i % self.n == 0)
        completion = sum(len(r.token_ids) for r in self.results if r is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chat_logprobs(
        self, ids: Sequence[int], lps: Sequence[float] | None, tops: Sequence[dict[int, float]] | None
    ) -> dict[str, Any] | None:
        if lps is None:
            return None
        text = self.state.token_text
        content = []
        for k, (tok, lp) in enumerate(zip(ids, lps, strict=False)):
            s = text(tok)
            alts = tops[k] if tops is not None and k < len(tops) else {}
            content.append(
                {
                    "token": s,
                    "logprob": lp,
                    "bytes": list(s.encode("utf-8")),
                    "top_logprobs": [
                        {"token": text(t), "logprob": v, "bytes": list(text(t).encode("utf-8"))}
                        for t, v in alts.items()
                    ],
                }
            )
        return {"content": content}

    def _completion_logprobs(
        self,
        ids: Sequence[int],
        lps: Sequence[float] | None,
        tops: Sequence[dict[int, float]] | None,
        offset: int = 0,
    ) -> dict[str, Any] | None:
        if lps is None:
            return None
        text = self.state.token_text
        tokens = [text(t) for t in ids]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        top = [{text(t): v for t, v in alts.items()} for alts in tops] if tops is not None else None
        return {"tokens": tokens, "token_logprobs": list(lps), "top_logprobs": top, "text_offset": offsets}

    # -- streams ----------------------------------------------------------------------------------

    def _frame(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.req.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, separators=(',', ':'), ensure_ascii=False)}\n\n"

    def _stream_choice(self, index: int, chunk: StreamChunk) -> dict[str, Any]:
        lp = None
        if chunk.logprob is not None:
            args = ([chunk.token_id], [chunk.logprob], [chunk.top_logprobs or {}])
            lp = self._chat_logprobs(*args) if self.kind == "chat" else self._completion_logprobs(*args)
        choice: dict[str, Any] = {"index": index}
        if self.kind == "chat":
            choice["delta"] = {"content": chunk.text}
        else:
            choice["text"] = chunk.text
        choice["logprobs"] = lp
        choice["finish_reason"] = finish_reason(chunk.finish_reason) if chunk.finish_reason else None
        return choice

    async def sse(self, release: Callable[[], None]) -> AsyncIterator[str]:
        """The server-sent events: a chunk per token (the chunks that piled up go in one write),
        the usage chunk when asked for, then ``data: [DONE]``. Closed early (the client left):
        the choices still running are cancelled."""
        m = self.state.metrics
        try:
            if self.kind == "chat":
                role = {"role": "assistant", "content": ""}
                yield "".join(
                    self._frame([{"index": i, "delta": role, "logprobs": None, "finish_reason": None}])
                    for i in range(len(self.jobs))
                )
            pending = len(self.jobs)
            while pending:
                batch = await self._next(poll=False)
                if batch is None:
                    err = self._timeout()
                    release()
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                out = []  # what has piled up goes out in one write
                for e in batch:
                    if e.final:
                        try:
                            self._final(e)
                        except APIError as api:
                            release()
                            yield "".join(out) + f"data: {json.dumps(api.body())}\n\ndata: [DONE]\n\n"
                            return
                        pending -= 1
                        continue
                    chunk = e.chunk
                    assert chunk is not None
                    prev = self.last_t[e.index]
                    if prev is None:
                        m.ttft.observe(e.t - self.t0)
                    else:
                        m.itl.observe(e.t - prev)
                    self.last_t[e.index] = e.t
                    if chunk.text or chunk.finish_reason is not None or chunk.logprob is not None:
                        # (an empty piece: text held back for a stop string or an unfinished character)
                        out.append(self._frame([self._stream_choice(e.index, chunk)]))
                if out:
                    yield "".join(out)
            else:
                if self.req.include_usage:
                    yield self._frame([], self._usage())
            yield "data: [DONE]\n\n"
        finally:
            release()
