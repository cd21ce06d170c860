"""``moegate serve``: a router directory behind HTTP, with dynamic batching.

    moegate serve --router results/router [--host 127.0.0.1] [--port 8000]

Endpoints:

- ``POST /route`` ``{"questions": [...], "top_k": k, "abstain_below": t}`` (top_k and abstain_below
  optional, as in :meth:`moegate.router.Router.route`) → ``{"results": [...]}``, one object per
  question, the ones ``moegate route`` prints: question, expert (null = abstain), probability,
  exit_layer, distribution, kb_similarity.
- ``GET /healthz``: the router served and the batcher's state; ``GET /metrics``: Prometheus text
  (requests by path and status, request latency, questions, exit layers, abstentions, batch sizes and
  batch inference time); ``GET /docs``: the OpenAPI docs (``/openapi.json``).

Why FastAPI on uvicorn: the request body is a pydantic model, so a missing field, a non-string or
empty question or a bad ``top_k`` is a 422 naming the field without hand-written checks; the OpenAPI
schema and ``/docs`` come from the same model; and it is the stack most Python services (and their
operators) already know. Starlette alone would need the validation and the docs written by hand.

Dynamic batching (:class:`Batcher`): requests put their questions on an asyncio queue; one loop takes
the first waiting request, gathers more until ``max_batch`` questions or ``max_wait_ms`` after that
request arrived, and scores them all in one model call, so the early exit's batch compaction works
across requests. The call runs in a single worker thread (the event loop never blocks on the model;
one thread, because two model calls on two cores would only contend). With ``--no-batching`` each
request is its own model call, in the same thread. The model loads (and runs once, to warm up)
before the server listens.

Limits: more than ``max_questions`` questions, or a body over ``max_body_bytes``, is a 413 with a
message; an empty list, an empty or non-string question, a bad ``top_k`` or ``abstain_below`` is a
422. On SIGTERM or SIGINT uvicorn stops accepting connections and waits for the requests in flight
(up to ``GRACEFUL_SHUTDOWN_S``); the batcher answers the batch it is running and every queued request
before it stops.
"""

# no `from __future__ import annotations`: FastAPI reads the request model from the annotations of
# handlers defined inside create_app, which a postponed (string) annotation would hide from it
import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from moegate.errors import MoegateError
from moegate.router import RouterError, RouteScores

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 64  # questions per model call: the demo router's batch-64 throughput is ~3× batch 1
DEFAULT_MAX_WAIT_MS = 2.0  # what a lone request may wait for company: under a batch-1 call's ~3-10 ms
DEFAULT_MAX_QUESTIONS = 64  # per request; more is a 413 (a bulk job should use Router.route in-process)
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 64 questions of 16 KB each
GRACEFUL_SHUTDOWN_S = 30  # on SIGTERM, how long requests in flight may take before uvicorn drops them
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PATHS = ("/route", "/healthz", "/metrics", "/docs", "/openapi.json")  # request metrics label these; the rest: other


class ShuttingDown(RuntimeError):
    """A request reached the batcher after shutdown began."""


_STOP = object()  # queued by Batcher.close() behind every request


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future
    arrived: float  # event-loop time


class Batcher:
    """Gathers the questions of concurrent requests into one call of ``score`` (a list of questions →
    :class:`moegate.router.RouteScores`), run in one worker thread.

    ``max_batch``: questions per call (a request is never split; one larger than this runs alone).
    ``max_wait_ms``: how long after the first waiting request arrived the batch may wait for more.
    ``batching=False``: one request per call. ``on_batch(questions, seconds)`` is told of every call;
    ``thread_init()`` runs once in the worker thread before the first.
    """

    def __init__(self, score: Callable[[list[str]], RouteScores], max_batch: int = DEFAULT_MAX_BATCH,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS, batching: bool = True,
                 on_batch: Callable[[int, float], None] | None = None, thread_init: Callable[[], None] | None = None):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch: expected ≥ 1, got {max_batch!r}")
        if not float(max_wait_ms) >= 0:
            raise ValueError(f"max_wait_ms: expected ≥ 0, got {max_wait_ms!r}")
        self.score, self.max_batch, self.max_wait = score, int(max_batch), float(max_wait_ms) / 1000
        self.batching, self.on_batch, self.thread_init = bool(batching), on_batch, thread_init
        self.in_flight = 0  # questions in the model call now running
        self.received = 0  # requests submitted since start
        self.closing = False
        self._queue: asyncio.Queue | None = None
        self._carry: collections.deque[_Job] = collections.deque()  # taken from the queue, kept for the next batch
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return (self._queue.qsize() if self._queue is not None else 0) + len(self._carry)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moegate-inference",
                                            initializer=self.thread_init)
        self._task = asyncio.create_task(self._run(), name="moegate-batcher")

    async def submit(self, texts: list[str]) -> RouteScores:
        """The scores of ``texts``, computed in some batch; ShuttingDown once :meth:`close` began."""
        if self.closing or self._queue is None:
            raise ShuttingDown("the server is shutting down")
        loop = asyncio.get_running_loop()
        job = _Job(list(texts), loop.create_future(), loop.time())
        self._queue.put_nowait(job)
        self.received += 1
        return await job.future

    async def close(self) -> None:
        """Stop taking requests; the batch in flight and every queued request are answered first."""
        if self._task is None:
            return
        self.closing = True
        self._queue.put_nowait(_STOP)  # behind every queued request
        await self._task
        self._executor.shutdown(wait=True)
        self._task = None

    async def _next(self, timeout: float | None):
        """The next waiting request (or _STOP): wait for it (timeout None), up to ``timeout`` s, or None."""
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._next(None)
            if first is _STOP:
                break
            batch, size = [first], len(first.texts)
            while self.batching and size < self.max_batch:
                job = await self._next(first.arrived + self.max_wait - loop.time())
                if job is None:  # the wait is over
                    break
                if job is _STOP:  # every request is in this batch or done: the last batch
                    stop = True
                    break
                if size + len(job.texts) > self.max_batch:
                    self._carry.appendleft(job)  # first in the next batch
                    break
                batch.append(job)
                size += len(job.texts)
            await self._score(loop, batch)

    async def _score(self, loop: asyncio.AbstractEventLoop, batch: list[_Job]) -> None:
        live = [job for job in batch if not job.future.done()]  # a client that went away cancelled its own
        if not live:
            return
        texts = [t for job in live for t in job.texts]
        self.in_flight = len(texts)
        t0 = time.perf_counter()
        try:
            scores = await loop.run_in_executor(self._executor, self.score, texts)
        except Exception as e:  # noqa: BLE001 - the model's error goes to every request of the batch
            for job in live:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        finally:
            self.in_flight = 0
        if self.on_batch is not None:
            self.on_batch(len(texts), time.perf_counter() - t0)
        start = 0
        for job in live:
            end = start + len(job.texts)
            if not job.future.done():
                job.future.set_result(scores.rows(start, end))
            start = end


class _Metrics:
    """The Prometheus series of one server, in its own registry (several apps in one process do not mix)."""

    def __init__(self, num_layers: int):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moegate_requests", "HTTP requests by path and status code", ["path", "code"],
                                registry=r)
        self.latency = Histogram("moegate_request_seconds", "HTTP request latency, arrival to last byte",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.questions = Counter("moegate_questions", "questions routed", registry=r)
        self.abstentions = Counter("moegate_abstentions", "questions answered with expert = null (abstained)",
                                   registry=r)
        self.exit_layer = Histogram("moegate_exit_layer", "encoder layer each question's answer left at",
                                    buckets=tuple(range(1, num_layers + 1)), registry=r)
        self.batch_questions = Histogram("moegate_batch_questions", "questions per model call (dynamic batching)",
                                         buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("moegate_batch_seconds", "model time per batch, in the inference thread",
                                       buckets=LATENCY_BUCKETS, registry=r)

    def batch(self, questions: int, seconds: float) -> None:
        self.batch_questions.observe(questions)
        self.batch_seconds.observe(seconds)

    def routed(self, results) -> None:
        self.questions.inc(len(results))
        self.abstentions.inc(sum(r.expert is None for r in results))
        for r in results:
            self.exit_layer.observe(r.exit_layer)


class _Edge:
    """Pure ASGI middleware in front of the app: a body over ``max_body_bytes`` is a 413 (by its
    Content-Length, or counted while a chunked body is read); every request is counted by path and
    status and timed. Pure ASGI rather than BaseHTTPMiddleware: it adds microseconds, not a task."""

    def __init__(self, app, max_body_bytes: int, metrics: _Metrics):
        self.app, self.max_body_bytes, self.metrics = app, int(max_body_bytes), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        path = scope["path"] if scope["path"] in PATHS else "other"

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            too_long = (f"request body over {self.max_body_bytes} bytes; send fewer or shorter questions "
                        "(moegate serve --max-body-bytes)")
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                code = 413 if length.isdigit() else 400
                return await _send_json(send_counted, code, too_long if code == 413 else "bad Content-Length")
            if scope["method"] not in ("POST", "PUT", "PATCH"):
                return await self.app(scope, receive, send_counted)
            body, more = bytearray(), True
            while more:  # the whole body (≤ max_body_bytes) before the app sees it
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_body_bytes:
                    return await _send_json(send_counted, 413, too_long)
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()  # later reads: the client's disconnect
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            return await self.app(scope, replay, send_counted)
        finally:
            self.metrics.requests.labels(path, str(status[0])).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - t0)


async def _send_json(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def default_threads() -> int:
    """torch threads for the inference thread: half the cores (1 on 2 cores). The other half is for the
    event loop, tokenization, JSON and, often, the clients on the same node: on this 2-core machine under
    load, route() at batch 1 took 21-25 ms p50 with 1 thread and 130-1100 ms with 2 (OpenMP threads
    waiting on each other for a core)."""
    return max(1, (os.cpu_count() or 2) // 2)


def create_app(router, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
               max_questions: int = DEFAULT_MAX_QUESTIONS, batching: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, threads: int | None = None):
    """The ASGI app serving a loaded :class:`moegate.router.Router` (see the module docstring);
    ``threads``: torch's intra-op threads in the inference thread (None: leave torch's setting)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

    if int(max_questions) < 1:
        raise ValueError(f"max_questions: expected ≥ 1, got {max_questions!r}")
    metrics = _Metrics(router.num_layers)
    batcher = Batcher(lambda texts: router.scores(texts, batch_size=max(1, len(texts))), max_batch, max_wait_ms,
                      batching, on_batch=metrics.batch,
                      thread_init=None if threads is None else lambda: _torch_threads(threads))
    low = -1.0 if router.abstain_score == "kb_similarity" else 0.0

    class RouteRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        questions: list[StrictStr] = Field(..., min_length=1, description=f"at most {max_questions} questions")
        top_k: int | None = Field(None, ge=1, strict=True, description="keep the k most likely experts in distribution")
        abstain_below: float | None = Field(None, ge=low, le=1.0, allow_inf_nan=False, description=(
            f"expert = null where the router's {router.abstain_score} is below this (default: the router's "
            f"calibrated threshold, {router.abstain_below})"))

        @field_validator("questions")
        @classmethod
        def _not_blank(cls, questions: list[str]) -> list[str]:
            blank = [i for i, q in enumerate(questions) if not q.strip()]
            if blank:
                raise ValueError(f"questions {blank[:10]} are empty or blank")
            return questions

    class RouteItem(BaseModel):
        question: str
        expert: str | None = Field(description="null: the router abstains (no expert covers the question)")
        probability: float
        exit_layer: int
        distribution: dict[str, float]
        kb_similarity: float | None

    class RouteResponse(BaseModel):
        results: list[RouteItem]

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        log.info("serving %s (%d experts; abstain on %s < %s); batching %s", router.path, len(router.labels),
                 router.abstain_score, router.abstain_below,
                 f"on (≤ {batcher.max_batch} questions, ≤ {max_wait_ms:g} ms)" if batching else "off")
        try:
            yield
        finally:
            await batcher.close()  # uvicorn has waited for the requests in flight; this drains what is left
            log.info("batcher stopped")

    app = FastAPI(title="moegate router", version=_version(), lifespan=lifespan,
                  description="Routes a student's question to the course expert whose knowledge base covers it.")

    @app.post("/route", response_model=RouteResponse)
    async def route(request: RouteRequest) -> JSONResponse:
        """Route questions: one result per question, in order."""
        n = len(request.questions)
        if n > max_questions:
            raise HTTPException(413, f"{n} questions in one request; at most {max_questions} "
                                     "(moegate serve --max-questions)")
        try:
            router.route_options(request.top_k, request.abstain_below)  # before any model time is spent
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        try:
            scores = await batcher.submit(request.questions)
        except ShuttingDown as e:
            raise HTTPException(503, str(e)) from None
        except RouterError as e:  # the router cannot answer these questions (NaN outputs): say so, not just 500
            raise HTTPException(500, str(e)) from None
        results = router.decide(scores, top_k=request.top_k, abstain_below=request.abstain_below)
        metrics.routed(results)
        # a Response as it is: FastAPI would otherwise validate the dict against RouteResponse again (the
        # model stays for the docs); that costs more than the rest of the handler
        return JSONResponse({"results": [{"question": q, **r.to_dict()}
                                         for q, r in zip(request.questions, results, strict=True)]})

    @app.get("/healthz")
    async def healthz() -> dict:
        """The router served, and the batcher's state."""
        return {"status": "draining" if batcher.closing else "ok", "router": str(router.path),
                "experts": router.labels, "num_layers": router.num_layers,
                "abstain": {"score": router.abstain_score, "threshold": router.abstain_below},
                "batching": {"enabled": batching, "max_batch": batcher.max_batch, "max_wait_ms": max_wait_ms},
                "max_questions": max_questions, "requests_received": batcher.received,
                "questions_in_flight": batcher.in_flight, "requests_queued": batcher.queued}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.batcher, app.state.metrics = batcher, metrics
    return _Edge(app, max_body_bytes, metrics)


def _torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(int(n))


def _version() -> str:
    from moegate import __version__

    return __version__


def serve(router_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = DEFAULT_MAX_BATCH,
          max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_questions: int = DEFAULT_MAX_QUESTIONS, batching: bool = True,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, device: str = "auto", access_log: bool = False,
          threads: int | None = None) -> None:
    """Load the router once, warm it up, and serve it with uvicorn until SIGTERM/SIGINT.
    ``threads``: torch threads for inference (None: :func:`default_threads`)."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MoegateError(f"moegate serve needs the serve extra ({e.name} is missing): "
                           "pip install 'moegate[serve]'") from None
    from moegate.router import Router

    if int(max_body_bytes) < 1:
        raise MoegateError(f"--max-body-bytes: expected ≥ 1, got {max_body_bytes}")
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise MoegateError(f"--threads: expected ≥ 1, got {threads}")
    _torch_threads(threads)
    try:
        router = Router.from_pretrained(router_dir, device=device)
    except (FileNotFoundError, ValueError) as e:  # RouterError is a MoegateError already; the rest named too
        raise MoegateError(str(e)) from None
    t0 = time.perf_counter()
    router.scores(["warm-up question"] * min(int(max_batch), 8))  # lazy init (threads, allocator) before traffic
    log.info("router loaded and warmed up in %.0f ms (%d torch threads)", 1000 * (time.perf_counter() - t0), threads)
    try:
        app = create_app(router, max_batch, max_wait_ms, max_questions, batching, max_body_bytes, threads)
    except ValueError as e:
        raise MoegateError(str(e)) from None
    config = uvicorn.Config(app, host=host, port=int(port), log_level="info", access_log=access_log,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on")
    uvicorn.Server(config).run()


__all__ = ["Batcher", "ShuttingDown", "create_app", "serve"]
