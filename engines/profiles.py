"""Optimization-profile shapes from a user's shape envelope and a component's tensor spec.

The envelope is in user terms (batch, text tokens, image side in pixels); the spec's named
axes turn it into per-input (min, opt, max) shapes, so the builder never hard-codes a shape.
"""

from __future__ import annotations

from fluxrt.components import ComponentSpec, ModelDims, Range, ShapeEnvelope

Shape = tuple[int, ...]


def axis_sizes(envelope: ShapeEnvelope, dims: ModelDims) -> dict[str, Range]:
    """(min, opt, max) of every named axis.

    ``N`` (image tokens) runs from (min side / 16)^2 to (max side / 16)^2: a non-square image
    whose height and width both lie in ``image_side`` has N between those, so it fits.
    """
    f = dims.vae_scale_factor
    side = envelope.image_side
    bad = [s for s in side if s % (2 * f)]
    if bad:
        raise ValueError(f"image sides {bad} are not multiples of {2 * f} (VAE factor {f} x 2x2 latent patches)")
    return {
        "B": envelope.batch,
        "S": envelope.text_length,
        "N": tuple((s // (2 * f)) ** 2 for s in side),
        "h": tuple(s // f for s in side),
        "w": tuple(s // f for s in side),
        "H": side,
        "W": side,
    }


def profile_shapes(spec: ComponentSpec, envelope: ShapeEnvelope, dims: ModelDims) -> dict[str, tuple[Shape, Shape, Shape]]:
    """``{input name: (min shape, opt shape, max shape)}`` for one optimization profile."""
    uses_text = any("S" in t.shape for t in spec.inputs)
    if uses_text and envelope.text_length[2] > dims.t5_max_length:
        raise ValueError(f"{spec.name}: text length max {envelope.text_length[2]} exceeds the T5 max length "
                         f"{dims.t5_max_length} of this model")
    sizes = axis_sizes(envelope, dims)
    out = {}
    for t in spec.inputs:
        unknown = [d for d in t.shape if isinstance(d, str) and d not in sizes]
        if unknown:
            raise ValueError(f"{spec.name} input {t.name!r}: axes {unknown} have no envelope size; "
                             f"known axes are {sorted(sizes)}")
        out[t.name] = tuple(
            tuple(d if isinstance(d, int) else sizes[d][k] for d in t.shape) for k in range(3)
        )
    return out
