"""The backbone: a preset with its overrides applied. It says where each component's weights
are (a local path, downloaded when online) and builds SDXL itself, the model every method
samples with; every other model's loader lives next to its user and asks `fetch(key)`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import UserError
from .hub import (download_hint, env_flag, hub_cache_dir, hub_repo, loading_from, local_copy, open_clip_hub_file,
                  probe_hub)
from .presets import PRESETS, BackbonePreset
from .sources import WeightSource, parse_override
from .tiny import build_tiny_components

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

# only the diffusers weights of SDXL base (not the fp16/onnx/openvino copies), ~14 GB
_SDXL_PATTERNS = [
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
# an SDXL part given on its own (e.g. --weight vae=...): its config and safetensors weights
_PART_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


class Backbone:
    """A preset with its overrides applied: resolves weight sources to local paths and loads SDXL."""

    def __init__(self, preset: BackbonePreset, overrides: Mapping[str, WeightSource] | None = None):
        self.preset = preset
        self.overrides: dict[str, WeightSource] = dict(overrides or {})
        self.weights: dict[str, WeightSource] = {**preset.weights, **self.overrides}
        self._pipelines: dict[tuple[str, str], "StableDiffusionXLPipeline"] = {}

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def resolution(self) -> int:
        return self.preset.resolution

    @property
    def is_tiny(self) -> bool:
        return self.preset.seed is not None

    def __repr__(self) -> str:
        extra = f", overrides={sorted(self.overrides)}" if self.overrides else ""
        return f"Backbone({self.name!r}{extra})"

    def describe(self) -> dict[str, Any]:
        """What run.json records about the backbone."""
        info: dict[str, Any] = {
            "name": self.name,
            "resolution": self.resolution,
            "scheduler": "EulerDiscreteScheduler",
            "weights": {k: s.to_dict() for k, s in self.weights.items()},
        }
        if self.overrides:
            info["overridden"] = sorted(self.overrides)
        if self.is_tiny:
            info["random_seed"] = self.preset.seed
        return info

    def source(self, key: str) -> WeightSource:
        """Where component `key`'s weights come from (preset or override)."""
        if key not in self.weights:
            raise ValueError(f"backbone {self.name!r} has no weight source {key!r}; it has {sorted(self.weights)}")
        return self.weights[key]

    def _local_override(self, key: str, source: WeightSource) -> Path:
        """A local override checked: sdxl wants a diffusers folder, an SDXL part (vae) a model
        folder; a file component a file (or a folder holding the preset's file name)."""
        path = Path(source.location)
        if not path.exists():
            raise UserError(f"the weights for '{key}' are missing", path=path,
                            hint=f"pass an existing path with --weight {key}=PATH")
        if key == "sdxl":
            _check_diffusers_folder(path)
        if key in self.preset.sdxl_parts:
            _check_part_folder(key, path)
        default = self.preset.weights.get(key)
        if path.is_dir() and default is not None and default.filename is not None:
            inner = path / default.filename
            if not inner.is_file():
                raise UserError(
                    f"'{key}' is a single file ({default.filename}) but this folder does not hold one",
                    path=path,
                    hint=f"pass the file itself: --weight {key}=/path/to/{default.filename}",
                )
            return inner
        return path

    def check_available(self, components: Iterable[str] = ("sdxl",)) -> dict[str, Path | None]:
        """Make sure the weights of `components` can be had, in a few seconds at most.

        Returns, per component, its local path, or None where it is not here yet but the hub
        answers (the loader will download it). Raises UserError, with the fix, when a
        component is neither here nor reachable (at once under HF_HUB_OFFLINE=1).
        "sdxl" includes the SDXL parts given as overrides (vae). The tiny backbone is always
        available: it returns {}.
        """
        if self.is_tiny:
            return {}
        components = list(components)
        if "sdxl" in components:
            components += [k for k in self.overrides if k in self.preset.sdxl_parts and k not in components]
        found: dict[str, Path | None] = {}
        for key in components:
            source = self.source(key)
            path = local_copy(source)
            if source.kind == "local":
                found[key] = self._local_override(key, source)
                continue
            if path is not None:
                found[key] = path
                continue
            if env_flag("HF_HUB_OFFLINE"):
                raise UserError(
                    f"the weights for '{key}' ({source}) are not on this machine and HF_HUB_OFFLINE=1 is set "
                    f"(looked in {hub_cache_dir()})",
                    hint=download_hint(key, source),
                )
            why = probe_hub(hub_repo(source))
            if why is not None:
                raise UserError(
                    f"the weights for '{key}' ({source}) are not on this machine and {why}",
                    hint=download_hint(key, source),
                )
            found[key] = None
        return found

    def fetch(self, key: str) -> Path:
        """The local path of component `key` (a folder, or a file for file components).

        Checks availability first; downloads from the hub when online and not cached.
        """
        if self.is_tiny:
            if key in self.overrides:  # an optional file (local_encoder): local only, tiny is offline
                if self.overrides[key].kind != "local":
                    raise UserError(f"the tiny backbone reads '{key}' from a local file only, not {self.overrides[key]}",
                                    hint=f"--weight {key}=/path/to/file")
                return self._local_override(key, self.overrides[key])
            raise ValueError("the tiny backbone has no weight files: build its components with build_tiny_components")
        path = self.check_available((key,))[key]
        if path is not None:
            return path
        from huggingface_hub import hf_hub_download, snapshot_download

        source, cache = self.weights[key], hub_cache_dir()
        if source.kind == "open_clip":
            repo, names = open_clip_hub_file(source)
            return Path(hf_hub_download(repo, names[0], cache_dir=cache))
        if source.filename is not None:
            return Path(hf_hub_download(source.location, source.filename, subfolder=source.subfolder, cache_dir=cache))
        if key == "sdxl":
            patterns = _SDXL_PATTERNS
        elif key in self.preset.sdxl_parts:
            patterns = [f"{source.subfolder}/{name}" if source.subfolder else name for name in _PART_FILES]
        else:
            patterns = [f"{source.subfolder}/*"] if source.subfolder else None
        root = Path(snapshot_download(source.location, cache_dir=cache, allow_patterns=patterns))
        return root / source.subfolder if source.subfolder else root

    def sdxl_pipeline(self, device: str = "cpu", dtype: "torch.dtype | None" = None) -> "StableDiffusionXLPipeline":
        """The SDXL pipeline with an Euler scheduler, built once per (device, dtype) and reused.

        dtype defaults to torch.float32. SDXL parts given as overrides (vae) replace SDXL's
        own. The caller sets the progress bar.
        """
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        dtype = torch.float32 if dtype is None else dtype
        cache_key = (str(torch.device(device)), str(dtype))
        if cache_key in self._pipelines:
            return self._pipelines[cache_key]
        if self.is_tiny:
            parts = build_tiny_components(self.preset.seed or 0)  # float32, CPU
            pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True, add_watermarker=False)
            pipe = pipe.to(device=device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)
        else:
            path = self.fetch("sdxl")
            _check_diffusers_folder(path)
            parts = self._sdxl_parts(dtype)
            with loading_from(path, "an SDXL pipeline", "give a folder in the diffusers layout "
                              "(StableDiffusionXLPipeline.save_pretrained or hf download)"):
                pipe = StableDiffusionXLPipeline.from_pretrained(path, **parts, **_dtype_kwarg(dtype),
                                                                 local_files_only=True)
            # MS-Diffusion and RelationBooth sample with Euler (REFERENCE 1), SDXL base's own choice
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe = pipe.to(device=device)
        self._pipelines[cache_key] = pipe
        return pipe

    def _sdxl_parts(self, dtype) -> dict[str, Any]:
        """The overridden SDXL parts, loaded in `dtype`, as from_pretrained keyword arguments."""
        from diffusers import AutoencoderKL

        if "vae" not in self.overrides:
            return {}
        path = self.fetch("vae")
        with loading_from(path, "a VAE (AutoencoderKL)", _PART_HINT):
            vae = AutoencoderKL.from_pretrained(path, **_dtype_kwarg(dtype), local_files_only=True)
        if vae.config.latent_channels != 4:
            raise UserError(f"this VAE has {vae.config.latent_channels} latent channels; SDXL's UNet needs 4",
                            path=path, hint="give an SDXL VAE, e.g. --weight vae=madebyollin/sdxl-vae-fp16-fix")
        return {"vae": vae}


def _dtype_kwarg(dtype) -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype` in newer diffusers, `torch_dtype` before."""
    from diffusers.utils import deprecation_utils

    name = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {name: dtype}


_PART_HINT = ("give a folder in the diffusers layout (AutoencoderKL.save_pretrained: config.json and "
              "diffusion_pytorch_model.safetensors) or a hub id, e.g. --weight vae=madebyollin/sdxl-vae-fp16-fix")


def _check_part_folder(key: str, path: Path) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"'{key}' must be a model folder in the diffusers layout (with config.json)",
                        path=path, hint=_PART_HINT)


def _check_diffusers_folder(path: Path) -> None:
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise UserError(
            "the sdxl weights must be a folder in the diffusers layout (with model_index.json)",
            path=path,
            hint="use `hf download stabilityai/stable-diffusion-xl-base-1.0` or StableDiffusionXLPipeline.save_pretrained",
        )


def get_backbone(name: str, overrides: Mapping[str, str] | None = None) -> Backbone:
    """The backbone preset `name` with weight sources replaced by `overrides` (key -> path or hub id)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        guess = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(
            f"unknown backbone '{name}'; {guess}presets: {', '.join(sorted(PRESETS))}",
            hint="--backbone sdxl (real weights) or --backbone tiny (random weights, offline, seconds on a CPU)",
        )
    preset = PRESETS[name]
    keys = [*preset.weights, *preset.optional, *preset.sdxl_parts]
    parsed: dict[str, WeightSource] = {}
    for key, value in (overrides or {}).items():
        if key not in keys:
            if preset.seed is not None:
                optional = f"; only {', '.join(keys)} may be given" if keys else ""
                raise UserError(
                    f"the {name} backbone has no weights to override (it builds seeded random weights){optional}",
                    hint="drop --weight, or use --backbone sdxl",
                )
            close = difflib.get_close_matches(key, keys, n=1)
            guess = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(
                f"unknown weight key '{key}' for backbone {name}; {guess}keys: {', '.join(keys)}",
                hint=f"--weight KEY=PATH_OR_HUB_ID with KEY one of {', '.join(keys)}",
            )
        parsed[key] = parse_override(key, value, preset.weights.get(key))
    return Backbone(preset, parsed)
