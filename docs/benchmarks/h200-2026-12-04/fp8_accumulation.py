"""Fluxrt's Fp8Linear at the FLUX transformer's product shapes (1024x1024 image + 512 tokens, its fused products),
float32 accumulation against cuBLASLt's FP8 fast accumulation: time per product through ONNX Runtime CUDA (IO
binding, device buffers; the op's quantizer in front of it, the same in both) and each product's error against a
float64 product of the same E4M3 operands. Writes JSON and prints a markdown table.

    FLUXRT_ORT_OPS=<library> python3 docs/benchmarks/h200-2026-12-04/fp8_accumulation.py OUT.json
"""

import json
import os
import sys
import time

import ml_dtypes
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# (M, K, N, what): image stream 4096 rows, text 512, single blocks 4608
SHAPES = [(4096, 3072, 9216, "double block image q,k,v (fused)"), (512, 3072, 9216, "double block text q,k,v (fused)"),
          (4096, 3072, 3072, "double block image out projection"), (4096, 3072, 12288, "double block image MLP up"),
          (4096, 12288, 3072, "double block image MLP down"), (4608, 3072, 21504, "single block q,k,v,MLP (fused)"),
          (4608, 3072, 3072, "single block out, attention columns"), (4608, 12288, 3072, "single block out, MLP columns")]


def model(K: int, N: int, seed: int, fast: bool):
    g = np.random.default_rng(seed)
    w = g.standard_normal((N, K)).astype(np.float32) * g.uniform(0.2, 2, (N, 1)).astype(np.float32)
    w_scale = (np.abs(w).max(axis=1) / 448).astype(np.float32)
    w8 = (w / w_scale[:, None]).astype(ml_dtypes.float8_e4m3fn)
    bias = g.standard_normal(N).astype(np.float16)
    w_init = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [N, K], w8.view(np.uint8).tobytes(), raw=True)
    xs = numpy_helper.from_array(np.array(4.0 / 448, np.float32), "xs")
    nodes = [helper.make_node("QuantizeFp8", ["x", "xs"], ["x8"], domain="fluxrt"),
             helper.make_node("Fp8Linear", ["x8", "xs", "w8", "ws", "b"], ["y"], domain="fluxrt",
                              **({"fast_accumulation": 1} if fast else {}))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              [xs, w_init, numpy_helper.from_array(w_scale, "ws"), numpy_helper.from_array(bias, "b")])
    m = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("fluxrt", 1)])
    return m, w8.astype(np.float64) * w_scale[:, None].astype(np.float64), bias.astype(np.float64)


def gpu_name() -> str:
    import subprocess

    return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip().splitlines()[0]


def main(out: str) -> None:
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(os.environ["FLUXRT_ORT_OPS"])
    rows = []
    for M, K, N, what in SHAPES:
        g = np.random.default_rng(M + K + N)
        x = np.clip(g.standard_normal((M, K)), -4, 4).astype(np.float16)
        x8 = (x.astype(np.float32) / np.float32(4.0 / 448)).astype(ml_dtypes.float8_e4m3fn)
        row = dict(M=M, K=K, N=N, what=what)
        for fast in (False, True):
            m, w, b = model(K, N, 0, fast)
            sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CUDAExecutionProvider"])
            xv = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            yv = ort.OrtValue.ortvalue_from_shape_and_type([M, N], np.float16, "cuda", 0)
            bind = sess.io_binding()
            bind.bind_ortvalue_input("x", xv)
            bind.bind_ortvalue_output("y", yv)
            for _ in range(3):
                sess.run_with_iobinding(bind)
            times = []
            for _ in range(20):
                t = time.perf_counter()
                sess.run_with_iobinding(bind)
                times.append((time.perf_counter() - t) * 1e3)
            want = x8.astype(np.float64) * (4.0 / 448) @ w.T + b
            got = yv.numpy().astype(np.float64)
            err = np.abs(got - want)
            key = "fast" if fast else "fp32"
            row[f"{key}_ms"] = float(np.median(times))
            row[f"{key}_tflops"] = 2 * M * K * N / (row[f"{key}_ms"] * 1e-3) / 1e12
            row[f"{key}_max_err"] = float(err.max() / np.abs(want).max())
            row[f"{key}_rel_rms"] = float(np.sqrt((err ** 2).mean() / (want ** 2).mean()))
        row["fast_vs_fp32"] = row["fast_ms"] / row["fp32_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = {k: sum(r[f"{k}_ms"] for r in rows) for k in ("fp32", "fast")}
    with open(out, "w") as f:
        json.dump(dict(rows=rows, total_ms=total, onnxruntime=ort.__version__, gpu=gpu_name()), f, indent=1)
    print("| product | M x K x N | fp32 acc. ms (TFLOP/s) | fast acc. ms (TFLOP/s) | fast / fp32 | rel. RMS error fp32 / fast | max error fp32 / fast |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['what']} | {r['M']}x{r['K']}x{r['N']} | {r['fp32_ms']:.3f} ({r['fp32_tflops']:.0f}) | "
              f"{r['fast_ms']:.3f} ({r['fast_tflops']:.0f}) | {r['fast_vs_fp32']:.3f} | "
              f"{r['fp32_rel_rms']:.2e} / {r['fast_rel_rms']:.2e} | {r['fp32_max_err']:.2e} / {r['fast_max_err']:.2e} |")


if __name__ == "__main__":
    main(sys.argv[1])
