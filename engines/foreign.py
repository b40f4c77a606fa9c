"""ONNX folders fluxrt did not write, such as Black Forest Labs' published FLUX ONNX repositories
(``clip.opt/model.onnx``, ``t5.opt/model.onnx``, ``transformer.opt/<precision>/model.onnx``,
``vae.opt/model.onnx``): their graphs use the same tensor names, so each graph is recognised by
its inputs and outputs, the model's sizes are read from its declared shapes, and an in-memory
manifest lets the builder treat the folder like an export folder.

Only building engines is possible from such a folder: it carries no tokenizers or scheduler, so
generating needs an export folder of the same checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from fluxrt.artifacts import EXPORT_FORMAT
from fluxrt.components import ModelDims
from fluxrt.dtypes import DTYPE_PRECISION as PRECISION
from fluxrt.dtypes import from_onnx
from fluxrt.errors import ExportError


def graph_io(path: Path) -> tuple[dict, dict]:
    """{name: (dtype, shape)} of a graph's inputs and outputs, without loading its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        return {v.name: (from_onnx(v.type.tensor_type.elem_type),
                         [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values}

    return describe(model.graph.input), describe(model.graph.output)


def classify(inputs: dict, outputs: dict) -> str | None:
    if "hidden_states" in inputs and "encoder_hidden_states" in inputs:
        return "transformer"
    if set(inputs) == {"input_ids"}:
        return "clip" if "pooled_embeddings" in outputs else "t5"
    if set(inputs) == {"latent"} and "images" in outputs:
        return "vae_decoder"
    if set(inputs) == {"images"} and "latent" in outputs:
        return "vae_encoder"
    return None


def discover(root: Path) -> dict[str, Path]:
    """Component name -> graph, for every ``*.onnx`` below ``root`` whose I/O names match one."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.onnx")):
        name = classify(*graph_io(path))
        if name is None:
            continue
        if name in found:
            raise ExportError(f"{root}: two {name} graphs, {found[name]} and {path}; point fluxrt at a folder "
                              f"holding one of each (for example a copy with only the precision you want)")
        found[name] = path
    return found


def manifest_for(root: str | Path) -> dict:
    """A manifest equivalent to what ``fluxrt export`` writes, for a folder of foreign graphs."""
    root = Path(root)
    graphs = discover(root)
    if "transformer" not in graphs:
        raise ExportError(f"{root} has no manifest.json and no FLUX transformer graph (an ONNX file with inputs "
                          f"hidden_states, encoder_hidden_states, ...)")
    t_in, _ = graph_io(graphs["transformer"])
    act = t_in["hidden_states"][0]
    dims = dict(variant="dev" if "guidance" in t_in else "schnell", in_channels=t_in["hidden_states"][1][2],
                joint_attention_dim=t_in["encoder_hidden_states"][1][2],
                pooled_projection_dim=t_in["pooled_projections"][1][1])
    dims.update(clip_hidden_size=dims["pooled_projection_dim"], t5_d_model=dims["joint_attention_dim"],
                latent_channels=dims["in_channels"] // 4)
    components = {}
    for name, path in graphs.items():
        inputs, outputs = graph_io(path)
        floats = [d for d, _ in list(inputs.values()) + list(outputs.values()) if d in PRECISION]
        precision = PRECISION.get(floats[0], "fp32") if floats else "fp32"
        components[name] = {"file": str(path.relative_to(root)), "precision": precision,
                            "inputs": list(inputs), "outputs": list(outputs), "attention": "portable"}
    return {"format": EXPORT_FORMAT, "variant": dims["variant"], "precision": PRECISION.get(act, "fp32"),
            "dims": ModelDims(**dims).to_json(), "components": components,
            "source": {"path": str(root.resolve()), "fingerprint": None, "foreign": True}}
