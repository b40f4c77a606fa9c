"""``fluxrt serve``: real server processes on 127.0.0.1 over the tiny fp32 export, real HTTP clients (urllib,
raw sockets, the ``openai`` client), every wait bounded.

Images are compared as PNG pixels with what ``FluxPipeline`` gives for the same settings and seed in this
process (the same graphs, ONNX Runtime on the CPU), batched or not."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from fluxrt.bench.serve import generation_seconds, server_timings  # noqa: E402  (the bench client reads the header the server writes)

START_S = 60  # loading and warming the tiny model takes ~5 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``fluxrt serve`` in a child process; ``url``; ``stop(sig)`` -> (exit status, seconds, stderr)."""

    def __init__(self, folder: Path, *flags: str, wait_ready: bool = True, env: dict | None = None):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "fluxrt.cli", "serve", "--onnx", str(folder), "--port",
                                      str(self.port), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, **(env or {})))
        self.stderr = ""
        self.wait("/healthz")
        if wait_ready:
            self.wait("/readyz")

    def wait(self, path: str) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.url}{path} not 200 within {START_S} s")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> tuple[int, float, str]:
        begin = time.monotonic()
        self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"the server did not exit within {timeout} s of {sig!r}: {err[-2000:]}")
        return self.proc.returncode, time.monotonic() - begin, err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def post(url: str, body, timeout: float = 60, headers: dict | None = None) -> tuple[int, dict, object]:
    """(status, JSON body, headers: case-insensitive)"""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/images/generations", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw), e.headers
        except ValueError:  # not fluxrt's answer (Ray Serve's proxy answers a lost replica in plain text)
            return e.code, {"raw": raw.decode(errors="replace")}, e.headers


def get(url: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url + path, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def pngs(answer: dict) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in answer["data"]]


def zlib_level_class(png: bytes) -> int:
    """The compression class zlib writes in its stream header (FLEVEL: 0 for levels 0-1, 1 for 2-5, 2 for 6,
    3 for 7-9), read from the PNG's first IDAT chunk."""
    at = 8  # past the signature: chunks are length, type, data, CRC
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        if png[at + 4:at + 8] == b"IDAT":
            return png[at + 9] >> 6
        at += 12 + length
    raise AssertionError("no IDAT chunk")


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def pipe(fp32_exports):
    from fluxrt.runtime import FluxPipeline

    return FluxPipeline.load(fp32_exports["dev"])


def reference(pipe, prompt: str, size: str, steps: int, seed: int, n: int = 1, guidance=None) -> list[np.ndarray]:
    w, h = map(int, size.split("x"))
    out = pipe(prompt, height=h, width=w, num_inference_steps=steps, seed=seed, num_images_per_prompt=n,
               guidance_scale=guidance)
    return [np.asarray(im) for im in out.images]


@pytest.fixture(scope="module")
def style_lora(fp32_exports, tmp_path_factory) -> Path:
    """A kohya LoRA the server offers by name ("style")."""
    from test_lora import kohya_file

    from fluxrt.artifacts import ExportFolder

    path = tmp_path_factory.mktemp("serve-lora") / "style.safetensors"
    kohya_file(path, ExportFolder.open(fp32_exports["dev"]).transformer_config(), alpha=8.0)
    return path


@pytest.fixture(scope="module")
def server(fp32_exports, style_lora):
    with Server(fp32_exports["dev"], "--max-batch", "4", "--batch-wait-ms", "300", "--queue-size", "64",
                "--lora-choice", str(style_lora)) as s:
        yield s


def test_a_request_picks_an_offered_lora_and_the_next_one_is_without_it(server, pipe, style_lora):
    """``lora`` names a --lora-choice file: the images are a pipeline's with that file at that scale; the request
    after it, without one, gets the base images again; two requests at once with different LoRAs each get theirs."""
    from fluxrt.runtime import FluxPipeline

    styled = FluxPipeline.load(server.folder, loras=[(style_lora, 0.7)])
    base = {"prompt": "a styled heron", "size": "32x32", "num_inference_steps": 2, "seed": 9}
    bodies = [dict(base, lora=[{"name": "style", "scale": 0.7}]), base, dict(base, seed=10, lora=[{"name": "style"}])]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: post(server.url, b, timeout=120), bodies))
    full = FluxPipeline.load(server.folder, loras=[(style_lora, 1.0)])
    for body, (status, answer, _), reference_pipe in zip(bodies, answers, (styled, pipe, full)):
        assert status == 200, answer
        want = reference(reference_pipe, body["prompt"], body["size"], 2, body["seed"])[0]
        image = pngs(answer)[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), want), body.get("lora")
        assert len(json.loads(image.text["fluxrt:loras"])) == (1 if "lora" in body else 0)
    assert not np.array_equal(reference(styled, base["prompt"], "32x32", 2, 9)[0], reference(pipe, base["prompt"],
                                                                                             "32x32", 2, 9)[0])
    for lora, message in (([{"name": "nope"}], "'nope' is not offered by this server; it offers ['style']"),
                          ([{"name": "style", "scale": "x"}], "scale must be a finite number"),
                          ({"name": "style"}, "lora must be a list"), ([{"name": "style", "weight": 1}], "each lora")):
        status, answer, _ = post(server.url, dict(base, lora=lora))
        assert status == 400 and answer["error"]["param"] == "lora" and message in answer["error"]["message"], answer


def test_images_equal_the_pipeline_and_carry_their_settings(server, pipe):
    for body in ({"prompt": "a red circle", "size": "64x48", "num_inference_steps": 2, "seed": 7},
                 {"prompt": "two of them", "size": "32x32", "num_inference_steps": 1, "seed": 2**64 - 1, "n": 2,
                  "guidance_scale": 5.0, "model": "flux-dev", "user": "u1", "response_format": "b64_json"}):
        began = time.perf_counter()
        status, answer, headers = post(server.url, body)
        took = time.perf_counter() - began
        assert status == 200, answer
        assert abs(answer["created"] - time.time()) < 60
        generate_s = generation_seconds(headers["Server-Timing"])  # the pipeline call's share of the latency
        assert 0 < generate_s < took, (headers["Server-Timing"], took)
        t = server_timings(headers["Server-Timing"])  # the server's phases, each within its whole
        assert list(t) == ["parse", "queue", "generate", "encode", "server"], headers["Server-Timing"]
        assert re.fullmatch(r"pid=\d+; gpu=\S+", headers["X-Fluxrt-Replica"]), headers["X-Fluxrt-Replica"]
        assert min(t.values()) >= 0 and t["encode"] > 0
        assert t["parse"] + t["queue"] + t["generate"] + t["encode"] <= t["server"] + 1e-4 < took + 1e-4
        # --png-compress-level's default, 1: zlib's fastest class (the pixels are the same at every level)
        assert {zlib_level_class(base64.b64decode(d["b64_json"])) for d in answer["data"]} == {0}
        images = pngs(answer)
        want = reference(pipe, body["prompt"], body["size"], body["num_inference_steps"], body["seed"],
                         body.get("n", 1), body.get("guidance_scale"))
        assert len(images) == len(want) == body.get("n", 1)
        for i, (image, ref) in enumerate(zip(images, want)):
            assert image.size == tuple(map(int, body["size"].split("x")))  # width first
            assert np.array_equal(np.asarray(image.convert("RGB")), ref)
            assert image.text["fluxrt:prompt"] == body["prompt"]
            assert json.loads(image.text["fluxrt:seed"]) == body["seed"]
            assert json.loads(image.text["fluxrt:index"]) == i
            assert json.loads(image.text["fluxrt:num_images_per_prompt"]) == body.get("n", 1)


def test_server_timing_header_is_read_or_refused_by_name():
    assert generation_seconds("total;dur=9, generate;dur=12.5;desc=x") == pytest.approx(0.0125)
    assert server_timings("parse;dur=0.5, generate;dur=12.5;desc=x, queue") == {"parse": 0.0005, "generate": 0.0125}
    for header in (None, "", "total;dur=3", "generate"):
        with pytest.raises(RuntimeError, match="no Server-Timing generate;dur=MS"):
            generation_seconds(header)
    with pytest.raises(RuntimeError, match="Server-Timing encode has a duration that is not a number"):
        server_timings("generate;dur=1, encode;dur=fast")


def test_concurrent_clients_are_batched_and_each_gets_its_own_images(server, pipe):
    """24 clients at once, three sizes and two step counts: every answer equals its own settings' images, and
    requests of one setting were coalesced (the batch-size histogram has calls of more than one image)."""
    before = get(server.url, "/metrics")[1]
    bodies = [{"prompt": f"prompt {i}", "size": ("32x32", "48x32", "32x64")[i % 3],
               "num_inference_steps": 1 + i % 2, "seed": 1000 + i, "n": 1 + (i % 5 == 0)} for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda b: post(server.url, b, timeout=120), bodies))
    for body, (status, answer, _) in zip(bodies, answers):
        assert status == 200, answer
        want = reference(pipe, body["prompt"], body["size"], body["num_inference_steps"], body["seed"], body["n"])
        got = [np.asarray(im.convert("RGB")) for im in pngs(answer)]
        assert len(got) == body["n"]
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), body
    after = get(server.url, "/metrics")[1]
    calls = metric(after, "fluxrt_batch_size_count") - metric(before, "fluxrt_batch_size_count")
    images = metric(after, "fluxrt_batch_size_sum") - metric(before, "fluxrt_batch_size_sum")
    assert images == sum(b["n"] for b in bodies) == 29
    assert calls < len(bodies), f"{calls} calls for {len(bodies)} requests: nothing was batched"
    single = metric(after, 'fluxrt_batch_size_bucket{le="1.0"}') - metric(before, 'fluxrt_batch_size_bucket{le="1.0"}')
    assert calls - single >= 1  # calls of more than one image


@pytest.mark.parametrize("body, status, param, message", [
    ({"prompt": "x", "size": "65x64"}, 400, "size", "width must be a positive multiple of 16"),
    ({"prompt": "x", "size": "1024"}, 400, "size", "size must be a string \"WIDTHxHEIGHT\""),
    ({"prompt": "x", "size": "4096x4096"}, 400, "size", "at most 2048 pixels"),
    ({"prompt": "x", "n": 0}, 400, "n", "n must be an integer in [1, 4]"),
    ({"prompt": "x", "n": 5}, 400, "n", "n must be an integer in [1, 4]"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps", "in [1, 1000]"),
    ({"prompt": "x", "num_inference_steps": "4"}, 400, "num_inference_steps", "must be an integer"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "seed must be an integer in [0, 18446744073709551615]"),
    ({"prompt": "x", "seed": 2**64}, 400, "seed", "seed must be an integer"),
    ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale", "finite number"),
    ({"prompt": "x", "max_sequence_length": 513}, 400, "max_sequence_length", "in [1, 512]"),
    ({"prompt": "x", "response_format": "url"}, 400, "response_format", "b64_json"),
    ({"prompt": 3}, 400, "prompt", "prompt must be a non-empty string"),
    ({"size": "64x64"}, 400, "prompt", "prompt must be a non-empty string"),
    ({"prompt": "x", "style": "vivid"}, 400, "style", "unknown field 'style'"),
    ({"prompt": "x", "user": 5}, 400, "user", "user must be a string"),
    ([1, 2], 400, None, "must be a JSON object"),
    (b"{not json", 400, None, "not JSON"),
    (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, None, "at most 1048576"),
    ({"prompt": "x", "size": "32x32", "num_inference_steps": 1, "guidance_scale": 3e38}, 500, None,
     "stage transformer (ort-cpu, fp32) produced NaN or Inf"),
])
def test_errors_in_openai_shape(server, body, status, param, message):
    got, answer, _ = post(server.url, body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert error["param"] == param
    assert message in error["message"], error["message"]
    assert "Traceback" not in error["message"] and 'File "' not in error["message"]
    ok, answer, _ = post(server.url, {"prompt": "still alive", "size": "32x32", "num_inference_steps": 1, "seed": 1})
    assert ok == 200 and len(answer["data"]) == 1


def png_b64(pixels: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt)
    return base64.b64encode(out.getvalue()).decode()


def test_image_to_image_equals_the_pipeline_batched_or_not(server, pipe):
    """``image`` + ``strength``: the PNGs are FluxPipeline's image-to-image images from asarray(image) / 255, the
    size taken from the image; three such requests at once (two sharing a call) each get their own."""
    rng = np.random.default_rng(4)
    pictures = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(3)]
    bodies = [{"prompt": f"redraw {i}", "image": ("data:image/png;base64," if i == 1 else "") + png_b64(pic),
               "strength": 0.7, "num_inference_steps": 3, "seed": 40 + i, "n": 1 + (i == 2)}
              for i, pic in enumerate(pictures)]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda b: post(server.url, b, timeout=120), bodies))
    for body, pic, (status, answer, _) in zip(bodies, pictures, answers):
        assert status == 200, answer
        want = pipe(body["prompt"], image=pic.astype(np.float32) / 255, strength=0.7, num_inference_steps=3,
                    seed=body["seed"], num_images_per_prompt=body["n"]).images
        got = pngs(answer)
        assert len(got) == body["n"]
        for image, ref in zip(got, want):
            assert image.size == (48, 32)
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(ref)), body["prompt"]
            assert json.loads(image.text["fluxrt:strength"]) == 0.7
            assert len(image.text["fluxrt:image_sha256"]) == 64


@pytest.mark.parametrize("fields, param, message", [
    ({"image": "not base64!"}, "image", "image is not valid base64"),
    ({"image": base64.b64encode(b"GIF89a....").decode()}, "image", "cannot be decoded"),
    ({"image": 5}, "image", "image must be a base64 string"),
    ({"size": "64x64"}, "image", "fluxrt does not resize"),
    ({"strength": 0}, "strength", "runs none of the"),
    ({"strength": 1.5}, "strength", "strength must be a finite number in [0, 1]"),
    ({"strength": "half"}, "strength", "strength must be a number"),
    ({"image": None, "strength": 0.5}, "strength", "it needs image"),
])
def test_image_to_image_errors(server, fields, param, message):
    body = dict({"prompt": "x", "image": png_b64(np.zeros((32, 48, 3), np.uint8)), "num_inference_steps": 2},
                **fields)
    status, answer, _ = post(server.url, body)
    assert status == 400, answer
    assert answer["error"]["param"] == param
    assert message in answer["error"]["message"], answer["error"]["message"]


def test_health_metrics_and_unknown_routes(server):
    assert get(server.url, "/healthz") == (200, '{"status":"alive"}')
    assert get(server.url, "/readyz")[0] == 200
    status, text = get(server.url, "/metrics")
    assert status == 200
    for name in ("fluxrt_requests_total", "fluxrt_request_duration_seconds_bucket", "fluxrt_queue_depth",
                 "fluxrt_batch_size_bucket", "fluxrt_stage_duration_seconds_bucket", "fluxrt_errors_total"):
        assert name in text, name
    assert 'fluxrt_stage_duration_seconds_count{stage="transformer"}' in text
    status, body = get(server.url, "/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_openai_client(server, pipe):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    answer = client.images.generate(prompt="a blue square", size="32x48", n=1, response_format="b64_json",
                                    model="flux-dev", extra_body={"seed": 5, "num_inference_steps": 2})
    image = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
    assert np.array_equal(np.asarray(image.convert("RGB")), reference(pipe, "a blue square", "32x48", 2, 5)[0])
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="33x48", response_format="b64_json")
    assert e.value.body["param"] == "size"


def test_burst_of_connections_is_absorbed(server):
    """100 connections opened at once are all answered (the listen backlog holds them until accepted)."""
    def health(_):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).split(b" ")[1]

    with ThreadPoolExecutor(100) as pool:
        assert set(pool.map(health, range(100))) == {b"200"}


def test_queue_full_timeout_and_disconnect(fp32_exports):
    """One slow call occupies the worker: a client that disconnects has its queued request dropped (never run),
    one request past --queue-size gets 429 with Retry-After, and the slow one is answered 504 at --timeout-s."""
    slow = {"prompt": "slow", "size": "1024x1024", "num_inference_steps": 48, "seed": 1}  # ~5 s on a fast CPU
    small = {"prompt": "small", "size": "32x32", "num_inference_steps": 1, "seed": 2}
    with Server(fp32_exports["dev"], "--queue-size", "1", "--batch-wait-ms", "0", "--timeout-s", "3") as s:
        slow_answer = []
        first = threading.Thread(target=lambda: slow_answer.append(post(s.url, slow)))
        first.start()
        time.sleep(1.0)  # the slow request is running: the queue is empty
        raw = socket.create_connection(("127.0.0.1", s.port))
        data = json.dumps(dict(small, seed=99)).encode()
        raw.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        time.sleep(0.5)
        assert metric(get(s.url, "/metrics")[1], "fluxrt_queue_depth") == 1
        status, answer, headers = post(s.url, small)  # the queue holds one: full
        assert status == 429 and answer["error"]["type"] == "rate_limit_error", answer
        assert int(headers["Retry-After"]) >= 1
        raw.close()  # the queued client goes away
        time.sleep(1.0)
        assert metric(get(s.url, "/metrics")[1], "fluxrt_queue_depth") == 0
        first.join(30)
        status, answer, _ = slow_answer[0]
        assert status == 504 and "--timeout-s 3" in answer["error"]["message"], answer
        deadline = time.monotonic() + 60
        while metric(get(s.url, "/metrics")[1], "fluxrt_batch_size_count") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the slow call itself runs to its end
        assert post(s.url, small)[0] == 200
        text = get(s.url, "/metrics")[1]
        assert metric(text, "fluxrt_batch_size_count") == 2  # the slow call and the last: the dropped one never ran
        assert metric(text, 'fluxrt_errors_total{kind="timeout"}') == 1
        assert metric(text, 'fluxrt_errors_total{kind="queue_full"}') == 1


def test_sigterm_finishes_accepted_requests_and_exits_0(fp32_exports):
    with Server(fp32_exports["dev"], "--batch-wait-ms", "0") as s:
        results = []
        # ~2 s on a fast CPU alone: still running at the SIGTERM (1.5 s at 768x768 and 24 steps was done before it
        # on one), done well within the 30 s drain on a loaded one (40 steps took over 30 s beside other tests)
        t = threading.Thread(target=lambda: results.append(post(s.url, {"prompt": "in flight", "size": "1024x1024",
                                                                        "num_inference_steps": 20, "seed": 3})))
        t.start()
        time.sleep(1.0)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, answer, _ = post(s.url, {"prompt": "late", "size": "32x32", "num_inference_steps": 1})
        assert status == 503 and "shutting down" in answer["error"]["message"]
        assert get(s.url, "/readyz")[0] == 503
        begin = time.monotonic()
        code, err = s.proc.wait(30), s.proc.stderr.read()
        t.join(30)
        assert code == 0, err
        assert time.monotonic() - begin < 30
        assert results and results[0][0] == 200 and len(results[0][1]["data"]) == 1
        assert "Traceback" not in err


def test_sigint_exits_without_traceback(fp32_exports):
    with Server(fp32_exports["dev"]) as s:
        code, seconds, err = s.stop(signal.SIGINT)
        assert code == 0 and seconds < 30, err
        assert "Traceback" not in err and "stopped" in err


def test_not_ready_while_loading_then_ready(fp32_exports):
    with Server(fp32_exports["dev"], wait_ready=False) as s:
        status, body = get(s.url, "/readyz")
        code, answer, headers = post(s.url, {"prompt": "too early", "size": "32x32"})
        if status == 503:  # still loading (the tiny model loads in ~5 s; a fast machine may be done already)
            assert json.loads(body)["error"]["message"] == "the model is still loading"
            assert code == 503 and headers["Retry-After"] == "5"
        s.wait("/readyz")
        assert post(s.url, {"prompt": "now", "size": "32x32", "num_inference_steps": 1})[0] == 200


def test_api_key_and_loopback_rule(fp32_exports, tmp_path):
    from fluxrt.cli import main

    code = subprocess.run([sys.executable, "-m", "fluxrt.cli", "serve", "--onnx", str(fp32_exports["dev"]),
                           "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert code.returncode == 2
    assert "--host 0.0.0.0 listens beyond this machine: give --api-key-file" in code.stderr
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert main(["serve", "--onnx", str(fp32_exports["dev"]), "--api-key-file", str(short)]) == 2
    assert main(["serve", "--onnx", str(fp32_exports["dev"]), "--max-batch", "0"]) == 2
    key = tmp_path / "key"
    key.write_text("s3cret-token-0123456789\n")
    with Server(fp32_exports["dev"], "--api-key-file", str(key), "--png-compress-level", "9") as s:
        body = {"prompt": "x", "size": "32x32", "num_inference_steps": 1}
        status, answer, _ = post(s.url, body)
        assert status == 401 and "Bearer" in answer["error"]["message"]
        assert post(s.url, body, headers={"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        status, answer, _ = post(s.url, body, headers={"Authorization": "Bearer s3cret-token-0123456789"})
        assert status == 200 and zlib_level_class(base64.b64decode(answer["data"][0]["b64_json"])) == 3
        assert get(s.url, "/healthz")[0] == 200  # health checks need no key


def test_cli_errors_name_flags(fp32_exports, tmp_path, capsys):
    from fluxrt.cli import main

    assert main(["serve", "--onnx", str(fp32_exports["dev"]), "--queue-size", "0"]) == 2
    assert "--queue-size must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["serve", "--onnx", str(fp32_exports["dev"]), "--png-compress-level", "10"]) == 2
    assert "--png-compress-level must be an integer in 0..9, got 10" in capsys.readouterr().err
    assert main(["serve", "--onnx", str(fp32_exports["dev"]), "--cuda-graph"]) == 2
    assert "--cuda-graph replays the ort-cuda transformer" in capsys.readouterr().err
    assert main(["serve", "--onnx", str(tmp_path / "none")]) == 2
    assert str(tmp_path / "none") in capsys.readouterr().err


def bench_report(folder, out, *flags) -> tuple[dict, dict]:
    """``fluxrt bench-serve --onnx folder --out out --size 32x32 --steps 1 --requests 6 flags...``: its report and
    rows by (mode, concurrency)."""
    from cli_calls import cli

    code, stderr = cli(["bench-serve", "--onnx", folder, "--out", out, "--size", "32x32", "--steps", "1",
                        "--requests", "6", *flags])
    assert code == 0, stderr
    report = json.loads((out / "bench-serve.json").read_text())
    return report, {(r["mode"], r["concurrency"]): r for r in report["rows"]}


def test_bench_serve_writes_rows_for_every_mode_and_concurrency(fp32_exports, tmp_path):
    """``fluxrt bench-serve`` on the tiny model: direct calls, the server without and with batching, at two
    concurrencies; every request answered, the server's overhead per request (latency minus its Server-Timing
    generation time) positive and below the latency; the JSON's summary is the rows' arithmetic."""
    from cli_calls import cli

    out = tmp_path / "bench"
    report, rows = bench_report(fp32_exports["dev"], out, "--concurrency", "1,3", "--max-batch", "3", "--warmup", "1")
    assert set(rows) == {(m, c) for m in ("direct", "server", "server+batching") for c in (1, 3)}
    assert all(r["failed"] == 0 and r["requests"] == 6 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows.values())
    for mode in ("server", "server+batching"):  # latency minus the server's own pipeline-call time, per request
        for c in (1, 3):
            r = rows[(mode, c)]
            assert 0 < r["overhead_p50_ms"] <= r["overhead_p99_ms"] and r["overhead_p50_ms"] < r["p50_ms"], r
            parts = r["overhead_parts_p50_ms"]  # each from the server's Server-Timing, each under the whole
            assert set(parts) == {"parse", "queue", "encode", "outside"} and parts["encode"] > 0 < parts["outside"], r
            assert all(0 <= v < r["p50_ms"] for v in parts.values()), r
    s = report["summary"]
    assert s["overhead_p50_ms"] == rows[("server", 1)]["overhead_p50_ms"]
    assert s["server_minus_direct_p50_ms"] == pytest.approx(rows[("server", 1)]["p50_ms"] - rows[("direct", 1)]["p50_ms"])
    assert s["batching_throughput_ratio_c3"] == pytest.approx(rows[("server+batching", 3)]["images_per_s"]
                                                              / rows[("server", 3)]["images_per_s"])
    assert "| server+batching | 3 |" in (out / "bench-serve.md").read_text()
    code, stderr = cli(["bench-serve", "--onnx", fp32_exports["dev"], "--out", out, "--concurrency", "1,x"])
    assert code == 2 and "--concurrency" in stderr
