"""``fluxrt bench-serve``: direct pipeline calls against ``fluxrt serve`` on the same machine and model, at
several concurrencies, the server with batching (``--max-batch N``) and without (``--max-batch 1``).

Per row: p50/p99 request latency, images per second over the level's wall time.  Direct calls are made from
``concurrency`` threads on one in-process pipeline (which serves many threads); server requests from
``concurrency`` HTTP clients (``http.client``, one connection each) to a real server process on 127.0.0.1.

The server's overhead (HTTP, JSON, validation, the queue, the PNG encoding and base64: all but the pipeline call)
is measured request by request: the server reports the seconds of the pipeline call it made for a request, the
call a direct user makes (``Server-Timing: generate;dur=MS``), and the overhead is the client's latency minus
that; rows of the server carry its p50/p99 and the p50 of its parts, from the server's other Server-Timing
metrics: ``parse`` (body read, parsed, checked, queued), ``queue`` (waiting for its call), ``encode`` (PNG and
base64) and ``outside`` (the latency less the server's own ``server`` time: HTTP both ways, the answer's JSON and
the client); the summary's ``overhead_p50_ms`` is the unbatched server's at concurrency 1.  (The difference of the direct and server p50s, taken minutes apart, is reported beside it: on a
GPU a launch-bound small model's own time drifts more than the overhead between two runs.)

Each server is warmed before it is timed: ``warmup`` requests alone, then, with batching, ``warmup`` rounds of k
requests sent at once for every k up to ``--max-batch`` (each batch size's first call pays the backend's per-shape
set-up, on ONNX Runtime CUDA cuDNN's algorithm search, which is not what the rows measure).  Writes
``bench-serve.json`` and ``bench-serve.md``.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fluxrt.files import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class ServeBenchSettings:
    width: int = 64
    height: int = 64
    steps: int = 4
    requests: int = 32  # per concurrency level and mode
    concurrency: tuple = (1, 4, 16)
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    warmup: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "height", "steps", "requests", "max_batch", "warmup"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'warmup' else 1}, got {v!r}")
        if not self.concurrency or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                       for c in self.concurrency):
            raise ValueError(f"concurrency must be integers >= 1, got {self.concurrency!r}")


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean())}


OVERHEAD_PARTS = ("parse", "queue", "encode", "outside")
REPLICA_HEADER = "X-Fluxrt-Replica"


def drive(call, n: int, concurrency: int) -> dict:
    """``n`` calls of ``call(i)`` from ``concurrency`` threads: latencies and images per second; where ``call``
    returns the server's timings (:func:`server_timings`), the overhead (latency minus the pipeline call) and its
    parts too."""
    latencies: list[float] = []
    overheads: list[float] = []
    parts: dict[str, list[float]] = {k: [] for k in OVERHEAD_PARTS}
    replicas: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()
    next_i = iter(range(n))

    def worker():
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            start = time.perf_counter()
            try:
                timings = call(i)
            except Exception as e:  # noqa: BLE001 - counted and reported, the run goes on
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                if timings is not None:
                    replica = timings.pop("replica", None)
                    if replica is not None:
                        replicas[replica] = replicas.get(replica, 0) + 1
                    overheads.append(took - timings["generate"])
                    for k in ("parse", "queue", "encode"):
                        parts[k].append(timings.get(k, float("nan")))
                    parts["outside"].append(took - timings.get("server", float("nan")))

    begin = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    row = dict(percentiles(latencies) if latencies else {}, images_per_s=len(latencies) / wall, wall_s=wall,
               requests=n, failed=len(errors))
    if overheads:
        ms = np.asarray(overheads) * 1000
        row.update(overhead_p50_ms=float(np.percentile(ms, 50)), overhead_p99_ms=float(np.percentile(ms, 99)),
                   overhead_parts_p50_ms={k: float(np.percentile(np.asarray(v) * 1000, 50)) for k, v in parts.items()})
    if replicas:
        row["replicas"] = dict(sorted(replicas.items()))
    if errors:
        row["first_error"] = errors[0]
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, folder: Path, kind: str, backend: str | None, cuda_graph: bool, flags: list[str],
                 env: dict | None = None):
        self.port = free_port()
        cmd = [sys.executable, "-m", "fluxrt.cli", "serve", f"--{kind}", str(folder), "--port", str(self.port),
               *flags]
        if backend:
            cmd += ["--backend", backend]
        if cuda_graph:
            cmd.append("--cuda-graph")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fluxrt serve exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError("fluxrt serve was not ready within 600 s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def server_call(port: int, body_of):
    local = threading.local()

    def call(i: int) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/images/generations", json.dumps(body_of(i)),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")
        timings: dict = server_timings(response.getheader("Server-Timing"))
        if response.getheader(REPLICA_HEADER):
            timings["replica"] = response.getheader(REPLICA_HEADER)
        return timings

    return call


def server_timings(header: str | None) -> dict[str, float]:
    """Seconds by metric name in a Server-Timing header (``name;dur=MS, ...``); ``generate`` must be there."""
    out = {}
    for metric in (header or "").split(","):
        name, *params = (part.strip() for part in metric.split(";"))
        for param in params:
            if param.startswith("dur="):
                try:
                    out[name] = float(param[4:]) / 1000
                except ValueError:
                    raise RuntimeError(f"the server's Server-Timing {name} has a duration that is not a number "
                                       f"(got {header!r})") from None
    if "generate" not in out:
        raise RuntimeError(f"the server's answer has no Server-Timing generate;dur=MS (got {header!r})")
    return out


def generation_seconds(header: str | None) -> float:
    """The ``generate`` metric's seconds in a Server-Timing header (``generate;dur=MS``)."""
    return server_timings(header)["generate"]


def request_body(s: ServeBenchSettings):
    """Request ``i``'s JSON body: its own prompt and seed, the settings' size and steps."""
    size = f"{s.width}x{s.height}"

    def body(i: int) -> dict:
        return {"prompt": f"a red circle on a blue background {i}", "size": size, "num_inference_steps": s.steps,
                "seed": s.seed + i}

    return body


def write_report(out: Path, folder: Path, backend: str | None, cuda_graph: bool, s: ServeBenchSettings, rows: list,
                 summary_: dict, **extra) -> dict:
    """bench-serve.json and bench-serve.md in ``out``; returns the report."""
    report = {"settings": asdict(s), "folder": str(folder), "backend": backend or "default", "cuda_graph": cuda_graph,
              **extra, "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                   "node": platform.node()},
              "rows": rows, "summary": summary_}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "bench-serve.json", report)
    atomic_write_text(out / "bench-serve.md", markdown(report))
    return report


def bench_serve(folder: Path, kind: str, backend: str | None, cuda_graph: bool, s: ServeBenchSettings,
                out: Path, say=print) -> dict:
    from fluxrt.runtime import FluxPipeline

    body = request_body(s)
    rows = []
    pipe = FluxPipeline.load(folder, backend=backend, cuda_graph=cuda_graph)

    def direct(i: int) -> None:
        b = body(i)
        pipe(b["prompt"], height=s.height, width=s.width, num_inference_steps=s.steps, seed=b["seed"])

    for i in range(s.warmup):
        direct(i)
    for c in s.concurrency:
        rows.append(dict(mode="direct", concurrency=c, **drive(direct, s.requests, c)))
        say(f"direct c={c}: {rows[-1]}")
    del pipe
    for mode, max_batch in (("server", 1), ("server+batching", s.max_batch)):
        server = ServerProcess(folder, kind, backend, cuda_graph, ["--max-batch", str(max_batch), "--batch-wait-ms",
                                                                  str(s.batch_wait_ms), "--queue-size", "1024"])
        try:
            call = server_call(server.port, body)
            warm_server(call, max_batch, s.warmup)
            for c in s.concurrency:
                rows.append(dict(mode=mode, concurrency=c, max_batch=max_batch, **drive(call, s.requests, c)))
                say(f"{mode} c={c}: {rows[-1]}")
        finally:
            server.close()
    return write_report(out, folder, backend, cuda_graph, s, rows, summary(rows))


def bench_serve_ray(folder: Path, kind: str, backend: str | None, cuda_graph: bool, s: ServeBenchSettings,
                    replicas: tuple, out: Path, say=print, start_s: float = 300) -> dict:
    """``fluxrt serve --ray --replicas N`` on a local Ray cluster for each N of ``replicas``, one after the other, at
    each concurrency: rows ``ray xN`` with the requests each replica answered (its X-Fluxrt-Replica: process and
    the GPU Ray gave it), and the summary's throughput of the most replicas against one's and their p50 at
    concurrency 1. Each deployment is warmed until every replica has answered (within ``start_s``)."""
    if not replicas or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in replicas):
        raise ValueError(f"replicas must be integers >= 1, got {replicas!r}")
    body = request_body(s)
    rows = []
    for n in replicas:
        server = ServerProcess(folder, kind, backend, cuda_graph,
                               ["--ray", "--replicas", str(n), "--max-batch", str(s.max_batch), "--batch-wait-ms",
                                str(s.batch_wait_ms), "--queue-size", "1024"],
                               env={"RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
        try:
            call = server_call(server.port, body)
            seen, deadline = set(), time.monotonic() + start_s
            while len(seen) < n:  # every replica up and answering before the rows are timed
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(seen)} of {n} Ray replicas answered within {start_s:g} s: "
                                       f"{sorted(seen)}")
                warm = drive(call, max(2 * n, s.warmup), 2 * n)
                seen |= set(warm.get("replicas", {}))
            for c in s.concurrency:
                rows.append(dict(mode=f"ray x{n}", concurrency=c, replicas_deployed=n, max_batch=s.max_batch,
                                 **drive(call, s.requests, c)))
                say(f"ray x{n} c={c}: {rows[-1]}")
        finally:
            server.close()
    return write_report(out, folder, backend, cuda_graph, s, rows, ray_summary(rows, replicas),
                        ray_replicas=list(replicas))


def ray_summary(rows: list[dict], replicas: tuple) -> dict:
    """The most replicas against one: images/s ratio per concurrency, p50 ratio at concurrency 1, and the
    placement (the distinct GPUs their answers named)."""
    at = {(r["replicas_deployed"], r["concurrency"]): r for r in rows}
    out: dict = {}
    top = max(replicas)
    if top > 1 and 1 in replicas:
        for (n, c), r in at.items():
            if n == top and (1, c) in at and at[(1, c)]["images_per_s"]:
                out[f"throughput_x{top}_vs_x1_c{c}"] = r["images_per_s"] / at[(1, c)]["images_per_s"]
        if (top, 1) in at and (1, 1) in at and at[(1, 1)].get("p50_ms"):
            out[f"p50_x{top}_vs_x1_c1"] = at[(top, 1)]["p50_ms"] / at[(1, 1)]["p50_ms"]
    answered = {k for (n, _), r in at.items() if n == top for k in r.get("replicas", {})}
    out["replicas_answering"] = len(answered)
    out["gpus"] = sorted({k.split("gpu=", 1)[-1] for k in answered})
    return out


def warm_server(call, max_batch: int, rounds: int) -> None:
    """``rounds`` requests alone, then with batching ``rounds`` rounds of k requests at once for k = 2..max_batch."""
    for i in range(rounds):
        call(i)
    for k in range(2, max_batch + 1):
        for _ in range(rounds):
            drive(call, k, k)


def summary(rows: list[dict]) -> dict:
    at = {(r["mode"], r["concurrency"]): r for r in rows}
    out = {}
    if ("server", 1) in at and "overhead_p50_ms" in at[("server", 1)]:
        out["overhead_p50_ms"] = at[("server", 1)]["overhead_p50_ms"]
        if ("direct", 1) in at:
            out["server_minus_direct_p50_ms"] = at[("server", 1)]["p50_ms"] - at[("direct", 1)]["p50_ms"]
    for (mode, c), r in at.items():
        if mode == "server+batching" and ("server", c) in at:
            base = at[("server", c)]["images_per_s"]
            out[f"batching_throughput_ratio_c{c}"] = r["images_per_s"] / base if base else None
    return out


def summary_text(summary: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                     if v is not None)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# fluxrt bench-serve: {report['folder']} ({report['backend']}), {s['width']}x{s['height']}, "
             f"{s['steps']} steps, {s['requests']} requests per row", "",
             "| mode | concurrency | p50 ms | p99 ms | images/s | server overhead p50 / p99 ms | of it, p50 ms: "
             "parse / queue / encode / outside | failed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        overhead = (f"{r['overhead_p50_ms']:.2f} / {r['overhead_p99_ms']:.2f}" if "overhead_p50_ms" in r else "")
        parts = " / ".join(f"{r['overhead_parts_p50_ms'][k]:.2f}" for k in OVERHEAD_PARTS) \
            if "overhead_parts_p50_ms" in r else ""
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r.get('p50_ms', float('nan')):.1f} | "
                     f"{r.get('p99_ms', float('nan')):.1f} | {r['images_per_s']:.2f} | {overhead} | {parts} | "
                     f"{r['failed']} |")
    for r in report["rows"]:
        if "replicas" in r:
            lines.append(f"- {r['mode']} at concurrency {r['concurrency']}, requests per replica: "
                         + ", ".join(f"`{k}` {v}" for k, v in r["replicas"].items()))
    lines += ["", "Summary: " + summary_text(report["summary"]), ""]
    return "\n".join(lines)
