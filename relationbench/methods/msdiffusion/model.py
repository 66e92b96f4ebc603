"""The MS-Diffusion adapter on an SDXL UNet: resampler, dummy tokens, attention processors.

Dimensions come from the components (UNet cross-attention width, text encoder width, image
encoder width) and the resampler's own widths, so the tiny backbone builds a tiny
MS-Diffusion and sdxl the real one.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .attention import ImageConditioning, MSCrossAttnProcessor, SelfAttnProcessor
from .resampler import GroundingResampler, ResamplerConfig

NUM_DUMMY_TOKENS = 4


def attn2_modules(unet) -> dict[int, str]:
    """Index in unet.attn_processors order -> attention module name, for every attn2.

    The official checkpoint numbers its processors in this order (attn1 at even, attn2 at odd
    indices on SDXL); the map is read from the UNet, never assumed.
    """
    out = {}
    for k, name in enumerate(unet.attn_processors):
        module = name.removesuffix(".processor")
        if module.endswith("attn2"):
            out[k] = module
    return out


class MSAdapter(nn.Module):
    """Installs MS-Diffusion's processors on `unet` and holds the trainable/loaded parts."""

    def __init__(self, unet, cfg: ResamplerConfig, num_dummy: int = NUM_DUMMY_TOKENS):
        super().__init__()
        cross = unet.config.cross_attention_dim
        if cfg.output_dim != cross:
            cfg = replace(cfg, output_dim=cross)
        self.cfg = cfg
        self.resampler = GroundingResampler(cfg)
        self.dummy_image_tokens = nn.Parameter(torch.randn(1, num_dummy, cross))
        self.index = attn2_modules(unet)
        processors: dict[str, nn.Module] = {}
        self.cross = nn.ModuleDict()  # attn2 processors by checkpoint index
        for k, name in enumerate(unet.attn_processors):
            module = name.removesuffix(".processor")
            if k in self.index:
                attn = unet.get_submodule(module)
                proc = MSCrossAttnProcessor(attn.to_k.out_features, attn.to_k.in_features)
                self.cross[str(k)] = proc
                processors[name] = proc
            else:
                processors[name] = SelfAttnProcessor()
        unet.set_attn_processor(processors)

    @property
    def num_dummy(self) -> int:
        return self.dummy_image_tokens.shape[1]

    def subject_tokens(self, image_embeds: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """[N, 257, E] encoder tokens, [N, P] phrase embeddings, [N, 4] boxes -> [N, 16, D]."""
        return self.resampler(image_embeds, phrase_embeds, boxes)

    def conditioning(self, tokens: list[torch.Tensor], boxes: list[torch.Tensor], scales: list[torch.Tensor],
                     latent_hw: tuple[int, int], guidance: bool, phrase_masks: list[torch.Tensor] | None = None,
                     mask_threshold: float | None = None, start_step: int = 5) -> ImageConditioning:
        """Pack rows with different subject counts into one batch (zero padding, scale 0) and,
        with guidance, put the unconditional half (zero tokens, zero boxes) first, as the
        diffusers pipeline orders its batch.

        tokens[i]: [S_i, 16, D]; boxes[i]: [S_i, 4]; scales[i]: [S_i]; phrase_masks[i]:
        [S_i, text tokens] (auto layout only).
        """
        s_max = max(t.shape[0] for t in tokens)
        q, d = tokens[0].shape[1], tokens[0].shape[2]
        dev, dtype = tokens[0].device, tokens[0].dtype
        b = len(tokens)
        tok = torch.zeros(b, s_max, q, d, device=dev, dtype=dtype)
        box = torch.zeros(b, s_max, 4, device=dev, dtype=torch.float32)
        sc = torch.zeros(b, s_max, device=dev, dtype=torch.float32)
        for i, (t, bx, s) in enumerate(zip(tokens, boxes, scales)):
            tok[i, : t.shape[0]], box[i, : t.shape[0]], sc[i, : t.shape[0]] = t, bx, s
        seq = torch.cat([self.dummy_image_tokens.to(dtype).expand(b, -1, -1), tok.flatten(1, 2)], dim=1)
        phrase = None
        if phrase_masks is not None:
            phrase = torch.zeros(b, s_max, phrase_masks[0].shape[-1], device=dev)
            for i, m in enumerate(phrase_masks):
                phrase[i, : m.shape[0]] = m
        packed = [seq, box, sc] + ([phrase] if phrase is not None else [])
        if guidance:
            packed = [torch.cat([torch.zeros_like(x), x]) for x in packed]
        return ImageConditioning(*packed[:3], latent_hw, self.num_dummy,
                                 phrase_mask=packed[3] if phrase is not None else None,
                                 mask_threshold=mask_threshold, start_step=start_step)
