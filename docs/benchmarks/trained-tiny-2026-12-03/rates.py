"""Adherence rates of the trained tiny model per precision and backend (tests/test_trained_model.py's grid):
    FLUXRT_ORT_OPS=path/to/libfluxrt_ort_ops.so .venv/bin/python docs/benchmarks/trained-tiny-2026-12-03/rates.py WORK
writes WORK/rates.json (the exports and the FP8 folder under WORK)."""
import json, os, subprocess, sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))
import numpy as np
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
fx = str(REPO / ".venv" / "bin" / "fluxrt")
ck = root / "ckpt"
if not ck.exists():
    subprocess.run([fx, "tiny-model", ck, "--trained"], check=True)
procs = []
for name, args in (("fp32", ["--precision", "fp32"]), ("fp16", ["--precision", "fp16"]),
                   ("kernels", ["--precision", "fp32", "--attention", "ort-kernels"])):
    if not (root / name / "manifest.json").exists():
        procs.append(subprocess.Popen([fx, "export", ck, "--out", root / name, *args], stderr=subprocess.DEVNULL))
for p in procs: p.wait()
lib = os.environ["FLUXRT_ORT_OPS"]
if not (root / "fp8" / "manifest.json").exists():
    subprocess.run([fx, "quantize", root / "kernels", "--out", root / "fp8", "--calibration-prompts", "4", "--calibration-steps", "4",
                    "--calibration-size", "64", "--calibration-text-length", "64"], check=True, stderr=subprocess.DEVNULL)
import test_trained_model as t
from fluxrt.runtime import FluxPipeline
from fluxrt.artifacts import ExportFolder
from fluxrt.export.torch_runner import torch_runners
out = {}
for name in ("fp32", "fp16", "fp8"):
    out[name + " ort-cpu"] = t.rate(FluxPipeline.load(root / name, backend="ort-cpu"))
out["fp32 torch"] = t.rate(FluxPipeline.load(root / "fp32", runners=torch_runners(ExportFolder.open(root / "fp32"))))
sw = FluxPipeline.load(root / "fp32", backend="ort-cpu")
for n in ("clip", "t5"): sw.runners[n] = t.Rewired(sw.runners[n], "input_ids", lambda ids: ids[::-1].copy())
out["fp32 swapped text"] = t.rate(sw)
ug = FluxPipeline.load(root / "fp32", backend="ort-cpu")
ug.runners["transformer"] = t.Rewired(ug.runners["transformer"], "guidance", np.zeros_like)
out["fp32 guidance zeroed"] = t.rate(ug)
print(json.dumps(out, indent=1))
json.dump(out, open(root / "rates.json", "w"), indent=1)
