"""The same images API as a Ray Serve deployment: each replica loads its own pipeline (one GPU each where the
cluster has GPUs), batching through Serve's ``@serve.batch``, Serve's own queue limit and autoscaling.

- ``fluxrt serve --ray --replicas N --onnx DIR ...``: starts (or joins, with ``RAY_ADDRESS``) a Ray cluster and
  runs the deployment in the foreground, HTTP on ``--host``/``--port``.
- ``serve run fluxrt.serve.ray_app:build_app path=DIR [backend=ort-cuda replicas=2 ...]`` or a ``serve deploy``
  config whose ``import_path`` is ``fluxrt.serve.ray_app:build_app`` with those ``args`` (see :func:`build_app`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from pathlib import Path

from fluxrt.errors import InvalidInputError
from fluxrt.serve.batching import Job, call_jobs, groups
from fluxrt.serve.service import Service, ServeSettings, load_pipeline

log = logging.getLogger("fluxrt.serve")
ARGS = ("path", "backend", "cuda_graph", "loras", "lora_choices", "replicas", "max_batch", "batch_wait_ms", "queue_size",
        "timeout_s", "max_side", "png_compress_level", "num_gpus", "autoscaling_config", "api_key")


class RayService(Service):
    """A replica's service: the pipeline loaded in the constructor; requests go through ``@serve.batch``."""

    def __init__(self, path: str, backend: str | None, cuda_graph: bool, loras, settings: ServeSettings,
                 lora_choices=()):
        from ray import serve

        super().__init__(load_pipeline(Path(path), backend, cuda_graph, loras), path, settings, lora_choices)
        self.start(batching=False)
        if self.state == "failed":
            raise RuntimeError(f"fluxrt replica: loading {path} failed: {self.error}")
        self.lock = threading.Lock()  # one pipeline call at a time per replica
        self.tasks: set[asyncio.Task] = set()  # held until done (the loop keeps only weak references)

        @serve.batch(max_batch_size=self.max_batch, batch_wait_timeout_s=settings.batch_wait_ms / 1000)
        async def batched(jobs: list[Job]) -> list[None]:
            live = [j for j in jobs if not j.cancelled]
            for members in groups([j.request for j in live], self.max_batch):
                await asyncio.to_thread(self.call, [live[i] for i in members])
            return [None] * len(jobs)

        self.batched = batched

    def call(self, jobs: list[Job]) -> None:
        with self.lock:
            call_jobs(self.run, jobs, self.metrics.batch_size.observe)

    def submit(self, body: dict) -> Job:
        job = Job(self.accept(body), deadline=time.monotonic() + self.settings.timeout_s)
        task = asyncio.get_running_loop().create_task(self.batched(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job

    def busy(self) -> int:
        return 0


def deployment(path: str, backend: str | None = None, cuda_graph: bool = False, loras=(),
               settings: ServeSettings = ServeSettings(), replicas: int = 1, num_gpus: float | None = None,
               autoscaling_config: dict | None = None, api_key: str | None = None, lora_choices=()):
    """The bound Serve application. ``num_gpus``: per replica (default 1 where the cluster has GPUs, else 0);
    ``autoscaling_config``: Serve's, passed through (``replicas`` is then its initial count)."""
    import ray
    from ray import serve

    from fluxrt.serve.app import create_app

    if num_gpus is None:
        num_gpus = 1 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    options = dict(ray_actor_options={"num_gpus": num_gpus}, max_queued_requests=settings.queue_size,
                   max_ongoing_requests=settings.queue_size + settings.max_batch, name="fluxrt")
    if autoscaling_config:
        options["autoscaling_config"] = dict(autoscaling_config, initial_replicas=replicas)
    else:
        options["num_replicas"] = replicas

    @serve.deployment(**options)
    @serve.ingress()
    class FluxReplica:
        def __init__(self):
            self.service = RayService(path, backend, cuda_graph, loras, settings, lora_choices)

        def __serve_build_asgi_app__(self):
            return create_app(self.service, api_key)

    return FluxReplica.bind()


def build_app(args: dict):
    """``serve run``/``serve deploy`` entry: ``args`` with ``path`` (required) and any of ``ARGS``."""
    unknown = sorted(set(args) - set(ARGS))
    if unknown or "path" not in args:
        raise InvalidInputError(f"fluxrt.serve.ray_app:build_app takes args {list(ARGS)} with path required; got "
                                f"{sorted(args)}")

    def number(name, kind, default):
        v = args.get(name, default)
        try:
            return kind(v) if v is not None else None
        except (TypeError, ValueError):
            raise InvalidInputError(f"build_app: {name} must be a {kind.__name__}, got {v!r}") from None

    settings = ServeSettings(max_batch=number("max_batch", int, 4), batch_wait_ms=number("batch_wait_ms", float, 10),
                             queue_size=number("queue_size", int, 64), timeout_s=number("timeout_s", float, 300),
                             max_side=number("max_side", int, 2048),
                             png_compress_level=number("png_compress_level", int, 1))
    autoscaling = args.get("autoscaling_config")
    if isinstance(autoscaling, str):
        autoscaling = json.loads(autoscaling)
    loras = args.get("loras") or ()
    cuda_graph = str(args.get("cuda_graph", False)).lower() in ("1", "true", "yes")
    return deployment(str(args["path"]), args.get("backend"), cuda_graph, loras, settings,
                      number("replicas", int, 1), number("num_gpus", float, None), autoscaling, args.get("api_key"),
                      args.get("lora_choices") or ())


def run_ray(path, backend, cuda_graph, loras, settings: ServeSettings, host: str, port: int, api_key: str | None,
            replicas: int, lora_choices=()) -> None:
    """``fluxrt serve --ray``: a local Ray cluster (or ``RAY_ADDRESS``'s), the deployment, until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    logging.basicConfig(level=logging.INFO, format="fluxrt serve: %(message)s")
    stop = threading.Event()

    def on_signals(handler) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    on_signals(lambda *_: stop.set())  # in place of the driver's own (ray.init's sys.exit(15)) from here on
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(str(path), backend, cuda_graph, loras, settings, replicas, api_key=api_key,
                         lora_choices=lora_choices),
              name="fluxrt", route_prefix="/")
    on_signals(lambda *_: stop.set())  # again, should starting Serve have set one of Ray's
    log.info("Ray Serve: %d replica(s) of %s on http://%s:%d", replicas, path, host, port)
    try:
        stop.wait()
    except SystemExit:  # a handler of Ray's that ran in ours' place: the signal asked for the same shutdown
        pass
    # the shutdown is decided: a later SIGTERM (Ray's own process teardown, a supervisor repeating itself) must not
    # turn it into a kill; Ray's handlers, if any of its calls sets one again, are overridden the same way
    on_signals(signal.SIG_IGN)
    try:
        serve.shutdown()
        ray.shutdown()
    except SystemExit:  # Ray's own SIGTERM handler (sys.exit(15)), set again during its teardown: finish it
        log.info("Ray Serve: a signal came during the shutdown; finishing it")
        on_signals(signal.SIG_IGN)
        ray.shutdown()
    on_signals(signal.SIG_IGN)
    log.info("Ray Serve: stopped")
