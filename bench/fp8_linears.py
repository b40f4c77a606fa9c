"""FLUX's block linears at full size (M = 4608 tokens: a 1024x1024 image and 512 text tokens) under
ONNX Runtime CUDA, side by side in one process: the bf16 MatMul of the ort-kernels graph, fluxrt's
Fp8Linear (cuBLASLt, per-channel weight scales and the bias in its epilogue), the separate
QuantizeFp8 pass, and torch's ``_scaled_mm`` (cuBLASLt FP8, per-tensor scales) for reference.

Each ONNX graph holds ``--repeat`` copies of the op over one input, replayed as one CUDA graph, so
ONNX Runtime's per-call host work is spread over them; a row's time is per op.

    python -m fluxrt.bench.fp8_linears --out DIR      # DIR/fp8_linears.json (needs onnxruntime-gpu, torch, the op library)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# (K, N) of FLUX's block linears in the ort-kernels graph: attention projections, MLP in, MLP out (the single
# blocks' 15360-wide output projection is split there into its 3072 and 12288 column blocks)
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072)]


def session(model, library: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])


def graph(kind: str, M: int, K: int, N: int, repeat: int):
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    w = (g.standard_normal((N, K)) * 0.02).astype(np.float32)
    ws = (np.abs(w).max(1) / 448).astype(np.float32)
    inits, nodes, outs = [], [], []
    x_type = {"bf16": TensorProto.BFLOAT16, "fp8": TensorProto.FLOAT8E4M3FN, "quantize": TensorProto.BFLOAT16}[kind]
    if kind == "bf16":
        raw = w.T.copy().astype(ml_dtypes.bfloat16).tobytes()
        inits.append(TensorProto(name="w", data_type=TensorProto.BFLOAT16, dims=[K, N], raw_data=raw))
    elif kind == "fp8":
        q = np.clip(w / ws[:, None], -448, 448).astype(ml_dtypes.float8_e4m3fn)
        inits += [TensorProto(name="w", data_type=TensorProto.FLOAT8E4M3FN, dims=[N, K], raw_data=q.tobytes()),
                  numpy_helper.from_array(ws, "ws"), numpy_helper.from_array(np.array(0.01, np.float32), "xs"),
                  TensorProto(name="b", data_type=TensorProto.BFLOAT16, dims=[N],
                              raw_data=np.zeros(N, np.float32).astype(ml_dtypes.bfloat16).tobytes())]
    else:
        inits.append(numpy_helper.from_array(np.array(0.01, np.float32), "xs"))
    for i in range(repeat):
        out = f"y{i}"
        if kind == "bf16":
            nodes.append(helper.make_node("MatMul", ["x", "w"], [out]))
        elif kind == "fp8":
            nodes.append(helper.make_node("Fp8Linear", ["x", "xs", "w", "ws", "b"], [out], domain="fluxrt"))
        else:
            nodes.append(helper.make_node("QuantizeFp8", ["x", "xs"], [out], domain="fluxrt"))
        outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT8E4M3FN if kind == "quantize"
                                                  else TensorProto.BFLOAT16, None))
    g_ = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", x_type, [M, K])], outs, inits)
    return helper.make_model(g_, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
                                                                helper.make_opsetid("fluxrt", 1)])


def time_session(sess, M: int, K: int, N: int, x_type, quantize: bool, iters: int) -> float:
    """ms per replay of the session's CUDA graph, inputs and outputs bound to fixed device buffers."""
    import torch
    from onnx import TensorProto

    x = (torch.randn(M, K, device="cuda") * 0.5).to(x_type)
    binding = sess.io_binding()
    elem = {torch.bfloat16: TensorProto.BFLOAT16, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}[x_type]
    binding.bind_input("x", "cuda", 0, elem, [M, K], x.data_ptr())
    outs = []
    for o in sess.get_outputs():
        y = torch.empty((M, K if quantize else N), device="cuda", dtype=torch.uint8 if quantize else torch.bfloat16)
        outs.append(y)
        binding.bind_output(o.name, "cuda", 0, TensorProto.FLOAT8E4M3FN if quantize else TensorProto.BFLOAT16,
                            list(y.shape), y.data_ptr())
    for _ in range(3):
        sess.run_with_iobinding(binding)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        sess.run_with_iobinding(binding)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def time_scaled_mm(M: int, K: int, N: int, iters: int) -> float:
    import torch

    a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")

    def call():
        return torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def main(argv=None) -> int:
    import torch

    from fluxrt.bench.pipelines import machine_info
    from fluxrt.files import atomic_write_json
    from fluxrt.runtime.ort_ops import library_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokens", type=int, default=4608)
    p.add_argument("--repeat", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    library = str(library_path())
    M, rows = args.tokens, []
    x_types = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "quantize": torch.bfloat16}
    for K, N in SHAPES:
        for kind in ("bf16", "fp8", "quantize"):
            sess = session(graph(kind, M, K, N, args.repeat), library)
            ms = time_session(sess, M, K, N, x_types[kind], kind == "quantize", args.iters) / args.repeat
            flops = 0 if kind == "quantize" else 2 * M * K * N
            rows.append(dict(op={"bf16": "MatMul bf16", "fp8": "fluxrt Fp8Linear", "quantize": "QuantizeFp8 (bf16 in)"}
                                [kind], M=M, K=K, N=N, ms=round(ms, 4),
                             tflops=round(flops / ms / 1e9, 1) if flops else None))
            print(rows[-1], file=sys.stderr, flush=True)
            del sess
        ms = time_scaled_mm(M, K, N, args.iters)
        rows.append(dict(op="torch._scaled_mm (per-tensor)", M=M, K=K, N=N, ms=round(ms, 4),
                         tflops=round(2 * M * K * N / ms / 1e9, 1)))
        print(rows[-1], file=sys.stderr, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "fp8_linears.json", dict(machine=machine_info(), rows=rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
