"""Where weights come from: backbone presets mapping component keys to weight sources.

Architecture and weights are kept apart (like open_clip's pretrained table): a preset names,
for each component key, a `WeightSource` (a hub repo id, a local file or folder, or an
open_clip pretrained tag); model code asks the `Backbone` for a local path and never knows
which it was.

    sdxl   SDXL base 1.0 and the weights the methods and metrics load, from the hub or
           from local folders given as overrides (`--weight sdxl=/path/to/folder`).
    tiny   the same architectures at toy size with seeded random weights, built from the
           configs below in about a second: no files, no network. For tests and dry runs.

Nothing falls back from one preset to the other. Importing this module does not import torch
or diffusers; they are imported inside the functions that need them.
"""

from __future__ import annotations

import difflib
import gzip
import os
import re
import threading
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping

from .errors import UserError

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

__all__ = [
    "WeightSource",
    "BackbonePreset",
    "Backbone",
    "PRESETS",
    "TINY",
    "get_backbone",
    "build_tiny_components",
    "build_clip_tokenizers",
    "CLIP_KEYS",
]

HUB_PROBE_TIMEOUT_S = 3.0  # how long check_available waits for the hub before giving up


# --------------------------------------------------------------------------- weight sources


@dataclass(frozen=True)
class WeightSource:
    """Where one component's weights come from.

    kind "hub":       `location` is a hub repo id; `subfolder` / `filename` point inside it.
    kind "local":     `location` is a local folder or file (absolute).
    kind "open_clip": `location` is an open_clip pretrained tag for architecture `model`.
    """

    kind: Literal["hub", "local", "open_clip"]
    location: str
    subfolder: str | None = None
    filename: str | None = None
    model: str | None = None

    @classmethod
    def hub(cls, repo: str, *, subfolder: str | None = None, filename: str | None = None) -> "WeightSource":
        return cls("hub", repo, subfolder=subfolder, filename=filename)

    @classmethod
    def local(cls, path: str | os.PathLike) -> "WeightSource":
        return cls("local", str(Path(path).expanduser().absolute()))

    @classmethod
    def open_clip(cls, model: str, tag: str) -> "WeightSource":
        return cls("open_clip", tag, model=model)

    def __str__(self) -> str:
        if self.kind == "open_clip":
            return f"open_clip {self.model}/{self.location}"
        inside = "/".join(p for p in (self.subfolder, self.filename) if p)
        return f"{self.location} ({inside})" if inside else self.location

    def to_dict(self) -> dict[str, str]:
        """The non-empty fields, for run.json."""
        return {k: v for k, v in asdict(self).items() if v is not None}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.*)?$")
_OPEN_CLIP_TAG = re.compile(r"^[\w.-]+$")


def _parse_override(key: str, value: str, default: WeightSource) -> WeightSource:
    """Turn a `--weight KEY=VALUE` string into a source replacing `default`.

    VALUE is an existing local path, or for hub components a repo id `owner/name`, optionally
    `owner/name:PATH` where PATH replaces the preset's subfolder (folder components) or file
    (file components); without `:PATH` the preset's subfolder/file are kept. For open_clip
    components VALUE may be another pretrained tag of the same architecture.
    """
    value = value.strip()
    path = Path(value).expanduser()
    if path.exists():
        return WeightSource.local(path)
    if default.kind == "open_clip" and _OPEN_CLIP_TAG.match(value):
        return WeightSource.open_clip(default.model or "", value)
    if default.kind != "open_clip" and _HUB_ID.match(value) and not value.startswith("."):
        repo, _, inside = value.partition(":")
        if ":" not in value:
            return replace(default, kind="hub", location=repo)
        inside = inside.strip("/") or None
        if default.filename is not None:  # a file component: PATH is the file inside the repo
            if inside is None:
                raise UserError(
                    f"--weight {key}={value}: '{key}' is a single file; name it after the colon",
                    hint=f"--weight {key}={repo}:{default.filename}",
                )
            sub, _, name = inside.rpartition("/")
            return WeightSource.hub(repo, subfolder=sub or None, filename=name)
        return WeightSource.hub(repo, subfolder=inside)
    raise UserError(
        f"--weight {key}={value}: no such file or folder",
        path=path.absolute(),
        hint=(
            "give an existing local path (for sdxl a folder in the diffusers layout, with "
            "model_index.json) or a hub repo id like owner/name"
        ),
    )


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class BackbonePreset:
    """A named set of weight sources and the default image size."""

    name: str
    description: str
    resolution: int  # default image side in pixels
    weights: Mapping[str, WeightSource] = field(default_factory=dict)
    seed: int | None = None  # tiny only: the seed of the random weights


SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

PRESETS: dict[str, BackbonePreset] = {
    "sdxl": BackbonePreset(
        name="sdxl",
        description="SDXL base 1.0 with the weights of MS-Diffusion, RelationLoRA and the metric encoders",
        resolution=1024,
        weights={
            "sdxl": WeightSource.hub(SDXL_REPO),
            # CLIP ViT-bigG/14 vision tower used by MS-Diffusion (REFERENCE 1)
            "image_encoder": WeightSource.hub("h94/IP-Adapter", subfolder="sdxl_models/image_encoder"),
            "msdiffusion": WeightSource.hub("doge1516/MS-Diffusion", filename="ms_adapter.bin"),
            "relationlora": WeightSource.hub("QingyuShi/DreamRelation"),
            # metric encoders of the `paper` protocol (REFERENCE 4); ViT-L/14 on request
            "clip": WeightSource.open_clip("ViT-B-32", "openai"),
            "clip_l14": WeightSource.open_clip("ViT-L-14", "openai"),
            "dino": WeightSource.hub("facebook/dino-vits16"),
        },
    ),
    "tiny": BackbonePreset(
        name="tiny",
        description="SDXL's architectures at toy size with seeded random weights (tests, dry runs; no files)",
        resolution=128,
        weights={},
        seed=0,
    ),
}


# --------------------------------------------------------------------------- tiny configs
# SDXL base's values are in the comments; everything else keeps the diffusers/transformers
# defaults, which are SDXL's.


@dataclass(frozen=True)
class TinyConfigs:
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]


_CLIP_TEXT_COMMON = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    num_hidden_layers=2,  # SDXL: 12 / 32
    num_attention_heads=2,  # SDXL: 12 / 20
    bos_token_id=49406,
    eos_token_id=49407,
)

# SDXL base's scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    timestep_spacing="leading",
    steps_offset=1,
    use_karras_sigmas=False,
)

TINY = TinyConfigs(
    text_encoder=dict(  # CLIP ViT-L/14 text tower in SDXL: hidden 768, quick_gelu
        _CLIP_TEXT_COMMON, hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", pad_token_id=49407
    ),
    text_encoder_2=dict(  # OpenCLIP ViT-bigG/14 text tower: hidden 1280, projection 1280, gelu
        _CLIP_TEXT_COMMON, hidden_size=64, intermediate_size=128, projection_dim=32, hidden_act="gelu", pad_token_id=0
    ),
    unet=dict(
        sample_size=16,  # resolution / 8; SDXL: 128
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),  # SDXL: (320, 640, 1280)
        layers_per_block=1,  # SDXL: 2 (fewer ops: a tiny UNet's time is per-op overhead)
        attention_head_dim=(1, 2, 4),  # heads per level (diffusers' name); SDXL: (5, 10, 20)
        transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
        cross_attention_dim=32 + 64,  # text_encoder + text_encoder_2 hidden; SDXL: 768 + 1280
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,  # SDXL: 256
        projection_class_embeddings_input_dim=32 + 6 * 8,  # projection_dim + 6 time ids; SDXL: 2816
        norm_num_groups=8,  # SDXL: 32
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels: scale factor 8 like SDXL
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # SDXL: (128, 256, 512, 512)
        layers_per_block=1,  # SDXL: 2
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=False,
    ),
    scheduler=SDXL_SCHEDULER_CONFIG,
)

# Component seeds are offsets from the preset seed, one per component, so that changing one
# component's config leaves the others' weights unchanged.
_SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "unet": 3, "vae": 4}


# --------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, rebuilt from the BPE file open_clip ships.

    Vocabulary order (as in CLIP): the 256 byte symbols, the same with the end-of-word mark
    "</w>", one token per merge, then <|startoftext|> and <|endoftext|>: 49408 entries.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split(" ")) for line in lines[1 : 49152 - 256 - 2 + 1])  # line 0: a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizers():
    """SDXL's two tokenizers, offline: the first pads with <|endoftext|>, the second with "!" (id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    common = dict(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    return CLIPTokenizer(**common), CLIPTokenizer(**common, pad_token="!")


# --------------------------------------------------------------------------- tiny build


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny SDXL pipeline, identical on every call and in every process."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def seeded(offset: int, make):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + offset)
            return make().eval()

    tokenizer, tokenizer_2 = build_clip_tokenizers()
    return dict(
        text_encoder=seeded(_SEED_OFFSETS["text_encoder"], lambda: CLIPTextModel(CLIPTextConfig(**TINY.text_encoder))),
        text_encoder_2=seeded(
            _SEED_OFFSETS["text_encoder_2"],
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY.text_encoder_2)),
        ),
        unet=seeded(_SEED_OFFSETS["unet"], lambda: UNet2DConditionModel(**TINY.unet)),
        vae=seeded(_SEED_OFFSETS["vae"], lambda: AutoencoderKL(**TINY.vae)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**TINY.scheduler),
    )


# --------------------------------------------------------------------------- metric encoders

# `--clip` architecture -> the weight key that holds it (REFERENCE 4: B/32 is the paper's)
CLIP_KEYS = {"ViT-B-32": "clip", "ViT-L-14": "clip_l14"}

# Tiny metric encoders: the real layouts (open_clip CLIP, transformers ViT as in DINO) at toy
# width and depth, at the real input size (224) so preprocessing is the same as on sdxl.
TINY_CLIP = dict(
    embed_dim=32,  # ViT-B/32: 512
    vision_cfg=dict(image_size=224, layers=2, width=64, head_width=32),  # B/32: 12 layers, width 768
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),  # B/32: 12 x 512
)
TINY_DINO = dict(  # facebook/dino-vits16: hidden 384, 12 layers, 6 heads, mlp 1536
    hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
    image_size=224, patch_size=16, qkv_bias=True,
)
_METRIC_SEED_OFFSETS = {"clip": 11, "dino": 12}

# MS-Diffusion at toy size: its image encoder (CLIP ViT-bigG/14 vision tower on sdxl: hidden
# 1664, 48 layers, 16 heads, patch 14, 224 px -> 257 tokens) and its resampler's own widths
# (sdxl: dim 1280, depth 4, 20 heads of 64); the other resampler dims follow the components.
TINY_IMAGE_ENCODER = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
    image_size=224, patch_size=14, projection_dim=32, hidden_act="gelu",
)
TINY_RESAMPLER = dict(dim=64, depth=2, dim_head=16, heads=4)
_MS_SEED_OFFSETS = {"image_encoder": 21, "msdiffusion": 22}



def _patch_size(arch: str) -> int:
    match = re.search(r"-(\d+)$", arch)
    if not match:
        raise ValueError(f"cannot read the patch size from the architecture name {arch!r}")
    return int(match.group(1))


def build_tiny_clip(arch: str = "ViT-B-32", seed: int = 0):
    """open_clip's CLIP at toy size with `arch`'s patch size, seeded (QuickGELU, like OpenAI's)."""
    import torch
    from open_clip.model import CLIP

    cfg = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], patch_size=_patch_size(arch)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + _METRIC_SEED_OFFSETS["clip"])
        return CLIP(**cfg, quick_gelu=True).eval()


def build_tiny_dino(seed: int = 0):
    """transformers' ViTModel (DINO's architecture) at toy size, seeded, without the pooler."""
    import torch
    from transformers import ViTConfig, ViTModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + _METRIC_SEED_OFFSETS["dino"])
        return ViTModel(ViTConfig(**TINY_DINO), add_pooling_layer=False).eval()


def build_tiny_image_encoder(seed: int = 0):
    """CLIPVisionModelWithProjection at toy size (257 tokens like bigG/14), seeded."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + _MS_SEED_OFFSETS["image_encoder"])
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).eval()


# --------------------------------------------------------------------------- availability


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_cache_dir() -> Path:
    """The hub cache as the environment names it now (read at call time, not import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _open_clip_hub_file(source: WeightSource) -> tuple[str, tuple[str, ...]]:
    """The hub repo and candidate file names that hold an open_clip pretrained tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(source.model or "", source.location)
    repo = (cfg or {}).get("hf_hub", "").strip("/")
    if not repo:
        raise UserError(
            f"open_clip has no hub copy of {source.model}/{source.location}",
            hint="pass a local checkpoint file with --weight clip=/path/to/file",
        )
    return repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _local_copy(source: WeightSource) -> Path | None:
    """The local path of a source if it is on this machine (folder, file or HF cache); no network."""
    if source.kind == "local":
        path = Path(source.location)
        return path if path.exists() else None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cache = _hub_cache_dir()
    if source.kind == "open_clip":
        repo, names = _open_clip_hub_file(source)
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(hit, str):
                return Path(hit)
        return None
    if source.filename is not None:
        name = "/".join(p for p in (source.subfolder, source.filename) if p)
        hit = try_to_load_from_cache(source.location, name, cache_dir=cache)
        return Path(hit) if isinstance(hit, str) else None
    try:
        root = Path(snapshot_download(source.location, cache_dir=cache, local_files_only=True))
    except Exception:  # huggingface_hub raises LocalEntryNotFoundError (an OSError) and friends
        return None
    path = root / source.subfolder if source.subfolder else root
    return path if path.is_dir() and any(path.iterdir()) else None


def _hub_repo(source: WeightSource) -> str:
    return _open_clip_hub_file(source)[0] if source.kind == "open_clip" else source.location


def _probe_hub(repo: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if the hub answers for `repo` within `timeout`, else why not (a short sentence).

    Runs in a daemon thread so that a hanging DNS lookup cannot hold the caller longer.
    """
    result: list[str | None] = []

    def probe():
        try:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

            try:
                HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo, timeout=timeout)
                result.append(None)
            except GatedRepoError:
                result.append(f"the hub repo {repo} is gated: accept its licence and log in (hf auth login)")
            except RepositoryNotFoundError:
                result.append(f"the hub has no repo {repo} (or it is private)")
        except Exception as exc:  # any network failure means: not reachable
            result.append(f"the hub is unreachable ({type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"the hub did not answer within {timeout:.0f} s"


def _download_hint(key: str, source: WeightSource) -> str:
    repo = _hub_repo(source)
    if source.kind == "hub" and source.filename:
        what = f"hf download {repo} {'/'.join(p for p in (source.subfolder, source.filename) if p)}"
    elif source.kind == "hub" and source.subfolder:
        what = f'hf download {repo} --include "{source.subfolder}/*"'
    else:
        what = f"hf download {repo}"
    local = source.filename or ("checkpoint_file" if source.kind == "open_clip" else "folder")
    return (
        f"on a connected machine run `{what}` and copy the HF cache (or the files) here; "
        f"or pass `--weight {key}=/path/to/{local}`; or use `--backbone tiny` for an offline run"
    )


# --------------------------------------------------------------------------- the backbone


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

    def _source(self, key: str) -> WeightSource:
        if key not in self.weights:
            raise ValueError(f"backbone {self.name!r} has no weight source {key!r}; it has {sorted(self.weights)}")
        return self.weights[key]

    def _local_override(self, key: str, source: WeightSource) -> Path:
        """A local override checked: sdxl wants a diffusers folder; a file component a file (or a
        folder holding the preset's file name)."""
        path = Path(source.location)
        if not path.exists():
            raise UserError(f"the weights for '{key}' are missing", path=path,
                            hint=f"pass an existing path with --weight {key}=PATH")
        if key == "sdxl":
            _check_diffusers_folder(path)
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
        The tiny backbone is always available: it returns {}.
        """
        if self.is_tiny:
            return {}
        found: dict[str, Path | None] = {}
        for key in components:
            source = self._source(key)
            path = _local_copy(source)
            if source.kind == "local":
                found[key] = self._local_override(key, source)
                continue
            if path is not None:
                found[key] = path
                continue
            if _env_flag("HF_HUB_OFFLINE"):
                raise UserError(
                    f"the weights for '{key}' ({source}) are not on this machine and HF_HUB_OFFLINE=1 is set "
                    f"(looked in {_hub_cache_dir()})",
                    hint=_download_hint(key, source),
                )
            why = _probe_hub(_hub_repo(source))
            if why is not None:
                raise UserError(
                    f"the weights for '{key}' ({source}) are not on this machine and {why}",
                    hint=_download_hint(key, source),
                )
            found[key] = None
        return found

    def fetch(self, key: str) -> Path:
        """The local path of component `key` (a folder, or a file for file components).

        Checks availability first; downloads from the hub when online and not cached.
        """
        if self.is_tiny:
            raise ValueError("the tiny backbone has no weight files: build its components with build_tiny_components")
        path = self.check_available((key,))[key]
        if path is not None:
            return path
        from huggingface_hub import hf_hub_download, snapshot_download

        source, cache = self.weights[key], _hub_cache_dir()
        if source.kind == "open_clip":
            repo, names = _open_clip_hub_file(source)
            return Path(hf_hub_download(repo, names[0], cache_dir=cache))
        if source.filename is not None:
            return Path(hf_hub_download(source.location, source.filename, subfolder=source.subfolder, cache_dir=cache))
        patterns = _SDXL_PATTERNS if key == "sdxl" else ([f"{source.subfolder}/*"] if source.subfolder else None)
        root = Path(snapshot_download(source.location, cache_dir=cache, allow_patterns=patterns))
        return root / source.subfolder if source.subfolder else root

    def sdxl_pipeline(self, device: str = "cpu", dtype: "torch.dtype | None" = None) -> "StableDiffusionXLPipeline":
        """The SDXL pipeline with an Euler scheduler, built once per (device, dtype) and reused.

        dtype defaults to torch.float32. The caller sets the progress bar.
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
            try:
                pipe = StableDiffusionXLPipeline.from_pretrained(path, **_dtype_kwarg(dtype), local_files_only=True)
            except (OSError, ValueError, KeyError) as exc:
                raise UserError(
                    f"cannot load an SDXL pipeline from this folder: {exc}",
                    path=path,
                    hint="give a folder in the diffusers layout (StableDiffusionXLPipeline.save_pretrained or hf download)",
                ) from exc
            # MS-Diffusion and RelationBooth sample with Euler (REFERENCE 1), SDXL base's own choice
            pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
            pipe = pipe.to(device=device)
        self._pipelines[cache_key] = pipe
        return pipe


    # -- MS-Diffusion's image encoder (REFERENCE 1) -----------------------------------------
    def image_encoder(self):
        """The CLIP vision tower MS-Diffusion encodes subjects with, float32 on the CPU."""
        if self.is_tiny:
            return build_tiny_image_encoder(self.preset.seed or 0)
        from transformers import CLIPVisionModelWithProjection

        path = self.fetch("image_encoder")
        try:
            return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot load a CLIP vision model from this folder: {exc}",
                path=path,
                hint="give the folder of CLIP ViT-bigG/14's vision tower (h94/IP-Adapter sdxl_models/image_encoder) "
                     "with --weight image_encoder=PATH",
            ) from exc

    # -- metric encoders (REFERENCE 4) ------------------------------------------------------
    def _clip_key(self, arch: str) -> str:
        if arch not in CLIP_KEYS:
            raise UserError(f"unknown CLIP architecture {arch!r}; choose one of {', '.join(CLIP_KEYS)}")
        return CLIP_KEYS[arch]

    def clip_id(self, arch: str = "ViT-B-32") -> str:
        """A stable name for the CLIP encoder `clip_model(arch)` loads (written next to scores)."""
        if self.is_tiny:
            return f"tiny:clip-{arch}-seed{self.preset.seed}"
        source = self._source(self._clip_key(arch))
        if source.kind == "open_clip":
            return f"open_clip:{source.model}/{source.location}"
        return f"open_clip:{arch}/local:{Path(source.location).name}"

    def dino_id(self) -> str:
        """A stable name for the DINO encoder `dino_model()` loads."""
        if self.is_tiny:
            return f"tiny:dino-vits16-seed{self.preset.seed}"
        source = self._source("dino")
        if source.kind == "local":
            return f"local:{Path(source.location).name}"
        return f"hf:{'/'.join(p for p in (source.location, source.subfolder) if p)}"

    def clip_model(self, arch: str = "ViT-B-32"):
        """The open_clip CLIP model (image and text towers), float32 on the CPU, in eval mode.

        Local checkpoint files are read as OpenAI-trained weights (QuickGELU), the weights
        every protocol here uses.
        """
        if self.is_tiny:
            return build_tiny_clip(arch, self.preset.seed or 0)
        import open_clip

        key = self._clip_key(arch)
        source, path = self._source(key), self.fetch(key)
        cfg = open_clip.get_pretrained_cfg(arch, source.location) if source.kind == "open_clip" else {}
        try:
            model = open_clip.create_model(arch, pretrained=str(path), force_quick_gelu=cfg.get("quick_gelu", True))
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise UserError(
                f"cannot load {arch} weights from this file: {exc}",
                path=path,
                hint=f"pass an open_clip {arch} checkpoint with --weight {key}=FILE",
            ) from exc
        return model.eval()

    def dino_model(self):
        """DINO ViT-S/16 as a transformers ViTModel without the pooler, float32 on the CPU."""
        if self.is_tiny:
            return build_tiny_dino(self.preset.seed or 0)
        from transformers import ViTModel

        path = self.fetch("dino")
        try:
            return ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot load a ViT (DINO) model from this folder: {exc}",
                path=path,
                hint="give the folder of facebook/dino-vits16 (config.json and weights) with --weight dino=PATH",
            ) from exc


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


def _dtype_kwarg(dtype) -> dict[str, Any]:
    """from_pretrained's dtype argument: `dtype` in newer diffusers, `torch_dtype` before."""
    from diffusers.utils import deprecation_utils

    name = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    return {name: dtype}


def _check_diffusers_folder(path: Path) -> None:
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise UserError(
            "the sdxl weights must be a folder in the diffusers layout (with model_index.json)",
            path=path,
            hint="use `hf download stabilityai/stable-diffusion-xl-base-1.0` or StableDiffusionXLPipeline.save_pretrained",
        )


# --------------------------------------------------------------------------- lookup


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
    parsed: dict[str, WeightSource] = {}
    for key, value in (overrides or {}).items():
        if key not in preset.weights:
            if not preset.weights:
                raise UserError(
                    f"the {name} backbone has no weights to override (it builds seeded random weights)",
                    hint="drop --weight, or use --backbone sdxl",
                )
            close = difflib.get_close_matches(key, preset.weights, n=1)
            guess = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(
                f"unknown weight key '{key}' for backbone {name}; {guess}keys: {', '.join(preset.weights)}",
                hint=f"--weight KEY=PATH_OR_HUB_ID with KEY one of {', '.join(preset.weights)}",
            )
        parsed[key] = _parse_override(key, value, preset.weights[key])
    return Backbone(preset, parsed)
