"""The HTTP side: a FastAPI app over a :class:`Service`.

- ``POST /v1/images/generations``: OpenAI's images API (see ``requests.py``); errors in OpenAI's shape, never a
  traceback: 400 bad input (``param`` names the field), 401 a missing or wrong bearer token, 413 a body over
  1 MiB, 429 the queue is full (``Retry-After``), 503 loading or shutting down, 504 timed out, 500 the
  generation failed (the message names the stage).
- ``GET /healthz``: 200 while the process lives; ``GET /readyz``: 200 once the pipeline is loaded and warmed,
  503 before and while shutting down; ``GET /metrics``: Prometheus text (``metrics.py``).

With an API key, ``/v1/`` needs ``Authorization: Bearer KEY`` (compared in constant time); the health checks
and metrics do not (they carry no prompts or images).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from fluxrt.serve.requests import MAX_BODY_BYTES, ApiError, parse_body
from fluxrt.serve.service import Service

log = logging.getLogger("fluxrt.serve")
DISCONNECT_POLL_S = 0.25
DRAIN_BYTES = 4 * MAX_BODY_BYTES  # an oversized body up to this is read before the 413; a larger one is cut off
ERROR_KINDS = {400: "invalid_request", 401: "unauthorized", 413: "too_large", 429: "queue_full", 499: "disconnected",
               503: "not_ready",
               504: "timeout"}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES (by its Content-Length, else as it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        if int(declared) <= DRAIN_BYTES:  # read and dropped, so that a client still sending sees the answer
            async for _ in request.stream():
                pass
        raise ApiError(413, f"the request body is {declared} bytes; at most {MAX_BODY_BYTES} are accepted")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes, the most accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="fluxrt", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = service.metrics
    metrics.queue_depth.set_function(lambda: 0 if service.batcher is None else service.batcher.depth())
    metrics.running.set_function(lambda: 0 if service.batcher is None else len(service.batcher.running))
    expected = None if api_key is None else f"Bearer {api_key}".encode()
    # which process answered, on which GPU (what Ray gives a replica of num_gpus 1): placement, told per answer
    replica = f"pid={os.getpid()}; gpu={os.environ.get('CUDA_VISIBLE_DEVICES') or 'none'}"

    def answered(status: int, began: float) -> None:
        metrics.requests.labels(status=str(status)).inc()
        metrics.duration.observe(time.perf_counter() - began)
        if status in ERROR_KINDS:
            metrics.errors.labels(kind=ERROR_KINDS[status]).inc()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown paths and methods
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        metrics.errors.labels(kind="internal").inc()
        return error_response(ApiError(500, f"internal server error ({type(exc).__name__})", type="server_error"))

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        try:
            service.check_ready()
        except ApiError as e:
            return error_response(e)
        return {"status": "ready", "model": service.model}

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        began, began_mono = time.perf_counter(), time.monotonic()  # the job's arrival is on the monotonic clock
        try:
            if expected is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected):
                    raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY", param=None,
                                   type="invalid_request_error")
            body = parse_body(await read_body(request))
            job = service.submit(body)
            result = await wait_for(job, request, service.settings.timeout_s)
        except ApiError as e:
            answered(e.status, began)
            return error_response(e)
        encoding = time.perf_counter()
        pngs = await asyncio.to_thread(result.pngs)  # off the event loop and the pipeline's thread
        done = time.perf_counter()
        answered(200, began)
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": png} for png in pngs]},
                            headers={"X-Fluxrt-Replica": replica,
                                     "Server-Timing": server_timing(parse=job.arrived - began_mono,
                                                                    queue=job.queued_s(),
                                                                    generate=result.generate_s,
                                                                    encode=done - encoding, server=done - began)})

    return app


def server_timing(**seconds: float) -> str:
    """A Server-Timing header of the request's phases, in milliseconds: ``parse`` (the body read, parsed, checked,
    until it is queued), ``queue`` (queued until its pipeline call began), ``generate`` (that call, a direct user's),
    ``encode`` (its PNGs and base64) and ``server`` (the handler's start to the answer's images encoded)."""
    return ", ".join(f"{name};dur={s * 1000:.3f}" for name, s in seconds.items())


async def wait_for(job, request: Request, timeout_s: float):
    """The job's Generated (its images); its queued work dropped when the client disconnects or the time is up."""
    future = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            job.cancel()
            raise ApiError(504, f"the request took longer than the server's --timeout-s {timeout_s:g}",
                           type="timeout_error")
        done, _ = await asyncio.wait({future}, timeout=min(DISCONNECT_POLL_S, left))
        if done:
            return future.result()
        if await request.is_disconnected():
            job.cancel()
            log.info("client went away: its request is dropped")
            raise ApiError(499, "the client closed the connection", type="invalid_request_error")
