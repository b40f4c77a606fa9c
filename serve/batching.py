"""Requests coalesced into pipeline calls by one worker thread, the only thread that touches the pipeline.

The queue is first come, first served by its head: the oldest waiting request always goes in the next call,
joined by the later ones whose settings allow one call (:attr:`ImageRequest.batch_key`) while their images fit
in ``max_batch``; a call waits at most ``batch_wait_s`` from its head's arrival for more to join.  A request
with other settings therefore waits for at most the calls of the requests ahead of it: no starvation.  A
request whose client has gone, or whose time is up, is dropped before its call is made.

A call of several requests that fails is made again one request at a time, so that only the request that
fails gets the error (the parameters were checked per request before they were queued; this covers what
only running can find, such as NaN in one prompt's images).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Sequence

from fluxrt.serve.requests import ApiError, ImageRequest


@dataclass(eq=False)
class Job:
    request: ImageRequest
    deadline: float  # time.monotonic() after which it is no longer run
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)  # -> list of per-image results (see Batcher.run)
    cancelled: bool = False  # the client went away, or timed out: not run if not started
    started: float | None = None  # time.monotonic() when its pipeline call began

    def queued_s(self) -> float:
        """Seconds from its arrival to the start of its pipeline call (0 if it has not started)."""
        return 0.0 if self.started is None else self.started - self.arrived

    def cancel(self) -> None:
        self.cancelled = True


class QueueFull(ApiError):
    pass


class Batcher:
    """``run(requests) -> list`` (one result per request, each a list of its images) is called on the worker
    thread with requests of one batch key whose images add up to at most ``max_batch``."""

    def __init__(self, run: Callable[[Sequence[ImageRequest]], list], max_batch: int, batch_wait_s: float,
                 queue_size: int, on_batch: Callable[[int], None] = lambda images: None):
        self.run_batch, self.max_batch, self.batch_wait_s, self.queue_size = run, max_batch, batch_wait_s, queue_size
        self.on_batch = on_batch
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.call_seconds = 1.0  # a running mean of one call's wall time, for Retry-After
        self.thread = threading.Thread(target=self.work, name="fluxrt-batcher", daemon=True)
        self.thread.start()

    # ---- the server's side ------------------------------------------------------------------------
    def submit(self, request: ImageRequest, timeout_s: float) -> Job:
        with self.cond:
            self.drop_gone()
            if self.stopping:
                raise ApiError(503, "the server is shutting down", type="server_error")
            if len(self.pending) >= self.queue_size:
                wait = max(1, round(self.call_seconds * (1 + len(self.pending) / self.max_batch)))
                raise QueueFull(429, f"the queue is full ({self.queue_size} requests waiting, the server's "
                                     f"--queue-size); retry after {wait} s", type="rate_limit_error",
                                headers={"Retry-After": str(wait)})
            job = Job(request, deadline=time.monotonic() + timeout_s)
            self.pending.append(job)
            self.cond.notify_all()
            return job

    def depth(self) -> int:
        with self.cond:
            return sum(not j.cancelled for j in self.pending)

    def busy(self) -> int:
        """Requests accepted and not answered: waiting or running."""
        with self.cond:
            return sum(not j.cancelled for j in self.pending) + len(self.running)

    def stop(self, drop_pending: bool) -> None:
        """No new requests; with ``drop_pending`` the waiting ones are answered 503 at once."""
        with self.cond:
            self.stopping = True
            if drop_pending:
                while self.pending:
                    job = self.pending.popleft()
                    if not job.future.done():
                        job.future.set_exception(ApiError(503, "the server was interrupted before this request ran",
                                                          type="server_error"))
            self.cond.notify_all()

    # ---- the worker thread ------------------------------------------------------------------------
    def drop_gone(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.pending if j.cancelled or now > j.deadline]:
            self.pending.remove(job)
            if not job.future.done():
                job.future.set_exception(ApiError(504, "the request timed out before it ran", type="timeout_error"))

    def take(self) -> list[Job] | None:
        """The next call's jobs (head first), waiting for a head and for joiners; None once stopped and empty."""
        with self.cond:
            while True:
                self.drop_gone()
                if self.pending:
                    head = self.pending[0]
                    pending = list(self.pending)
                    batch = [pending[i] for i in groups([j.request for j in pending], self.max_batch)[0]]
                    images = sum(j.request.n for j in batch)
                    left = head.arrived + self.batch_wait_s - time.monotonic()
                    if images >= self.max_batch or left <= 0 or self.stopping:
                        for job in batch:
                            self.pending.remove(job)
                        self.running = batch
                        return batch
                    self.cond.wait(left)
                elif self.stopping:
                    return None
                else:
                    self.cond.wait(0.5)

    def work(self) -> None:
        while (batch := self.take()) is not None:
            start = time.perf_counter()
            try:
                call_jobs(self.run_batch, batch, self.on_batch)
            finally:
                seconds = time.perf_counter() - start
                self.call_seconds = 0.8 * self.call_seconds + 0.2 * seconds
                with self.cond:
                    self.running = []
                    self.cond.notify_all()



def groups(requests: Sequence[ImageRequest], max_batch: int) -> list[list[int]]:
    """Indices of ``requests`` as pipeline calls: one batch key each, at most ``max_batch`` images, in order of
    arrival of each call's first request."""
    calls: list[list] = []  # [batch key, request indices, images]
    for i, r in enumerate(requests):
        for call in calls:
            if call[0] == r.batch_key and call[2] + r.n <= max_batch:
                call[1].append(i)
                call[2] += r.n
                break
        else:
            calls.append([r.batch_key, [i], r.n])
    return [members for _, members, _ in calls]


def call_jobs(run: Callable[[Sequence[ImageRequest]], list], jobs: list[Job], on_batch: Callable[[int], None]) -> None:
    """One pipeline call for ``jobs``, each job's future given its result; a call of several that fails is made
    again one job at a time, so that only the job that fails gets the error."""
    now = time.monotonic()
    for job in jobs:
        job.started = job.started or now
    try:
        results = run([j.request for j in jobs])
    except Exception as e:  # noqa: BLE001 - handed to the request(s) it belongs to
        if len(jobs) == 1:
            jobs[0].future.set_exception(e)
        else:
            for job in jobs:
                call_jobs(run, [job], on_batch)
        return
    on_batch(sum(j.request.n for j in jobs))
    for job, result in zip(jobs, results):
        job.future.set_result(result)
