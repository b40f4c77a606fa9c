"""``fluxrt quantize``: an FP8 export folder from an fp16 or bf16 one, one calibration for every engine.

    FP8_DIR/manifest.json          precision fp8 over the source's base_precision; the transformer's record
                                   carries its quantization (calibration record, source fingerprint)
    FP8_DIR/transformer.onnx       the FP8 graph (+ .data), from ``fp8.calibrate_fp8``: Q/DQ pairs (ModelOpt), or
                                   for an ``--attention ort-kernels`` export fluxrt's FP8 ops (``fp8_ort``)
    FP8_DIR/transformer.json       its calibration record: every setting, library versions, both fingerprints
    FP8_DIR/clip.onnx ...          the source's other graphs (hard links where possible, else copies); tokenizer/ tokenizer_2/ scheduler/ vae/

It is an export folder like any other (``fluxrt.artifacts``): the runtime runs it with ONNX Runtime
(``fluxrt generate --onnx FP8_DIR``), and ``fluxrt build FP8_DIR --precision fp8`` builds TensorRT plans
from the same graph and scales without calibrating again. The manifest is written last; a second run with
the same source and settings keeps the calibrated graph.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path

from fluxrt.artifacts import EXPORT_MANIFEST, SIDE_FILES, ExportFolder, write_export_manifest
from fluxrt.components import STAGES
from fluxrt.errors import EngineError, ExportError
from fluxrt.files import atomic_path, read_json, remove_leftovers, replace_tree, separate_folders, sha256_file

GRAPH = "transformer.onnx"
RECORD = "transformer.json"


def log(msg: str) -> None:
    import sys

    print(f"[fluxrt quantize] {msg}", file=sys.stderr, flush=True)


def check_folders(source: ExportFolder, out_dir: Path) -> None:
    if source.foreign:
        raise EngineError(f"{source.root}: FP8 calibration runs the sampling loop, which needs a fluxrt export "
                          f"folder (tokenizers, scheduler); export the checkpoint with fluxrt export first")
    kernels = source.manifest.get("components", {}).get("transformer", {}).get("attention") == "ort-kernels"
    if source.precision not in ("fp16", "bf16") and not (kernels and source.precision == "fp32"):
        raise EngineError(f"export folder {source.root} holds {source.precision} graphs; fluxrt quantize takes an "
                          f"fp16 or bf16 export (FP8 linears, the rest in that precision), or an fp32 one exported "
                          f"with --attention ort-kernels (whose FP8 graph ONNX Runtime also runs on the CPU)")
    separate_folders(source.root, out_dir, "the source export folder", "--out", EngineError)
    if (out_dir / EXPORT_MANIFEST).is_file():
        manifest = read_json(out_dir / EXPORT_MANIFEST, "export manifest", ExportError)
        previous = (manifest.get("quantized_from") or {}).get("manifest_sha256")
        if previous != sha256_file(source.root / EXPORT_MANIFEST):
            raise EngineError(f"{out_dir} already holds another export ({manifest.get('precision')} of "
                              f"{(manifest.get('source') or {}).get('path')}); use another folder")


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` made a hard link to ``src`` where the file system allows (no second copy of a T5 of 9 GB; every
    writer of fluxrt replaces files by renaming, so a later export into the source leaves the link's data as
    it was), else a copy; either appears under its name only when complete."""
    staged = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    staged.unlink(missing_ok=True)
    try:
        os.link(src, staged)
    except OSError:  # another file system, or links not supported: copy
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return
    os.replace(staged, dst)


def copy_verified(source: ExportFolder, name: str, out_dir: Path) -> dict:
    """Every file of graph ``name`` linked or copied into ``out_dir`` (unless already there, byte for byte); its
    record."""
    source.verified_graph(name)
    record = source.record(name)
    for file, digest in record["fingerprint"]["files"].items():
        target = out_dir / file
        if target.is_file() and sha256_file(target) == digest:
            continue
        link_or_copy(source.root / file, target)
    return record


def quantize_export(export_dir: str | Path, out_dir: str | Path, settings) -> dict:
    """Write the FP8 export folder of ``export_dir`` to ``out_dir`` (see the module doc); return its manifest.
    ``settings``: a ``fluxrt.engines.fp8.Fp8Settings``."""
    from fluxrt.engines.fp8 import check_calibration

    source = ExportFolder.open(export_dir)
    out_dir = Path(out_dir)
    check_folders(source, out_dir)
    missing = [s for s in STAGES if s not in source.manifest.get("components", {})]
    if missing:
        raise EngineError(f"export folder {source.root} has no {missing} graphs; calibration runs the whole "
                          f"pipeline (export them with fluxrt export --components ...)")
    check_calibration(settings, source)  # before anything is written
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return write_fp8_export(source, out_dir, settings)
    except BaseException:
        if created:  # nothing of it to keep: a folder this call made and did not finish
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def write_fp8_export(source: ExportFolder, out_dir: Path, settings) -> dict:
    from fluxrt.engines.fp8 import calibrate_fp8, reusable_calibration

    (out_dir / EXPORT_MANIFEST).unlink(missing_ok=True)  # written again last: a folder without it is unfinished
    remove_leftovers(out_dir, *(f".{sub}.tmp-*" for sub in SIDE_FILES))  # a killed earlier run's copies
    for sub in SIDE_FILES:
        replace_tree(source.root / sub, out_dir / sub)
    records = {name: copy_verified(source, name, out_dir) for name in source.manifest["components"]
               if name != "transformer"}
    origin = source.record("transformer")
    source_fingerprint = origin["fingerprint"]["sha256"]
    calibration = asdict(settings)
    record = reusable_calibration(out_dir / GRAPH, source_fingerprint, calibration)
    if record is None:  # calibration verifies every graph it runs, the transformer included
        record = calibrate_fp8(source.root, out_dir / GRAPH, settings=settings)
    else:
        log(f"transformer: {out_dir / GRAPH} is calibrated from this source with these settings; kept")
    records["transformer"] = dict(
        origin, file=GRAPH, fingerprint=record["fingerprint"],
        quantization=dict(mode="fp8", record=RECORD, source_fingerprint=source_fingerprint,
                          quantized=len(record["quantized"]), excluded=len(record["excluded"])))
    manifest = dict(source.manifest, precision="fp8", base_precision=source.precision, components=records,
                    quantized_from=dict(path=str(source.root.resolve()),
                                        manifest_sha256=sha256_file(source.root / EXPORT_MANIFEST)))
    write_export_manifest(out_dir, manifest)
    return ExportFolder.open(out_dir).manifest
