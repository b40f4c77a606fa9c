"""Load a FLUX.1 checkpoint from local files: a diffusers-layout folder, optionally with
Black Forest Labs single-file safetensors for the transformer and/or the autoencoder, or a ComfyUI-style
full checkpoint that bundles the transformer (``model.diffusion_model.``) with the autoencoder (``vae.`` or
``first_stage_model.``) and the text encoders (``text_encoders.clip_l.transformer.``,
``text_encoders.t5xxl.transformer.``); the folder then gives the configs, tokenizers and scheduler. Weights
stored in float8 (community "fp8" files, scaled or not) are upcast (export/weights.py).

Nothing is ever downloaded.  Every file is checked before torch touches it, so a missing
shard, a truncated file or a wrong key set is reported by name.  Weights are read through
safetensors' memory map and assigned into modules built on the meta device, so loading
needs about one copy of the weights in the requested dtype.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxrt.components import ModelDims
from fluxrt.errors import CheckpointError
from fluxrt.export import bfl
from fluxrt.export.weights import (
    TORCH_DTYPES, assign_weights, match_prefix, module_on_meta, read_state_dict, safetensors_header, weight_files,
    weight_keys,
)
from fluxrt.files import read_json

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
__all__ = ["Checkpoint", "TORCH_DTYPES"]
# a ComfyUI-style full checkpoint: each component under its prefix (the first of several that the file uses)
BUNDLE_PREFIXES = {"transformer": ("model.diffusion_model.",), "vae": ("vae.", "first_stage_model."),
                   "clip": ("text_encoders.clip_l.transformer.",), "t5": ("text_encoders.t5xxl.transformer.",)}


def bundle_prefixes(path: Path, keys: list[str]) -> dict[str, str]:
    """``{component: prefix}`` of a ComfyUI-style full checkpoint; ``{}`` for a file that holds the transformer
    alone (BFL's, with or without ``model.diffusion_model.``). A bundle without a transformer, or with keys under
    none of the prefixes, is refused with those keys."""
    found = {}
    for component, prefixes in BUNDLE_PREFIXES.items():
        for prefix in prefixes:
            if any(k.startswith(prefix) for k in keys):
                found[component] = prefix
                break
    if set(found) <= {"transformer"}:
        return {}
    if "transformer" not in found:
        raise CheckpointError(f"{path} bundles {sorted(found)} (keys under {sorted(found.values())}) but no "
                              f"transformer: expected its keys under 'model.diffusion_model.'")
    stray = sorted(k for k in weight_keys(keys) if not k.startswith(tuple(found.values())))
    if stray:
        raise CheckpointError(f"{path}: a full checkpoint (components under {found}), but {len(stray)} keys belong "
                              f"to none of them (e.g. {stray[:4]})")
    return found


@dataclass(frozen=True)
class Checkpoint:
    """A FLUX.1 checkpoint on disk. ``transformer_file``/``vae_file`` override the diffusers
    folder's transformer/VAE with Black Forest Labs single files."""

    root: Path
    transformer_file: Path | None = None
    vae_file: Path | None = None
    bundle: tuple = ()  # ((component, prefix), ...) when transformer_file is a full checkpoint

    def bundled(self, component: str) -> str | None:
        """The key prefix of ``component`` in the full checkpoint ``transformer_file``, or None."""
        return dict(self.bundle).get(component)

    @classmethod
    def open(cls, root: str | Path, transformer_file: str | Path | None = None,
             vae_file: str | Path | None = None) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder {root} does not exist")
        index = read_json(root / "model_index.json", "checkpoint", CheckpointError)
        if index.get("_class_name") not in ("FluxPipeline", None):
            raise CheckpointError(
                f"{root / 'model_index.json'}: _class_name is {index.get('_class_name')!r}, expected 'FluxPipeline'"
            )
        bundle = {}
        if transformer_file:
            bundle = bundle_prefixes(Path(transformer_file), list(safetensors_header(Path(transformer_file))))
        need = [s for s in SUBFOLDERS if not (root / s).is_dir()
                and not (s == "transformer" and transformer_file) and not (s == "vae" and (vae_file or "vae" in bundle))]
        if need:
            raise CheckpointError(f"checkpoint {root} lacks the subfolders {need}; a diffusers FLUX folder has {list(SUBFOLDERS)}")
        ckpt = cls(root, Path(transformer_file) if transformer_file else None, Path(vae_file) if vae_file else None,
                   tuple(sorted(bundle.items())))
        ckpt.dims()  # validates the configs now rather than halfway through an export
        ckpt.check_configs()
        ckpt.check_variant()
        ckpt.check_tokenizers()
        return ckpt

    def check_weights(self, components) -> None:
        """Every safetensors header of ``components`` (user names: clip, t5, transformer, vae) checked before
        anything is written: float dtypes, shapes, offsets inside the file."""
        files = {"clip": lambda: [self.transformer_file] if self.bundled("clip") else
                 weight_files(self.root / "text_encoder", TRANSFORMERS_WEIGHTS),
                 "t5": lambda: [self.transformer_file] if self.bundled("t5") else
                 weight_files(self.root / "text_encoder_2", TRANSFORMERS_WEIGHTS),
                 "transformer": lambda: [self.transformer_file] if self.transformer_file else
                 weight_files(self.root / "transformer", DIFFUSERS_WEIGHTS),
                 "vae": lambda: [self.vae_file] if self.vae_file else [self.transformer_file] if self.bundled("vae")
                 else weight_files(self.root / "vae", DIFFUSERS_WEIGHTS)}
        for c in components:
            for path in files[c]():
                safetensors_header(Path(path))

    def check_tokenizers(self) -> None:
        from fluxrt.export.tokenizers_tiny import check_checkpoint_tokenizer

        for sub, kind, encoder in (("tokenizer", "clip", "text_encoder"), ("tokenizer_2", "t5", "text_encoder_2")):
            vocab = self.config(encoder).get("vocab_size")
            if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
                raise CheckpointError(f"{self.root / encoder}/config.json: vocab_size must be a positive integer, "
                                      f"got {vocab!r}")
            check_checkpoint_tokenizer(self.root / sub, kind, vocab)

    def check_variant(self) -> None:
        """A BFL transformer's variant is its weights' (guidance_in: dev): the folder's scheduler (dynamic shifting:
        dev) and transformer config, where there is one, must be of the same variant, not silently mixed in."""
        if not self.transformer_file:
            return
        dev = self._bfl_transformer()[1]["guidance_embeds"]
        variant = "dev" if dev else "schnell"

        def mismatch(what: str) -> CheckpointError:
            return CheckpointError(f"{self.transformer_file} holds FLUX.1-{variant} weights (guidance_in "
                                   f"{'present' if dev else 'absent'}), but {what}: give the folder of the {variant} "
                                   f"variant")

        shifting = self.config("scheduler").get("use_dynamic_shifting", False)
        if bool(shifting) != dev:
            raise mismatch(f"{self.root / 'scheduler'}/scheduler_config.json is a FLUX.1-{'schnell' if dev else 'dev'} "
                           f"scheduler (use_dynamic_shifting {shifting})")
        folder = self.root / "transformer" / "config.json"
        if folder.is_file():
            given = read_json(folder, "transformer config", CheckpointError).get("guidance_embeds", False)
            if bool(given) != dev:
                raise mismatch(f"{folder} says guidance_embeds {given}")

    def check_configs(self) -> None:
        """The diffusers models' configs against their classes: every key a parameter, integers integers."""
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        if not self.transformer_file:
            check_config(FluxTransformer2DModel, self.config("transformer"), f"{self.root / 'transformer'}/config.json")
        if not self.vae_file and not self.bundled("vae"):
            check_config(AutoencoderKL, self.config("vae"), f"{self.root / 'vae'}/config.json")

    # ---- configs -------------------------------------------------------------------------
    def config(self, sub: str) -> dict:
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        return read_json(self.root / sub / name, f"{sub} config", CheckpointError)

    def transformer_config(self) -> dict:
        if self.transformer_file:
            return self._bfl_transformer()[1]
        return self.config("transformer")

    def vae_config(self) -> dict:
        if self.vae_file or self.bundled("vae"):
            return self._bfl_vae()[1]
        return self.config("vae")

    def dims(self) -> ModelDims:
        tc, vc = self.transformer_config(), self.vae_config()
        clip, t5 = self.config("text_encoder"), self.config("text_encoder_2")
        try:
            return ModelDims(
                variant="dev" if tc.get("guidance_embeds", False) else "schnell",
                clip_hidden_size=clip["hidden_size"],
                clip_max_length=clip.get("max_position_embeddings", 77),
                t5_d_model=t5["d_model"],
                in_channels=tc.get("in_channels", 64),
                joint_attention_dim=tc.get("joint_attention_dim", 4096),
                pooled_projection_dim=tc.get("pooled_projection_dim", 768),
                latent_channels=vc.get("latent_channels", 16),
                vae_scale_factor=2 ** (len(vc.get("block_out_channels", [0] * 4)) - 1),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.root}: configs are inconsistent: {e}") from None

    # ---- modules ---------------------------------------------------------------------------
    def load_transformer(self, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import FluxTransformer2DModel

        return self._load_diffusers("transformer", FluxTransformer2DModel, self.transformer_file,
                                    self._bfl_transformer, dtype)

    def load_vae(self, dtype: torch.dtype) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return self._load_diffusers("vae", AutoencoderKL, self.vae_file or (self.transformer_file if self.bundled("vae")
                                    else None), self._bfl_vae, dtype)

    def _load_diffusers(self, sub: str, cls, bfl_file: Path | None, bfl_loader, dtype: torch.dtype):
        """A diffusers model from its subfolder, or from the BFL single file that overrides it."""
        if bfl_file:
            state, config = bfl_loader(load=True)
            state = {k: v.to(dtype) for k, v in state.items()}
            what = f"{sub} {bfl_file}"
        else:
            config = self.config(sub)
            state = read_state_dict(weight_files(self.root / sub, DIFFUSERS_WEIGHTS), dtype)
            what = f"{sub} {self.root / sub}"
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        try:
            module = module_on_meta(lambda: cls(**kwargs))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{what}: its config does not make a {cls.__name__}: {e}") from None
        return assign_weights(module, state, what)

    def load_clip(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**self.config("text_encoder"))
        state = self._text_state("clip", "text_encoder", dtype)
        model = build_text_encoder(lambda: CLIPTextModel(config), f"CLIP text encoder {self.root / 'text_encoder'}")
        state = match_prefix(state, set(model.state_dict()), "text_model.")
        # position_ids: a buffer that older files carry and newer ones do not
        ids = [k for k in model.state_dict() if k.endswith("position_ids")]
        for k in ids:
            state.pop(k, None)
        model = assign_weights(model, state, f"CLIP text encoder {self.root / 'text_encoder'}", set(ids))
        for name, module in model.named_modules():
            if "position_ids" in dict(module.named_buffers(recurse=False)):
                module.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0),
                                       persistent=False)
        return model

    def load_t5(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import T5Config, T5EncoderModel

        config = T5Config(**self.config("text_encoder_2"))
        state = self._text_state("t5", "text_encoder_2", dtype)
        # shared.weight and encoder.embed_tokens.weight are tied: files carry one or both
        tied = ("shared.weight", "encoder.embed_tokens.weight")
        present = [k for k in tied if k in state]
        if not present:
            raise CheckpointError(
                f"T5 encoder {self.root / 'text_encoder_2'}: wrong key set: 1 missing (e.g. ['shared.weight'])"
            )
        for k in tied:
            state.setdefault(k, state[present[0]])
        model = build_text_encoder(lambda: T5EncoderModel(config), f"T5 encoder {self.root / 'text_encoder_2'}")
        model = assign_weights(model, state, f"T5 encoder {self.root / 'text_encoder_2'}")
        model.encoder.embed_tokens = model.shared
        return model

    def _text_state(self, component: str, sub: str, dtype: torch.dtype) -> dict:
        """A text encoder's tensors: from the full checkpoint where it bundles them, else the folder's."""
        prefix = self.bundled(component)
        if prefix:
            return read_state_dict([self.transformer_file], dtype, prefix)
        return read_state_dict(weight_files(self.root / sub, TRANSFORMERS_WEIGHTS), dtype)

    # ---- BFL single files ---------------------------------------------------------------------
    def _bfl_transformer(self, load: bool = False) -> tuple[dict, dict]:
        """The file's transformer. Its rotary axes are not in the weights, only their sum (the head size): the
        folder's ``axes_dims_rope`` where it has a transformer config, which must sum to the weights' head size,
        else FLUX.1's rule (:func:`bfl.rope_axes`)."""
        state = self._bfl_state(self.transformer_file, "transformer", load, self.bundled("transformer") or "")
        folder = self.root / "transformer" / "config.json"
        axes = read_json(folder, "transformer config", CheckpointError).get("axes_dims_rope") \
            if folder.is_file() else None
        try:
            converted, config = bfl.transformer_bfl_to_diffusers(state, axes_dims_rope=axes)
        except ValueError as e:
            raise CheckpointError(f"transformer {self.transformer_file}: {e}") from None
        except CheckpointError as e:
            raise CheckpointError(f"transformer {self.transformer_file}: {e}" + (f" ({folder})" if axes else "")) \
                from None
        return converted, config

    def _bfl_vae(self, load: bool = False) -> tuple[dict, dict]:
        """The file's autoencoder as BFL's code builds it, whatever the folder's vae/config.json says: GroupNorm of
        32 groups and FLUX.1's latent scale and shift (none of them stored in the file)."""
        path, prefix = (self.vae_file, "") if self.vae_file else (self.transformer_file, self.bundled("vae"))
        state = self._bfl_state(path, "vae", load, prefix)
        try:
            return bfl.vae_bfl_to_diffusers(state)
        except CheckpointError as e:
            raise CheckpointError(f"autoencoder {path}{f' ({prefix}*)' if prefix else ''}: {e}") from None

    @staticmethod
    def _bfl_state(path: Path, kind: str, load: bool, prefix: str = "") -> dict:
        """The file's tensors (``load``; those under ``prefix``, taken off) or, for config inference, meta tensors
        of the right shapes (float8 scales left out: they are consumed when the weights are upcast)."""
        header = safetensors_header(path)
        keys = [k[len(prefix):] for k in weight_keys(header) if k.startswith(prefix)]
        found = bfl.detect_bfl_kind(keys)
        if found != kind:
            raise CheckpointError(f"{path} holds a BFL {found} checkpoint, expected the {kind}")
        if load:
            return read_state_dict([path], None, prefix)
        return {k: torch.empty(header[prefix + k]["shape"], device="meta") for k in keys}

    # ---- provenance ----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A fast content fingerprint: every config/tokenizer file whole, and for each weights file
        its size, its header and 16 evenly spaced 64 KiB samples (hashing 30 GB whole takes minutes)."""
        h = hashlib.sha256()
        files = sorted(p for p in self.root.rglob("*") if p.is_file())
        files += [p for p in (self.transformer_file, self.vae_file) if p]
        for p in files:
            h.update(str(p.relative_to(self.root) if p.is_relative_to(self.root) else p.name).encode())
            size = p.stat().st_size
            h.update(str(size).encode())
            with open(p, "rb") as f:
                if size <= 4 * 2**20:
                    h.update(f.read())
                    continue
                for i in range(16):
                    f.seek(i * (size - 65536) // 15)
                    h.update(f.read(65536))
        return h.hexdigest()


def check_config(cls, config: dict, what: str) -> None:
    """Refuse a key ``cls`` does not take, and a non-integer where it takes an integer."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    takes = sorted(p for p in params if p not in ("self", "args", "kwargs"))
    unknown = sorted(k for k in config if not k.startswith("_") and k not in params)
    if unknown:
        raise CheckpointError(f"{what}: {unknown} {'is not a parameter' if len(unknown) == 1 else 'are not parameters'} "
                              f"of {cls.__name__} (it takes {takes})")
    for key, value in config.items():
        p = params.get(key)
        if p is None:
            continue
        integer = p.annotation in (int, "int") or (p.annotation is inspect.Parameter.empty and type(p.default) is int)
        if integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{what}: {key} must be an integer, got {value!r}")


def build_text_encoder(factory, what: str) -> torch.nn.Module:
    try:
        return module_on_meta(factory)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{what}: its config does not make the model: {e}") from None
