"""One description of every component's tensors, shared by all three stages.

The exporter takes input/output names and dynamic axes from here, the engine
builder its optimization-profile inputs, the runtime its feeds.  Names are the
ones of Black Forest Labs' published FLUX ONNX files and never get translated.

Units, fixed at every boundary:
- ``timestep`` is the flow-matching sigma, float32 in [0, 1] (the transformer
  multiplies by 1000 internally, as diffusers' and BFL's models do);
- ``guidance`` is the guidance scale itself (for example 3.5), float32;
- ``img_ids`` / ``txt_ids`` are float32 position ids;
- ``latent`` into the VAE decoder is already unscaled
  (``latent / scaling_factor + shift_factor``), which the runtime does on the host.

Named dynamic axes: ``B`` batch, ``S`` text length, ``N`` image tokens
(``(H/16) * (W/16)``), ``h``/``w`` latent height/width (``H/8``, ``W/8``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxrt.dtypes import PRECISION_DTYPE

ACT = "act"  # the floating dtype of the graph's precision
DTYPES = ("int32", "float32", ACT)
PRECISIONS = ("fp32", "fp16", "bf16")
COMPONENTS = ("clip", "t5", "transformer", "vae_decoder", "vae_encoder")
STAGES = ("clip", "t5", "transformer", "vae_decoder")  # what text-to-image runs; the VAE encoder is optional
OPTIONAL_STAGES = ("vae_encoder",)  # image-to-image only: made when first needed, and a folder may lack it
VARIANTS = ("dev", "schnell")
VARIANT_DEFAULTS = {  # each variant's published sampling settings
    "dev": dict(num_inference_steps=28, guidance_scale=3.5, max_sequence_length=512),
    "schnell": dict(num_inference_steps=4, guidance_scale=None, max_sequence_length=256),
}
# FLUX.1's VAE latent normalisation, for configs and single files that do not record it
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.1159
PAD_TOKENS = {"clip": "<|endoftext|>", "t5": "<pad>"}  # what FLUX's tokenizer/ and tokenizer_2/ pad with
# how the transformer's attention and element-wise work reach the graph: portable (standard ops,
# TensorRT fuses them), ort (ONNX Runtime's fused kernels), ort-kernels (ort plus fluxrt's own kernels)
ATTENTION_MODES = ("portable", "ort", "ort-kernels")
# the ONNX domain of fluxrt's own ONNX Runtime ops: written by export/ort_kernels.py, served by the
# library of runtime/ort_ops/ (fluxrt_ops.cu registers the same name)
ORT_OPS_DOMAIN = "fluxrt"
MSFT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops (MultiHeadAttention, RotaryEmbedding)
SIDE_MULTIPLE = 16  # image sides in pixels: VAE factor 8 x 2x2 latent packing


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int32", "float32" or ACT
    shape: tuple[int | str, ...]  # int: fixed size; str: a named dynamic axis or an expression of one

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        for d in self.shape:
            if isinstance(d, int) and d <= 0:
                raise ValueError(f"tensor {self.name!r}: fixed dimension {d} must be positive")

    def resolved_dtype(self, precision: str) -> str:
        """numpy dtype name of this tensor in a graph of ``precision``."""
        return PRECISION_DTYPE[precision] if self.dtype == ACT else self.dtype

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if self.name not in COMPONENTS:
            raise ValueError(f"component {self.name!r} is not one of {COMPONENTS}")
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"component {self.name!r}: duplicate tensor names in {names}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"component {self.name!r} has no input {name!r}; inputs are {self.input_names}")


@dataclass(frozen=True)
class ModelDims:
    """The sizes that the four networks' tensors depend on, read from a checkpoint's configs."""

    variant: str  # "dev" (guidance-distilled: has a guidance embedder) or "schnell"
    clip_hidden_size: int = 768
    clip_max_length: int = 77
    t5_d_model: int = 4096
    t5_max_length: int = 512
    in_channels: int = 64  # packed latent channels: latent_channels * 2 * 2
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    latent_channels: int = 16
    vae_scale_factor: int = 8
    image_channels: int = 3

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is not one of {VARIANTS}")
        for name in ("clip_hidden_size", "clip_max_length", "t5_d_model", "t5_max_length", "in_channels",
                     "joint_attention_dim", "pooled_projection_dim", "latent_channels", "vae_scale_factor"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelDims.{name} must be a positive int, got {value!r}")
        if self.in_channels != 4 * self.latent_channels:
            raise ValueError(
                f"transformer in_channels {self.in_channels} must be 4 x VAE latent_channels "
                f"({self.latent_channels}): latents are packed in 2x2 patches"
            )
        if self.pooled_projection_dim != self.clip_hidden_size:
            raise ValueError(
                f"transformer pooled_projection_dim {self.pooled_projection_dim} must equal CLIP hidden_size "
                f"{self.clip_hidden_size}"
            )
        if self.joint_attention_dim != self.t5_d_model:
            raise ValueError(
                f"transformer joint_attention_dim {self.joint_attention_dim} must equal T5 d_model {self.t5_d_model}"
            )

    @property
    def guidance(self) -> bool:
        return self.variant == "dev"

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict) -> "ModelDims":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"ModelDims: unknown keys {sorted(unknown)}")
        return cls(**data)


def clip_spec(d: ModelDims) -> ComponentSpec:
    return ComponentSpec(
        "clip",
        inputs=(TensorSpec("input_ids", "int32", ("B", d.clip_max_length)),),
        outputs=(
            TensorSpec("text_embeddings", ACT, ("B", d.clip_max_length, d.clip_hidden_size)),
            TensorSpec("pooled_embeddings", ACT, ("B", d.clip_hidden_size)),
        ),
    )


def t5_spec(d: ModelDims) -> ComponentSpec:
    return ComponentSpec(
        "t5",
        inputs=(TensorSpec("input_ids", "int32", ("B", "S")),),
        outputs=(TensorSpec("text_embeddings", ACT, ("B", "S", d.t5_d_model)),),
    )


def transformer_spec(d: ModelDims) -> ComponentSpec:
    inputs = [
        TensorSpec("hidden_states", ACT, ("B", "N", d.in_channels)),  # packed latents
        TensorSpec("encoder_hidden_states", ACT, ("B", "S", d.joint_attention_dim)),  # T5 embeddings
        TensorSpec("pooled_projections", ACT, ("B", d.pooled_projection_dim)),  # CLIP pooled
        TensorSpec("timestep", "float32", ("B",)),  # sigma in [0, 1]
        TensorSpec("img_ids", "float32", ("N", 3)),
        TensorSpec("txt_ids", "float32", ("S", 3)),
    ]
    if d.guidance:
        inputs.append(TensorSpec("guidance", "float32", ("B",)))  # guidance scale, e.g. 3.5
    return ComponentSpec(
        "transformer",
        inputs=tuple(inputs),
        outputs=(TensorSpec("latent", ACT, ("B", "N", d.in_channels)),),  # velocity prediction
    )


def vae_decoder_spec(d: ModelDims) -> ComponentSpec:
    f = d.vae_scale_factor
    return ComponentSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent", ACT, ("B", d.latent_channels, "h", "w")),),
        outputs=(TensorSpec("images", ACT, ("B", d.image_channels, f"{f}*h", f"{f}*w")),),  # in [-1, 1]
    )


def vae_encoder_spec(d: ModelDims) -> ComponentSpec:
    f = d.vae_scale_factor
    return ComponentSpec(
        "vae_encoder",
        inputs=(TensorSpec("images", ACT, ("B", d.image_channels, "H", "W")),),  # in [-1, 1]
        outputs=(TensorSpec("latent", ACT, ("B", d.latent_channels, f"H/{f}", f"W/{f}")),),  # posterior mean
    )


SPEC_BUILDERS = {
    "clip": clip_spec,
    "t5": t5_spec,
    "transformer": transformer_spec,
    "vae_decoder": vae_decoder_spec,
    "vae_encoder": vae_encoder_spec,
}


def component_spec(name: str, dims: ModelDims) -> ComponentSpec:
    try:
        return SPEC_BUILDERS[name](dims)
    except KeyError:
        raise ValueError(f"unknown component {name!r}; known components are {list(SPEC_BUILDERS)}") from None


def component_precision(name: str, precision: str) -> str:
    """The precision a component's graph actually runs in when ``precision`` is asked for.

    The VAE stays fp32 in half-precision exports: the FLUX VAE overflows in fp16, and in bf16
    ONNX Runtime has no bfloat16 Resize kernel on CPU or CUDA (seen with onnxruntime-gpu 1.31 on
    an H100), so a bf16 VAE graph would run on TensorRT only.  T5 stays fp16 with its feed-forward
    output projections in fp32 (see the exporter), as transformers does.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    if name.startswith("vae"):
        return "fp32"
    return precision


Range = tuple[int, int, int]  # (min, opt, max)


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

    def to_json(self) -> dict:
        return {"batch": list(self.batch), "text_length": list(self.text_length), "image_side": list(self.image_side)}

    @classmethod
    def from_json(cls, data: dict) -> "ShapeEnvelope":
        return cls(**{k: tuple(v) for k, v in data.items()})
