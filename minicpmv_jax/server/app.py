"""The OpenAI-compatible HTTP API over a serving engine: :func:`create_app` → a FastAPI application.

Endpoints::

    POST /v1/chat/completions   chat with text, images and videos; SSE streaming with "stream": true
    POST /v1/completions        raw text prompts (no chat template)
    GET  /v1/models             the one served model (also GET /v1/models/{id})
    GET  /health                200 while serving, 503 once shutting down
    GET  /metrics               Prometheus text (minicpmv_jax.server.metrics)

The app only translates: a body is read (at most ``limits.max_body_bytes``), parsed and its media decoded
in a worker thread (:mod:`.protocol`, :mod:`.media`: PIL and the tokenizer are CPU work), its choices
are submitted to the engine, and the engine's pieces are sent back whole or as server-sent events
(:mod:`.responses`). A client that goes away (mid-stream or while waiting) cancels its requests, which
frees their slots at the engine's next step. Errors are OpenAI-shaped JSON (:mod:`.errors`): 400 bad
input, 401 a missing or wrong API key (``/v1/*`` only, when an ``api_key`` is set), 404 an unknown model,
413 a body too large, 429 the engine's queue is full, 503 shutting down, 500 an engine failure — never a
traceback, and the server keeps serving.

The application's lifespan owns the engine's thread: it starts the engine (pass one that is not
started) and, at shutdown, stops it, letting requests in flight finish for at most ``drain_timeout``
seconds. Every engine request that ends is logged on the ``minicpmv_jax.server`` logger, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import Depends, FastAPI
from fastapi import Request as HTTPRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from minicpmv_jax.engine import EngineStopped, Output, QueueFull, Request, RequestHandle
from minicpmv_jax.errors import ArgumentError

from . import protocol
from . import responses as R
from .errors import APIError, bad_request, field_path
from .limits import Limits
from .media import local_media_root
from .metrics import CONTENT_TYPE, Metrics

__all__ = ["create_app"]

log = logging.getLogger("minicpmv_jax.server")

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(engine, processor, model_name: str, *, api_key: str | None = None,
               allowed_local_media: str | None = None, limits: Limits = Limits(), metrics: Metrics | None = None,
               drain_timeout: float = 30.0) -> FastAPI:
    """The HTTP application serving ``engine``.

    Args:
      engine: a :class:`~minicpmv_jax.engine.Engine`, not started (the app's lifespan starts and stops it).
      processor: the model's processor (prompts and images → tokens).
      model_name: the name clients must send as ``model`` (``GET /v1/models`` lists it).
      api_key: when set, ``/v1/*`` requests need ``Authorization: Bearer <api_key>``.
      allowed_local_media: a folder whose files (and only those) ``file://`` URLs may name; None: no
        ``file://`` URLs.
      limits: per-request limits (:class:`~minicpmv_jax.server.limits.Limits`).
      metrics: the metrics to serve; default a new :class:`~minicpmv_jax.server.metrics.Metrics`, made the
        engine's observer when it has none.
      drain_timeout: at shutdown, seconds the requests in flight may take to finish.
    """
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, got {type(limits).__name__}")
    if metrics is None:
        metrics = Metrics()
        if engine.observer is None:
            engine.observer = metrics
    metrics.watch(engine)
    service = _Service(engine, processor, model_name, limits, local_media_root(allowed_local_media), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            service.stopping = True
            drained = await run_in_threadpool(engine.stop, drain_timeout)
            log.info("engine stopped%s", "" if drained else f" (requests still running after {drain_timeout:g} s "
                     "were cancelled)")

    app = FastAPI(title="minicpmv-jax", summary="MiniCPM-V 2.6 behind OpenAI's API", lifespan=lifespan)
    app.add_middleware(_CountRequests, metrics=metrics)
    _add_error_handlers(app)
    authorized = [Depends(_authorization(api_key))]

    app.post("/v1/chat/completions", dependencies=authorized)(service.chat_completions)
    app.post("/v1/completions", dependencies=authorized)(service.completions)
    app.get("/v1/models", dependencies=authorized)(service.models)
    app.get("/v1/models/{model:path}", dependencies=authorized)(service.model)

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.stopping:
            return JSONResponse({"status": "stopping"}, status_code=503)
        stats = engine.stats()
        return JSONResponse({"status": "ok", "queued": stats.queued, "running": stats.running})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


class _Service:
    """The endpoints' state and handlers."""

    def __init__(self, engine, processor, model_name: str, limits: Limits, local_root: str | None,
                 metrics: Metrics) -> None:
        self.engine = engine
        self.processor = processor
        self.model_name = model_name
        self.limits = limits
        self.local_root = local_root
        self.metrics = metrics
        self.created = int(time.time())
        self.stopping = False

    # ------------------------------------------------------------------ endpoints

    async def chat_completions(self, request: HTTPRequest) -> Response:
        """OpenAI's chat completions (text, ``image_url`` and ``video_url`` parts)."""
        return await self._complete(request, "chatcmpl", protocol.ChatCompletionRequest, lambda body, rid: (
            protocol.chat_requests(body, self.processor, max_len=self.engine.config.max_len, limits=self.limits,
                                   local_root=self.local_root, request_id=rid)))

    async def completions(self, request: HTTPRequest) -> Response:
        """OpenAI's (legacy) completions: text prompts, no chat template."""
        return await self._complete(request, "cmpl", protocol.CompletionRequest, lambda body, rid: (
            protocol.completion_requests(body, self.processor, max_len=self.engine.config.max_len,
                                         request_id=rid)))

    async def _complete(self, request: HTTPRequest, prefix: str, body_type: type,
                        to_requests: Callable[[Any, str], list[Request]]) -> Response:
        """Reads, parses and checks a body in a worker thread (PIL and the tokenizer are CPU work), then
        answers its choices."""
        raw = await self._body(request)
        rid = f"{prefix}-{uuid.uuid4().hex}"

        def prepare() -> tuple[Any, list[Request]]:
            body = protocol.parse(body_type, _json(raw))
            self._check_model(body.model)
            return body, to_requests(body, rid)

        body, requests = await run_in_threadpool(prepare)
        return await self._answer(request, body, requests, rid, chat=body_type is protocol.ChatCompletionRequest)

    async def models(self) -> dict[str, Any]:
        """The served model, as OpenAI lists models."""
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model: str) -> dict[str, Any]:
        self._check_model(model)
        return self._model_card()

    # ------------------------------------------------------------------ steps

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minicpmv-jax"}

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model {model!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    async def _body(self, request: HTTPRequest) -> bytes:
        """The request's body, refused (413) beyond ``limits.max_body_bytes`` before it is all read."""
        if self.stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    def _submit(self, requests: Sequence[Request]) -> list[RequestHandle]:
        """Queues every choice, or none: a full queue is a 429, a stopping engine a 503."""
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for r in requests:
                handles.append(self.engine.submit(r, loop=loop))
        except BaseException as e:
            for h in handles:
                h.cancel()
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), code="queue_full") from None
            if isinstance(e, EngineStopped):
                raise APIError(503, str(e), code="shutting_down") from None
            if isinstance(e, ArgumentError):
                raise protocol.bad_setting(e) from None
            raise
        return handles

    async def _answer(self, request: HTTPRequest, body: protocol.ChatCompletionRequest | protocol.CompletionRequest,
                      requests: list[Request], rid: str, chat: bool) -> Response:
        """Submits the choices; the whole answer, or a stream of events."""
        handles = self._submit(requests)
        use = _Usage(protocol.prompt_tokens(requests, body.n))
        if body.stream:
            return _EventStream(self._events(handles, rid, chat, body.include_usage, use),
                                on_close=lambda: self._ended(handles))
        texts: list[list[str]] = [[] for _ in handles]
        reasons: list[str] = [""] * len(handles)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            async for index, out in _merged(handles, watcher):
                texts[index].append(out.text)
                if out.finish_reason is not None:
                    reasons[index] = out.finish_reason
                    use.add(out)
        except _Disconnected:
            return Response(status_code=499)   # nobody reads it: the client is gone
        finally:
            watcher.cancel()
            self._ended(handles)
        choices = [(i, "".join(t), reasons[i]) for i, t in enumerate(texts)]
        result = (R.chat_completion if chat else R.text_completion)(rid, self.model_name, choices, use.json())
        return JSONResponse(result)

    async def _events(self, handles: list[RequestHandle], rid: str, chat: bool, include_usage: bool,
                      use: "_Usage") -> AsyncIterator[bytes]:
        """The server-sent events of a streamed answer (the response cancels what is left when it ends)."""
        created = int(time.time())
        name = self.model_name
        if chat:
            for i in range(len(handles)):
                yield R.sse(R.chat_chunk(rid, name, created, i, {"role": "assistant", "content": ""},
                                         with_usage=include_usage))
        try:
            async for index, out in _merged(handles):
                if out.text:
                    yield R.sse(R.chat_chunk(rid, name, created, index, {"content": out.text},
                                             with_usage=include_usage) if chat else
                                R.text_chunk(rid, name, created, index, out.text, with_usage=include_usage))
                if out.finish_reason is not None:
                    use.add(out)
                    yield R.sse(R.chat_chunk(rid, name, created, index, {}, out.finish_reason, include_usage)
                                if chat else
                                R.text_chunk(rid, name, created, index, "", out.finish_reason, include_usage))
        except APIError as e:          # the engine failed or stopped mid-answer: say so, then end
            yield R.sse(e.body())
        else:
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield R.sse(R.usage_chunk(obj, rid, name, created, use.json()))
        yield R.SSE_DONE

    def _ended(self, handles: Sequence[RequestHandle]) -> None:
        """Cancels what still runs (a no-op for finished requests); logs and counts each request."""
        now = time.perf_counter()
        for h in handles:
            h.cancel()
            reason = h.finish_reason or "cancelled"
            duration = (h.finished_at or now) - h.submitted
            ttft = "-" if h.first_token_at is None else f"{h.first_token_at - h.submitted:.3f} s"
            self.metrics.request_ended(reason, duration)
            log.info("request %s: prompt %d tokens, completion %d tokens, ttft %s, duration %.3f s, finish %s",
                     h.request_id, h.prompt_tokens, h.completion_tokens, ttft, duration, reason)


class _Usage:
    """Token counts of a response: each prompt once, every choice's tokens."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def add(self, last: Output) -> None:
        self.completion_tokens += last.completion_tokens

    def json(self) -> dict[str, int]:
        return R.usage(self.prompt_tokens, self.completion_tokens)


async def _merged(handles: Sequence[RequestHandle], watcher: asyncio.Future | None = None
                  ) -> AsyncIterator[tuple[int, Output]]:
    """``(choice index, piece)`` of all handles as they come, until each has finished.

    Raises:
      APIError: a request failed in the engine (500) or was cancelled by a shutdown (503).
      _Disconnected: ``watcher`` finished first (the client went away).
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for out in handle:
                queue.put_nowait((index, out))
                if out.finish_reason is not None:
                    return
        except Exception as e:          # the engine's error after an "error" piece
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    getter: asyncio.Future | None = None
    try:
        remaining = len(handles)
        while remaining:
            if watcher is None:
                index, out = await queue.get()
            else:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    raise _Disconnected()
                index, out = getter.result()
            if isinstance(out, Exception) or out.finish_reason == "error":
                raise APIError(500, f"the engine failed on this request: {handles[index].error or out}",
                               code="engine_error")
            if out.finish_reason == "cancelled":
                raise APIError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
            if out.finish_reason is not None:
                remaining -= 1
            yield index, out
    finally:
        if getter is not None:
            getter.cancel()
        for t in tasks:
            t.cancel()


class _Disconnected(Exception):
    """The client went away before its answer was ready."""


class _EventStream(StreamingResponse):
    """A server-sent event stream that calls ``on_close`` however it ends: finished, the client gone
    (Starlette then stops iterating ``events``, possibly before their first), or the server cancelling."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: HTTPRequest) -> None:
    """Returns when the client has gone away (after the body was read, the server's next message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size:,} bytes or more, more than this server's limit of "
                         f"{limit:,} (--max-body-bytes)", code="request_too_large")


def _authorization(api_key: str | None) -> Callable:
    """A dependency that refuses (401) a request without ``Authorization: Bearer <api_key>``."""
    expected = None if api_key is None else api_key.encode()

    async def check(request: HTTPRequest) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not secrets.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    return check


def _add_error_handlers(app: FastAPI) -> None:
    """Every error OpenAI-shaped: ours, FastAPI's validation (400, not 422), routing (404 / 405), and
    anything unexpected (500, the traceback in the server's log only)."""

    async def api_error(request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def validation_error(request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [p for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = field_path(loc) or None
        return await api_error(request, bad_request(f"{param}: {first['msg']}" if param else first["msg"], param))

    async def http_error(request, e: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def unexpected(request, e: Exception) -> JSONResponse:   # Starlette logs the traceback
        return JSONResponse(APIError(500, f"internal error ({type(e).__name__}); see the server's log").body(),
                            status_code=500)

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class _CountRequests:
    """ASGI middleware counting answered HTTP requests by endpoint and status (pure ASGI: it leaves the
    client's messages alone, so disconnects still reach the endpoints)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            path = scope["path"]
            endpoint = path if path in _ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"
            self.metrics.http_requests.labels(endpoint, str(status)).inc()
