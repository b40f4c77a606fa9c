"""The import rule of docs/architecture.md, read from the source with ``ast`` (imports inside functions
included): the shared layer ``fluxrt/`` imports no stage; the runtime imports neither export nor engines;
export imports neither engines nor runtime; engines may import the runtime (FP8 calibration runs its
loop), never the reverse; benchmarks import what they measure and nothing imports them; only the CLI
wires everything; no module imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"fluxrt": "fluxrt", "export": "fluxrt.export", "engines": "fluxrt.engines", "runtime": "fluxrt.runtime",
           "serve": "fluxrt.serve", "bench": "fluxrt.bench", "train": "fluxrt.train"}
# layer of a module -> the layers it may import besides its own
ALLOWED = {
    "shared": set(),
    "export": {"shared"},
    "engines": {"shared", "runtime"},
    "runtime": {"shared"},
    "serve": {"shared", "runtime"},
    "bench": {"shared", "export", "engines", "runtime"},
    "train": {"shared", "export", "runtime"},  # the tiny model's builders, and the sampler's own shift and ids
    "cli": {"shared", "export", "engines", "runtime", "serve", "bench", "train"},
}


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package,) + parts).removesuffix(".__init__")
            out[name] = path
    return out


def layer(module: str) -> str:
    if module == "fluxrt.cli":
        return "cli"
    for stage in ("export", "engines", "runtime", "serve", "bench", "train"):
        if module == f"fluxrt.{stage}" or module.startswith(f"fluxrt.{stage}."):
            return stage
    return "shared"


def imports(path: Path, known: set[str]) -> set[str]:
    """The fluxrt modules ``path`` imports, anywhere in it (``from a import b`` counts as a.b when
    that is a module, else as a)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fluxrt"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fluxrt"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(path, known) - {name} for name, path in mods.items()}


def test_every_module_is_seen(graph):
    """The parser finds the modules the rule is about (a rule over nothing would pass)."""
    for name in ("fluxrt.components", "fluxrt.artifacts", "fluxrt.runtime.pipeline", "fluxrt.engines.fp8",
                 "fluxrt.export.onnx_export", "fluxrt.bench.synthetic", "fluxrt.runtime.ort_ops.build",
                 "fluxrt.runtime.lora", "fluxrt.lora", "fluxrt.node_origin", "fluxrt.export.lora"):
        assert name in graph
    assert "fluxrt.runtime.loop" in graph["fluxrt.runtime.pipeline"]
    assert "fluxrt.runtime.lora" in graph["fluxrt.runtime.ort"]  # a lazy import, inside a method
    assert "fluxrt.runtime.pipeline" in graph["fluxrt.engines.fp8"]  # a lazy import, inside a function


def test_layers_import_only_what_they_may(graph):
    bad = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in sorted(graph.items()) for d in sorted(deps)
           if layer(d) != layer(m) and layer(d) not in ALLOWED[layer(m)]]
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


TORCH_SIDE = ("torch", "diffusers", "peft", "transformers", "safetensors", "accelerate", "modelopt")


def third_party_imports(path: Path) -> set[str]:
    """The top-level packages ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_runtime_and_shared_layer_import_no_torch_side_library():
    """The runtime (LoRA merging included) and the shared layer it stands on never import torch, diffusers,
    peft or transformers, even lazily; the CLI may (it wires the export side in)."""
    mods = modules()
    bad = [f"{name} imports {sorted(third_party_imports(path) & set(TORCH_SIDE))}" for name, path in sorted(mods.items())
           if layer(name) in ("runtime", "shared") and third_party_imports(path) & set(TORCH_SIDE)]
    assert not bad, "\n".join(bad)
    assert "numpy" in third_party_imports(mods["fluxrt.runtime.lora"])  # the check reads real imports


def test_no_import_cycles(graph):
    # a package's __init__ re-exporting its own modules is not a cycle of ideas; leave those edges out
    edges = {m: {d for d in deps if not (m.startswith(d + ".") and d in graph)} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_rule_catches_a_forbidden_edge(tmp_path, monkeypatch):
    """The checker itself: a runtime module importing the exporter, even lazily, is reported."""
    pkg = tmp_path / "runtime"
    pkg.mkdir()
    (pkg / "bad.py").write_text("def f():\n    from fluxrt.export.checkpoint import Checkpoint\n")
    found = imports(pkg / "bad.py", {"fluxrt.export.checkpoint"})
    assert found == {"fluxrt.export.checkpoint"}
    assert layer("fluxrt.export.checkpoint") not in ALLOWED[layer("fluxrt.runtime.bad")]


def test_cli_backend_choices_are_the_registry_and_torch():
    """The CLI lists the backends without importing the runtime; the list is the registry's."""
    from fluxrt.cli import BACKEND_CHOICES
    from fluxrt.runtime.backends import BACKENDS, TORCH_BACKEND

    assert sorted(BACKEND_CHOICES) == sorted([*BACKENDS, TORCH_BACKEND])
