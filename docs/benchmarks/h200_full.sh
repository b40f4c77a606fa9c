#!/usr/bin/env bash
# The whole FLUX.1-dev end to end on one GPU machine (bench/full.py), as one background job that outlives the
# machine's 10-minute command limit: started with `setsid`, its log polled by later commands.
#   bash docs/benchmarks/h200_full.sh setup            # wheels (onnxruntime-gpu from /tmp/carry, .gpu/wheels), op library
#   bash docs/benchmarks/h200_full.sh start ROOT OUT   # prepare, export bf16, quantize fp8, run: in the background
#   bash docs/benchmarks/h200_full.sh poll ROOT OUT    # the log's tail; copies OUT's files to $OUT when done
#   bash docs/benchmarks/h200_full.sh gpu-tests        # the GPU tests of fluxrt's kernels, FP8 too (log in $OUT)
#   bash docs/benchmarks/h200_full.sh serve [DIR]      # fluxrt bench-serve, trained tiny model, fp16 ORT CUDA
# FP16=1 first runs bf16 beside an fp16 transformer (exported alone, the rest linked from bf16; results in OUT-fp16,
# with FP16_TORCH's rows, default eager; its failure does not stop the fp8 run), then deletes it; FP8_ATTENTION=1 quantizes with --fp8-attention, FP8_FAST=1 with --fp8-fast-accumulation; PRECISIONS (default bf16,fp8) and TORCH_MODES pick the rows;
# CALIBRATION_STEPS (default 1) the sampling steps FP8 is calibrated on; PROFILE=N profiles N transformer steps of
# every row under CUPTI (kernel time by kind in results.md); LORA_RANK=R swaps a seeded rank-R LoRA into each fluxrt row.
set -uo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
pkg=/tmp/pkg
export PYTHONPATH=$pkg:/tmp/site PYTHONUNBUFFERED=1 FLUXRT_ORT_OPS=/tmp/ops/libfluxrt_ort_ops.so
case "$1" in
  setup)
    set -e
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      /tmp/carry/*.whl "$repo"/.gpu/wheels/*.whl
    rm -rf $pkg && mkdir -p $pkg && cp -r "$repo/fluxrt" $pkg/fluxrt
    for stage in export engines runtime bench serve train; do ln -s "$repo/$stage" $pkg/fluxrt/$stage; done
    cd /tmp && python3 -m fluxrt.cli ort-ops build --out /tmp/ops/libfluxrt_ort_ops.so --cuda-archs 90 \
      --ort-include "$repo/.gpu/ort-include"
    python3 -c "import torch, onnxruntime as o, diffusers; print(torch.__version__, o.__version__, o.get_available_providers(), diffusers.__version__)"
    python3 -c "import torchao; print('torchao', torchao.__version__)" || echo "no torchao: --torch torchao-fp8 needs its wheel in .gpu/wheels"
    df -h /tmp; free -g ;;
  start)
    root=$2; out=$3
    cd /tmp
    setsid nohup bash -c "
      set -e
      date; python3 -m fluxrt.bench.full prepare $root
      python3 -m fluxrt.bench.full export $root --precision bf16 --device cuda
      if [ -n \"${FP16:-}\" ]; then  # bf16 beside fp16 first (the disk holds no third full-size transformer)
        if python3 -m fluxrt.bench.full export $root --precision fp16 --components transformer --others-from bf16 --device cuda; then
          python3 -m fluxrt.bench.full run $root --out $out-fp16 --precisions bf16,fp16 --torch ${FP16_TORCH:-eager} --device cuda --iters 5 --generation-iters 2 \
            || echo 'FP16-RUN-FAILED (the fp8 run goes on)'
        else echo 'FP16-EXPORT-FAILED (the fp8 run goes on)'; fi
        rm -rf $root/onnx-fp16; date
      fi
      date; python3 -m fluxrt.cli quantize $root/onnx-bf16 --out $root/onnx-fp8 --calibration-prompts 1 \
        --calibration-steps ${CALIBRATION_STEPS:-1} --calibration-size 1024 --calibration-text-length 512 --calibration-backend ort-cuda \
        ${FP8_ATTENTION:+--fp8-attention} ${FP8_FAST:+--fp8-fast-accumulation}
      date; df -h /tmp
      python3 -m fluxrt.bench.full run $root --out $out --precisions ${PRECISIONS:-bf16,fp8} --torch ${TORCH_MODES:-eager,compile,torchao-fp8} --device cuda --iters 5 --generation-iters 2 --profile ${PROFILE:-0} --lora-rank ${LORA_RANK:-0}
      date; echo FULL-DONE" > $root.log 2>&1 < /dev/null &
    echo started ;;
  poll)
    root=$2; out=$3
    tail -c 6000 $root.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    mkdir -p "$OUT/full" "$OUT/full-fp16"; cp $root.log "$OUT/full/run.log"; cp $out/* "$OUT/full/" 2>/dev/null
    cp $out-fp16/* "$OUT/full-fp16/" 2>/dev/null; true ;;
  serve)
    # fluxrt bench-serve on the shipped trained tiny model in fp16 on ORT CUDA (needs the serve wheels in .gpu/wheels)
    set -e
    out=${2:-$OUT/serve}; mkdir -p "$out"; cd /tmp
    [ -d /tmp/trained ] || python3 -m fluxrt.cli tiny-model /tmp/trained --trained
    [ -d /tmp/onnx-trained-fp16 ] || python3 -m fluxrt.cli export /tmp/trained --out /tmp/onnx-trained-fp16 --precision fp16
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
    python3 -m fluxrt.cli bench-serve --onnx /tmp/onnx-trained-fp16 --backend ort-cuda --size 128x128 --steps 12 \
      --requests 32 --concurrency ${SERVE_CONCURRENCY:-1,4,8,16} --max-batch 8 --out "$out" 2>&1 | tee "$out/run.log" | tail -8 ;;
  gpu-tests)
    # from /tmp: in the checkout, its fluxrt/ folder (the shared layer alone) would shadow /tmp/pkg's package
    cd /tmp && python3 -m pytest "$repo/tests/test_fp8_kernels.py" "$repo/tests/test_ort_kernels.py" "$repo/tests/test_gpu_runtime.py" -m gpu -q -s \
      -p no:cacheprovider --rootdir "$repo" 2>&1 | tee "$OUT/gpu-tests.log" | tail -40 ;;
esac
