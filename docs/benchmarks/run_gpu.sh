#!/usr/bin/env bash
# Runs the synthetic full-size benchmark on a GPU machine that has torch (CUDA), transformers,
# onnx, onnxscript, cupy and onnxruntime-gpu, from a checkout of this repository, without
# installing it: the fluxrt namespace is assembled from the stage folders with symlinks.
#   bash docs/benchmarks/run_gpu.sh OUT_DIR [fluxrt bench-synthetic arguments...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$1"; shift
pkg="$(mktemp -d)"
cp -r "$repo/fluxrt" "$pkg/fluxrt"
for stage in export engines runtime bench; do ln -s "$repo/$stage" "$pkg/fluxrt/$stage"; done
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$pkg"  # not the checkout: its fluxrt/ folder lacks the stage packages
python3 -c "import torch, onnxruntime as ort; print('torch', torch.__version__, torch.cuda.get_device_name(0)); print('onnxruntime', ort.__version__, ort.get_available_providers())"
python3 -m fluxrt.bench.synthetic --out "$out" "$@" 2>&1 | tee "$out.log"
