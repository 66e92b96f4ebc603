"""MS-Diffusion's grounding resampler: one subject image + its phrase and box -> 16 tokens.

Architecture as REFERENCE 1 describes the official model (module names follow the official
checkpoint's keys, so its state dict loads as is):

    queries  = latent_norm(latent_proj([phrase embedding ; fourier(box)]))   [16, dim]
               (or the learned grounding_latents where grounding is dropped)
    x        = proj_in(image tokens)                                          [257, dim]
    depth x  queries += perceiver_attention(x, queries); queries += feed_forward(queries)
    out      = norm_out(proj_out(attention_norm(queries)))                    [16, output_dim]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ResamplerConfig:
    """Values of every official script (the official class defaults differ)."""

    dim: int = 1280
    depth: int = 4
    dim_head: int = 64
    heads: int = 20
    num_queries: int = 16
    embedding_dim: int = 1664  # image encoder hidden size (CLIP ViT-bigG/14)
    output_dim: int = 2048  # the UNet's cross-attention dim
    ff_mult: int = 4
    phrase_embeddings_dim: int = 768  # pooled output of SDXL's first text encoder
    fourier_freqs: int = 8
    fourier_temperature: float = 100.0

    @property
    def grounding_dim(self) -> int:
        return self.phrase_embeddings_dim + self.fourier_freqs * 2 * 4  # sin/cos x 4 coordinates


def fourier_box_embedding(boxes: torch.Tensor, freqs: int = 8, temperature: float = 100.0) -> torch.Tensor:
    """[N, 4] normalized xyxy -> [N, freqs * 2 * 4], laid out [freq, (sin, cos), coordinate].

    The layout is part of the checkpoint: latent_proj's first Linear was trained on it.
    """
    bands = temperature ** (torch.arange(freqs, device=boxes.device, dtype=torch.float32) / freqs)
    angles = boxes.float()[:, None, :] * bands[None, :, None]  # [N, freq, coord]
    out = torch.stack((angles.sin(), angles.cos()), dim=2)  # [N, freq, 2, coord]
    return out.reshape(boxes.shape[0], -1).to(boxes.dtype)


class PerceiverAttention(nn.Module):
    """Queries attend to [image tokens ; queries]; q and k each scaled by dim_head ** -0.25,
    softmax in float32 (stable in half precision)."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        q = heads(self.to_q(latents))
        k, v = (heads(t) for t in self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1))
        s = self.dim_head ** -0.25
        weight = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
        return self.to_out((weight @ v).transpose(1, 2).reshape(b, n, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear (no bias), GELU, Linear (no bias): keys 0, 1, 3 in the checkpoint."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class GroundingResampler(nn.Module):
    def __init__(self, cfg: ResamplerConfig):
        super().__init__()
        self.cfg = cfg
        g = cfg.grounding_dim
        self.grounding_latents = nn.Parameter(torch.randn(1, cfg.num_queries, cfg.dim) / math.sqrt(cfg.dim))
        self.latent_proj = nn.Sequential(nn.Linear(g, 2 * g), nn.GELU(), nn.Linear(2 * g, cfg.dim * cfg.num_queries))
        self.latent_norm = nn.LayerNorm(cfg.dim)
        self.proj_in = nn.Linear(cfg.embedding_dim, cfg.dim)
        self.attention_norm = nn.LayerNorm(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.output_dim)
        self.norm_out = nn.LayerNorm(cfg.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(cfg.dim, cfg.dim_head, cfg.heads), feed_forward(cfg.dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )

    def queries(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """[N, phrase dim], [N, 4], optional [N] bool -> [N, num_queries, dim]."""
        cfg = self.cfg
        fourier = fourier_box_embedding(boxes.to(phrase_embeds.dtype), cfg.fourier_freqs, cfg.fourier_temperature)
        latents = self.latent_proj(torch.cat((phrase_embeds, fourier), dim=-1))
        latents = self.latent_norm(latents.view(-1, cfg.num_queries, cfg.dim))
        if drop is not None:
            latents = torch.where(drop.view(-1, 1, 1), self.grounding_latents.to(latents.dtype), latents)
        return latents

    def forward(self, image_tokens: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """One row per subject: [N, 257, embedding_dim] -> [N, num_queries, output_dim]."""
        latents = self.queries(phrase_embeds, boxes, drop)
        x = self.proj_in(image_tokens)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(self.attention_norm(latents)))
