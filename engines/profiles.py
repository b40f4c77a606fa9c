"""Optimization-profile shapes from a user's shape envelope and a component's tensor spec.

The envelope is in user terms (batch, text tokens, image side in pixels); the spec's named
axes turn it into per-input (min, opt, max) shapes, so the builder never hard-codes a shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxrt.components import ComponentSpec, ModelDims

Range = tuple[int, int, int]  # (min, opt, max)
Shape = tuple[int, ...]
SIDE_MULTIPLE = 16  # VAE factor 8 x 2x2 latent packing


def check_range(what: str, value: Range) -> None:
    if (not isinstance(value, tuple) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"ShapeEnvelope.{what} must be a (min, opt, max) tuple of ints, got {value!r}")
    lo, opt, hi = value
    if not 0 < lo <= opt <= hi:
        raise ValueError(f"ShapeEnvelope.{what} {value}: need 0 < min <= opt <= max")


@dataclass(frozen=True)
class ShapeEnvelope:
    """The shapes an engine accepts, in user terms: (min, opt, max) of each.

    ``text_length`` is T5 tokens (512 for dev; pass (1, 256, 256) for schnell); CLIP is always
    its fixed length.  ``image_side`` bounds both image height and width, in pixels.
    """

    batch: Range = (1, 1, 4)
    text_length: Range = (1, 512, 512)
    image_side: Range = (512, 1024, 1536)

    def __post_init__(self) -> None:
        check_range("batch", self.batch)
        check_range("text_length", self.text_length)
        check_range("image_side", self.image_side)
        bad = [s for s in self.image_side if s % SIDE_MULTIPLE]
        if bad:
            raise ValueError(f"ShapeEnvelope.image_side {self.image_side}: {bad} not a multiple of "
                             f"{SIDE_MULTIPLE} pixels (VAE factor 8 x 2x2 latent patches)")


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
