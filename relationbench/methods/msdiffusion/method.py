"""The `msdiffusion` method: SDXL with MS-Diffusion's grounded subject tokens.

Case -> inputs: each subject's reference image (one per subject, recorded in the manifest)
through the CLIP vision tower, its class noun as the grounding phrase, the case's boxes as
the layout. Sampling is the stock diffusers SDXL pipeline with our processors installed and
the image conditioning passed per call in cross_attention_kwargs (no state between calls).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ...backbones import seeded
from ...data import reference_images
from ...errors import UserError
from ..base import Context, Request, Sample
from ..sampling import PipelineMethod, sample_sdxl
from .checkpoint import load_checkpoint, read_checkpoint
from .encoder import ADAPTER_SEED_OFFSET, TINY_IMAGE_ENCODER, TINY_RESAMPLER, load_image_encoder
from .model import MSAdapter
from .resampler import ResamplerConfig

PROMPT_PREFIX = "best quality, high quality, "
NEGATIVE_PROMPT = "monochrome, lowres, bad anatomy, worst quality, low quality"
REFERENCE_SIZE = 512  # references are resized to 512 x 512 before CLIP's own preprocessing


@dataclass(frozen=True)
class MSDiffusionSettings:
    steps: int = 30  # Euler, REFERENCE 1
    guidance_scale: float = 7.5  # MS-Diffusion's script (the RelationBooth code uses 5.0)
    scale: float = 0.6  # image branch weight (0.4 when a subject fills the image)
    subject_scales: tuple[float, ...] | None = None  # per subject position; replaces `scale`
    prompt_prefix: str = PROMPT_PREFIX
    negative_prompt: str = NEGATIVE_PROMPT
    reference_index: int = 0  # which of a subject's reference images (sorted by name)
    offload_image_encoder: bool = False  # move the encoder to the CPU once subjects are encoded
    mask_threshold: float | None = None  # auto layout (official value 0.5): attention maps replace boxes
    start_step: int = 5  # auto layout: from this many recorded steps on
    fuse_projections: bool = False  # diffusers' fused q/k/v (self) and k/v (text) matmuls: same images
    height: int | None = None  # None: the backbone's resolution
    width: int | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.subject_scales is not None:
            object.__setattr__(self, "subject_scales", tuple(float(s) for s in self.subject_scales))
        for side in (self.height, self.width):
            if side is not None and side % 8:
                raise ValueError(f"height and width must be multiples of 8, got {side}")


def resampler_config(backbone, unet, text_encoder) -> ResamplerConfig:
    """The official widths on sdxl; toy widths on tiny; the rest read from the components."""
    if backbone.is_tiny:
        return ResamplerConfig(**TINY_RESAMPLER, embedding_dim=TINY_IMAGE_ENCODER["hidden_size"],
                               output_dim=unet.config.cross_attention_dim,
                               phrase_embeddings_dim=text_encoder.config.hidden_size)
    return ResamplerConfig(output_dim=unet.config.cross_attention_dim,
                           phrase_embeddings_dim=text_encoder.config.hidden_size)


class MSDiffusionMethod(PipelineMethod):
    Settings = MSDiffusionSettings
    needs_references: ClassVar[bool] = True
    weights: ClassVar[tuple[str, ...]] = ("sdxl", "image_encoder", "msdiffusion")  # checked before any work

    def __init__(self, settings: MSDiffusionSettings, context: Context):
        super().__init__(settings, context)
        self.adapter: MSAdapter | None = None
        self._encoder = None
        self._processor = None
        self._unet_processors: dict | None = None  # the shared UNet's own, put back by close()
        self._embeds: dict[str, torch.Tensor] = {}  # reference path -> [257, E]
        self._phrases: dict[str, torch.Tensor] = {}  # phrase -> pooled text embedding
        self._references: dict[str, str] = {}  # subject name -> its reference image path

    # -- lifecycle ---------------------------------------------------------------------------
    def check(self, cases) -> None:
        """Every subject of every case has the reference image the settings ask for."""
        for subject in {s.name: s for c in cases for s in c.subjects}.values():
            self.reference(subject)

    def load(self) -> None:
        """SDXL, the adapter (processors installed, official checkpoint loaded strictly) and the
        image encoder (its width checked): every weight, before the run writes anything."""
        if self.adapter is not None:
            return
        super().load()
        ctx, pipe = self.context, self._pipe
        cfg = resampler_config(ctx.backbone, pipe.unet, pipe.text_encoder)
        self._unet_processors = dict(pipe.unet.attn_processors)
        # random weights (seeded: tiny keeps them, sdxl replaces them with the checkpoint's)
        adapter = seeded(ctx.backbone.preset.seed or 0, ADAPTER_SEED_OFFSET, lambda: MSAdapter(pipe.unet, cfg))
        if not ctx.backbone.is_tiny:
            path = ctx.backbone.fetch("msdiffusion")
            load_checkpoint(adapter, read_checkpoint(path), path)
        self.adapter = adapter.to(device=ctx.device, dtype=pipe.unet.dtype).eval()
        if self.settings.fuse_projections:
            self.adapter.fuse_projections(pipe.unet)
        self._encoder, self._processor = self._load_image_encoder()

    def close(self) -> None:
        """Put the UNet's own attention processors back and unfuse what load() fused: the
        backbone's pipeline is shared."""
        if self.adapter is not None and self.settings.fuse_projections:
            self.adapter.unfuse_projections(self._pipe.unet)
        if self._unet_processors is not None:
            self._pipe.unet.set_attn_processor(self._unet_processors)
        self._unet_processors = None
        self.adapter = self._encoder = self._processor = None
        self._embeds.clear()
        self._phrases.clear()
        self._references.clear()

    @property
    def pipe(self):
        if self.adapter is None:
            self.load()
        return self._pipe

    def _load_image_encoder(self):
        """The CLIP vision tower (checked to be as wide as the resampler expects) and its
        preprocessing; called by load(), once the adapter says which width fits."""
        from transformers import CLIPImageProcessor

        want = self.adapter.cfg.embedding_dim
        encoder = load_image_encoder(self.context.backbone)
        if encoder.config.hidden_size != want:
            raise UserError(
                f"MS-Diffusion needs the CLIP ViT-bigG/14 vision tower (hidden size {want}); this image "
                f"encoder has hidden size {encoder.config.hidden_size}"
                + (" (a ViT-H/14: the SD 1.5 IP-Adapter encoder)" if encoder.config.hidden_size == 1024 else ""),
                hint="use h94/IP-Adapter sdxl_models/image_encoder (--weight image_encoder=PATH)",
            )
        # 224, bicubic, centre crop, OpenAI mean/std
        return encoder.to(self.context.device, self._pipe.unet.dtype), CLIPImageProcessor()

    def reference(self, subject) -> str:
        """The path of the subject's reference image number `reference_index` (by file name),
        looked up once per subject."""
        if subject.name in self._references:
            return self._references[subject.name]
        refs = reference_images(subject, self.context.data_root)
        if not refs:
            raise UserError(f"subject {subject.name!r} has no reference images",
                            hint=f"relbench data fetch {subject.source}")
        index = self.settings.reference_index
        if not 0 <= index < len(refs):
            raise UserError(
                f"reference_index {index} is out of range for subject {subject.name!r}, "
                f"which has {len(refs)} reference image(s) (indices 0 to {len(refs) - 1})",
                hint=f"--set reference_index=N with 0 <= N < {len(refs)} (the smallest subject count bounds it)",
            )
        self._references[subject.name] = str(refs[index])
        return self._references[subject.name]

    # -- encoding (once per subject / phrase) ----------------------------------------------------
    def prepare(self, cases) -> None:
        self.encode_references([self.reference(s) for c in cases for s in c.subjects])
        if self.settings.offload_image_encoder and self._encoder is not None:
            self._encoder.to("cpu")

    @torch.inference_mode()
    def encode_references(self, paths: Sequence[str]) -> None:
        """image_tokens() of each reference image file, once per file."""
        self.encode_files(paths, self._embeds, self.image_tokens)

    @torch.inference_mode()
    def encode_files(self, paths: Sequence[str], cache: dict, encode) -> None:
        """cache[path] = encode(images)[k] for each reference file not yet in `cache`, read as
        the references are (the one image reader, resized to REFERENCE_SIZE square, bicubic),
        16 files per call of encode(list of PIL images) -> a sequence of one result per image."""
        from PIL import Image

        from ...images import read_image

        todo = [p for p in dict.fromkeys(paths) if p not in cache]
        if todo:
            self.pipe  # noqa: B018  (loads and checks the encoder before any image is read)
        for i in range(0, len(todo), 16):
            chunk = todo[i : i + 16]
            images = [read_image(p).resize((REFERENCE_SIZE, REFERENCE_SIZE), Image.Resampling.BICUBIC)
                      for p in chunk]
            cache.update(zip(chunk, encode(images)))

    @torch.inference_mode()
    def image_tokens(self, images: Sequence) -> torch.Tensor:
        """What the resampler reads of each reference (PIL, REFERENCE_SIZE square): the vision
        tower's penultimate hidden states [B, 257, E] (on the method's device)."""
        self.pipe  # noqa: B018  (loads the encoder with everything else)
        encoder = self._encoder
        device = next(encoder.parameters()).device
        pixels = self._processor(images=list(images), return_tensors="pt").pixel_values.to(device, encoder.dtype)
        return encoder(pixels, output_hidden_states=True).hidden_states[-2].to(self.context.device)

    @torch.inference_mode()
    def phrase_embeds(self, phrases: Sequence[str]) -> torch.Tensor:
        """Pooled output of SDXL's first text encoder for each phrase (memoized)."""
        pipe = self.pipe
        new = [p for p in dict.fromkeys(phrases) if p not in self._phrases]
        if new:
            ids = pipe.tokenizer(new, max_length=pipe.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids.to(self.context.device)
            self._phrases.update(zip(new, pipe.text_encoder(ids).pooler_output))
        return torch.stack([self._phrases[p] for p in phrases])

    def phrase_mask(self, prompt: str, phrases: Sequence[str]) -> torch.Tensor:
        """[S, 77]: the prompt's token positions of each phrase (in order, each after the
        previous one), for the auto layout's attention maps."""
        tok = self.pipe.tokenizer
        ids = tok(prompt, max_length=tok.model_max_length, padding="max_length", truncation=True).input_ids
        mask = torch.zeros(len(phrases), len(ids))
        start = 1
        for j, phrase in enumerate(phrases):
            sub = tok(phrase, add_special_tokens=False).input_ids
            at = next((i for i in range(start, len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub), None)
            if at is None:
                at = next((i for i in range(1, len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub), None)
            if at is None:
                raise UserError(f"the phrase {phrase!r} is not among the tokens of the prompt {prompt!r}",
                                hint="auto layout needs each class noun in the prompt; switch it off (mask_threshold: null)")
            mask[j, at : at + len(sub)] = 1
            start = at + len(sub)
        return mask

    # -- sampling ----------------------------------------------------------------------------------
    def _scales(self, n: int) -> torch.Tensor:
        s = self.settings
        if s.subject_scales is None:
            return torch.full((n,), s.scale)
        if len(s.subject_scales) < n:
            raise UserError(f"subject_scales has {len(s.subject_scales)} values but a case has {n} subjects")
        return torch.tensor(s.subject_scales[:n])

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        s, pipe = self.settings, self.pipe
        device, dtype = self.context.device, pipe.unet.dtype
        height, width = self.size()
        refs = [[self.reference(subj) for subj in r.case.subjects] for r in requests]
        self.encode_references([p for row in refs for p in row])
        tokens, boxes, scales = [], [], []
        for r, row in zip(requests, refs):
            box = torch.tensor(r.case.boxes, dtype=torch.float32, device=device)
            phrases = self.phrase_embeds([subj.class_noun for subj in r.case.subjects]).to(dtype)
            image = torch.stack([self._embeds[p] for p in row]).to(dtype)
            tokens.append(self.adapter.subject_tokens(image, phrases, box.to(dtype)))
            boxes.append(box)
            scales.append(self._scales(len(row)).to(device))
        scale_factor = pipe.vae_scale_factor
        latent_hw = (height // scale_factor, width // scale_factor)
        guidance = s.guidance_scale > 1
        prompts = [s.prompt_prefix + r.case.prompt for r in requests]
        phrase_masks = None
        if s.mask_threshold is not None:
            phrase_masks = [self.phrase_mask(p, [subj.class_noun for subj in r.case.subjects]).to(device)
                            for p, r in zip(prompts, requests)]
        ms = self.adapter.conditioning(tokens, boxes, scales, latent_hw, guidance, phrase_masks,
                                       s.mask_threshold, s.start_step)
        adapter = self.adapter

        def check_first_step(pipe, step, timestep, callback_kwargs):
            """After the first UNet call: our processors ran on every attn2 (never plain SDXL)."""
            if step == 0:
                adapter.check_installed(pipe.unet, ms)
            return callback_kwargs

        images = sample_sdxl(pipe, requests, prompts, steps=s.steps, guidance_scale=s.guidance_scale,
                             negative_prompt=s.negative_prompt, height=height, width=width, device=device,
                             cross_attention_kwargs={"ms": ms}, callback_on_step_end=check_first_step)
        extra = {"prompt_prefix": s.prompt_prefix} if s.prompt_prefix else {}
        return [Sample(img, {"prompt": p, "references": row, **extra}) for img, p, row in zip(images, prompts, refs)]
