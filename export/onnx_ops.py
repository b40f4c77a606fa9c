"""ONNX Runtime operators (and fluxrt's own) as onnxscript ops for the dynamo exporter's translation
tables: onnx has no schemas for them, and the exporter's op recorder needs one to build a node."""

from __future__ import annotations

import functools

from fluxrt.components import MSFT_DOMAIN


def ort_op(domain: str, name: str, inputs: list[str], attributes: dict[str, object],
           float32_inputs: tuple[str, ...] = ()):
    """An onnxscript op for an ONNX Runtime operator (or a custom one), with the part of its schema
    used here: onnx has no schemas for these ops and the exporter's op recorder needs one to build
    the node. ``inputs``: names, "name?" for an optional one; ``float32_inputs``: those that are
    float32 whatever the model dtype; ``attributes``: name -> ``onnx.defs.OpSchema.AttrType``."""
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    option = OpSchema.FormalParameterOption
    params = [OpSchema.FormalParameter(i.rstrip("?"), "F" if i.rstrip("?") in float32_inputs else "T",
                                       param_option=option.Optional if i.endswith("?") else option.Single)
              for i in inputs]
    types = [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(int64)"], "")]
    if float32_inputs:
        types.append(("F", ["tensor(float)"], ""))
    schema = OpSchema(
        name, domain, 1, inputs=params, outputs=[OpSchema.FormalParameter("output", "T")], type_constraints=types,
        attributes=[OpSchema.Attribute(a, kind, required=False) for a, kind in attributes.items()],
    )
    return Op(Opset(domain, 1), name, schema)


@functools.cache
def mha_op():
    from onnx.defs import OpSchema

    return ort_op(MSFT_DOMAIN, "MultiHeadAttention", ["query", "key", "value"],
                  {"num_heads": OpSchema.AttrType.INT, "scale": OpSchema.AttrType.FLOAT})
