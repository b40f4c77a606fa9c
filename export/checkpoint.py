"""Load a FLUX.1 checkpoint from local files: a diffusers-layout folder, optionally with
Black Forest Labs single-file safetensors for the transformer and/or the autoencoder.

Nothing is ever downloaded.  Every file is checked before torch touches it, so a missing
shard, a truncated file or a wrong key set is reported by name.  Weights are read through
safetensors' memory map and assigned into modules built on the meta device, so loading
needs about one copy of the weights in the requested dtype.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fluxrt.components import ModelDims
from fluxrt.errors import CheckpointError

SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what}: file {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what}: {path} must hold a JSON object, found {type(data).__name__}")
    return data


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated against the file's size."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(f"{path} is not a safetensors file: header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return header


def weight_files(folder: Path, single_name: str) -> list[Path]:
    """The safetensors files of one component folder: a single file, or the shards its index lists."""
    single = folder / single_name
    index = folder / f"{single_name}.index.json"
    if index.is_file():
        data = read_json(index, f"shard index of {folder.name}")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"shard index {index} has no 'weight_map' object")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"shard index {index} lists {len(shards)} shards but {len(missing)} are missing: {missing[:5]}"
            )
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    raise CheckpointError(f"{folder} holds no weights: expected {single_name} or {single_name}.index.json")


def read_state_dict(files: list[Path], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in files:
        safetensors_header(path)
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return state


def check_keys(state: dict, expected: set[str], what: str, optional: set[str] = frozenset()) -> None:
    missing = sorted(expected - set(state) - optional)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:4]})")
        raise CheckpointError(f"{what}: wrong key set: {'; '.join(parts)}")


def match_prefix(state: dict, expected: set[str], prefix: str) -> dict:
    """transformers 4 wrote CLIP keys under ``text_model.``, transformers 5 modules have none (or the
    reverse): rename the file's keys to the module's convention."""
    has = any(k.startswith(prefix) for k in state)
    wants = any(k.startswith(prefix) for k in expected)
    if has and not wants:
        return {k.removeprefix(prefix): v for k, v in state.items()}
    if wants and not has:
        return {prefix + k: v for k, v in state.items()}
    return state


def module_on_meta(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.device("meta"):
        return factory()


def assign_weights(module: torch.nn.Module, state: dict, what: str, optional: set[str] = frozenset()) -> torch.nn.Module:
    expected = set(module.state_dict())
    check_keys(state, expected, what, optional)
    for key, tensor in module.state_dict().items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{what}: tensor {key!r} has shape {tuple(state[key].shape)}, the config expects {tuple(tensor.shape)}"
            )
    module.load_state_dict(state, strict=False, assign=True)
    assert not any(p.is_meta for p in module.parameters()), f"{what}: parameters left on meta"
    return module.eval().requires_grad_(False)


@dataclass(frozen=True)
class Checkpoint:
    """A FLUX.1 checkpoint on disk. ``transformer_file``/``vae_file`` override the diffusers
    folder's transformer/VAE with Black Forest Labs single files."""

    root: Path
    transformer_file: Path | None = None
    vae_file: Path | None = None

    @classmethod
    def open(cls, root: str | Path, transformer_file: str | Path | None = None,
             vae_file: str | Path | None = None) -> "Checkpoint":
        root = Path(root)
        if not root.is_dir():
            raise CheckpointError(f"checkpoint folder {root} does not exist")
        index = read_json(root / "model_index.json", "checkpoint")
        if index.get("_class_name") not in ("FluxPipeline", None):
            raise CheckpointError(
                f"{root / 'model_index.json'}: _class_name is {index.get('_class_name')!r}, expected 'FluxPipeline'"
            )
        need = [s for s in SUBFOLDERS if not (root / s).is_dir()
                and not (s == "transformer" and transformer_file) and not (s == "vae" and vae_file)]
        if need:
            raise CheckpointError(f"checkpoint {root} lacks the subfolders {need}; a diffusers FLUX folder has {list(SUBFOLDERS)}")
        ckpt = cls(root, Path(transformer_file) if transformer_file else None, Path(vae_file) if vae_file else None)
        ckpt.dims()  # validates the configs now rather than halfway through an export
        return ckpt

    # ---- configs -------------------------------------------------------------------------
    def config(self, sub: str) -> dict:
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        return read_json(self.root / sub / name, f"{sub} config")

    def transformer_config(self) -> dict:
        if self.transformer_file:
            return self._bfl_transformer()[1]
        return self.config("transformer")

    def vae_config(self) -> dict:
        if self.vae_file:
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

        return self._load_diffusers("vae", AutoencoderKL, self.vae_file, self._bfl_vae, dtype)

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
        return assign_weights(module_on_meta(lambda: cls(**kwargs)), state, what)

    def load_clip(self, dtype: torch.dtype) -> torch.nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(**self.config("text_encoder"))
        state = read_state_dict(weight_files(self.root / "text_encoder", TRANSFORMERS_WEIGHTS), dtype)
        model = module_on_meta(lambda: CLIPTextModel(config))
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
        state = read_state_dict(weight_files(self.root / "text_encoder_2", TRANSFORMERS_WEIGHTS), dtype)
        # shared.weight and encoder.embed_tokens.weight are tied: files carry one or both
        tied = ("shared.weight", "encoder.embed_tokens.weight")
        present = [k for k in tied if k in state]
        if not present:
            raise CheckpointError(
                f"T5 encoder {self.root / 'text_encoder_2'}: wrong key set: 1 missing (e.g. ['shared.weight'])"
            )
        for k in tied:
            state.setdefault(k, state[present[0]])
        model = module_on_meta(lambda: T5EncoderModel(config))
        model = assign_weights(model, state, f"T5 encoder {self.root / 'text_encoder_2'}")
        model.encoder.embed_tokens = model.shared
        return model

    # ---- BFL single files ---------------------------------------------------------------------
    def _bfl_transformer(self, load: bool = False) -> tuple[dict, dict]:
        from fluxrt.export import bfl

        state = self._bfl_state(self.transformer_file, "transformer", load)
        try:
            return bfl.transformer_bfl_to_diffusers(state)
        except ValueError as e:
            raise CheckpointError(f"transformer {self.transformer_file}: {e}") from None

    def _bfl_vae(self, load: bool = False) -> tuple[dict, dict]:
        from fluxrt.export import bfl

        state = self._bfl_state(self.vae_file, "vae", load)
        kwargs = {}
        diffusers_vae = self.root / "vae" / "config.json"
        if diffusers_vae.is_file():
            cfg = read_json(diffusers_vae, "vae config")
            kwargs = {k: cfg[k] for k in ("scaling_factor", "shift_factor", "norm_num_groups") if k in cfg}
        return bfl.vae_bfl_to_diffusers(state, **kwargs)

    @staticmethod
    def _bfl_state(path: Path, kind: str, load: bool) -> dict:
        """The file's tensors (``load``) or, for config inference, meta tensors of the right shapes."""
        from fluxrt.export import bfl

        header = safetensors_header(path)
        keys = [k for k in header if k != "__metadata__"]
        found = bfl.detect_bfl_kind(keys)
        if found != kind:
            raise CheckpointError(f"{path} holds a BFL {found} checkpoint, expected the {kind}")
        if load:
            return read_state_dict([path], None)
        return {k: torch.empty(header[k]["shape"], device="meta") for k in keys}

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
