"""Which torch module an exported ONNX node came from: torch.onnx (dynamo) tags every node with the name
scopes and classes of the modules it was traced in (``pkg.torch.onnx.name_scopes`` /
``pkg.torch.onnx.class_hierarchy``). The graph's linears are found by it, whatever the attention mode
made of the module tree around them."""

from __future__ import annotations

import ast

# torch's Linear, and the ort-kernels export's bias-less product of one (export/ort_kernels.py)
LINEAR_CLASSES = ("torch.nn.modules.linear.Linear", "fluxrt.export.ort_kernels.BareLinear")


def module_origin(node) -> tuple[str, str] | None:
    """(module path, module class) of the torch module an ONNX node was exported from, if tagged."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"])
        classes = ast.literal_eval(meta["pkg.torch.onnx.class_hierarchy"])
    except (KeyError, ValueError, SyntaxError):
        return None
    if len(scopes) < 2 or len(classes) < 2:
        return None
    return scopes[-2], classes[-2]  # the last scope is the aten op inside the module
