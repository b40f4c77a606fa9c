"""``fluxrt serve --ray``: a local Ray cluster on the CPU with two replicas of the tiny fp32 export, real HTTP
clients; one replica's process killed while requests are in flight.  Every wait is bounded."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from test_serve import bench_report, free_port, get, pngs, post, reference

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

REPLICA = "ServeReplica:fluxrt:fluxrt"  # the replicas' process titles
START_S = 150


def replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", REPLICA], capture_output=True, text=True).stdout
    return sorted(int(pid) for pid in out.split())


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"{what} within {seconds} s")


@pytest.fixture(scope="module")
def pipe(fp32_exports):
    from fluxrt.runtime import FluxPipeline

    return FluxPipeline.load(fp32_exports["dev"])


def test_two_replicas_serve_and_survive_one_killed(fp32_exports, pipe, tmp_path):
    if replica_pids():
        pytest.skip("another fluxrt Ray deployment runs on this machine")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "fluxrt.cli", "serve", "--ray", "--replicas", "2", "--onnx",
                             str(fp32_exports["dev"]), "--port", str(port), "--max-batch", "4", "--batch-wait-ms", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "RAY_ADDRESS": "", "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"fluxrt serve --ray exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
            return len(replica_pids()) == 2 and get_ok(url, "/readyz")

        wait_until(ready, START_S, "two replicas ready")
        first = replica_pids()

        body = {"prompt": "a red circle", "size": "32x48", "num_inference_steps": 2, "seed": 11}
        status, answer, _ = post(url, body, timeout=60)
        assert status == 200, answer
        want = reference(pipe, "a red circle", "32x48", 2, 11)[0]
        assert np.array_equal(np.asarray(pngs(answer)[0].convert("RGB")), want)

        bodies = [{"prompt": f"load {i}", "size": "32x32", "num_inference_steps": 3, "seed": i} for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, url, b, 90) for b in bodies]
            time.sleep(1.0)
            victim = first[0]
            subprocess.run(["kill", "-9", str(victim)], check=True)
            answers = [f.result(timeout=120) for f in futures]
        served = 0
        for b, (status, answer, _) in zip(bodies, answers):
            if status == 200:  # served by either replica: the right image
                got = np.asarray(pngs(answer)[0].convert("RGB"))
                assert np.array_equal(got, reference(pipe, b["prompt"], "32x32", 3, b["seed"])[0]), b
                served += 1
            else:  # refused: a server error with a message (fluxrt's, or Ray's proxy's for the lost replica's
                assert status >= 500 and (answer.get("error") or answer.get("raw")), (status, answer)  # requests)
        assert served >= 1, [a[0] for a in answers]  # the surviving replica served

        back = wait_until(lambda: len(replica_pids()) == 2 and victim not in replica_pids() and replica_pids(),
                          START_S, "Ray restarting the killed replica")
        assert victim not in back
        wait_until(lambda: post(url, body, timeout=60)[0] == 200, 60, "serving after the restart")
    finally:
        err = ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                err = proc.communicate(timeout=60)[1] or ""
            except subprocess.TimeoutExpired:
                proc.kill()
                err = proc.communicate()[1] or ""
    assert proc.returncode == 0, f"exit {proc.returncode} after SIGTERM; its stderr ends: {err[-3000:]}"
    wait_until(lambda: not replica_pids(), 30, "the replicas gone after SIGTERM")


def get_ok(url: str, path: str) -> bool:
    try:
        return get(url, path)[0] == 200
    except OSError:
        return False


def test_bench_serve_ray_rows_for_one_and_two_replicas(fp32_exports, tmp_path):
    """``fluxrt bench-serve --ray-replicas 1,2`` on CPU replicas of the tiny model: rows for each count and
    concurrency, every request answered, the answers told apart by replica (X-Fluxrt-Replica: process and GPU),
    two replicas both answering, the summary's ratios the rows' arithmetic."""
    if replica_pids():
        pytest.skip("another fluxrt Ray deployment runs on this machine")
    from cli_calls import cli

    out = tmp_path / "bench"
    report, rows = bench_report(fp32_exports["dev"], out, "--concurrency", "1,2", "--max-batch", "2",
                                "--ray-replicas", "1,2")
    assert set(rows) == {(m, c) for m in ("ray x1", "ray x2") for c in (1, 2)}
    assert all(r["failed"] == 0 and r["requests"] == 6 and sum(r["replicas"].values()) == 6 for r in rows.values())
    assert all(len(r["replicas"]) == 1 for m, r in rows.items() if m[0] == "ray x1")
    assert all(k.startswith("pid=") and k.endswith("; gpu=none") for r in rows.values() for k in r["replicas"])
    s = report["summary"]
    assert s["replicas_answering"] == 2 and s["gpus"] == ["none"]
    assert s["throughput_x2_vs_x1_c2"] == pytest.approx(rows[("ray x2", 2)]["images_per_s"]
                                                        / rows[("ray x1", 2)]["images_per_s"])
    assert s["p50_x2_vs_x1_c1"] == pytest.approx(rows[("ray x2", 1)]["p50_ms"] / rows[("ray x1", 1)]["p50_ms"])
    assert "requests per replica: `pid=" in (out / "bench-serve.md").read_text()
    code, stderr = cli(["bench-serve", "--onnx", fp32_exports["dev"], "--out", out, "--ray-replicas", "0"])
    assert code == 2 and "--ray-replicas must be integers >= 1, got '0'" in stderr
