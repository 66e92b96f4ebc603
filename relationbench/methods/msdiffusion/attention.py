"""MS-Diffusion's masked image cross-attention, vectorized, as processors for SDXL's UNet.

Every attn2 keeps its own to_q/to_k/to_v/to_out as the text path (so a LoRA on them, e.g.
RelationLoRA, wraps exactly those) and gains to_k_ip/to_v_ip for the image tokens:

    out = to_out( text_attention + image_attention )
    image tokens per row: 4 dummy tokens, then 16 per subject (REFERENCE 1)
    subject j's tokens are reachable only from cells in box j (bias -10000 elsewhere);
    dummy tokens only from background cells (in no box); image attention is zeroed on
    background cells after the softmax; a cell in several boxes attends to all of them.
    scale multiplies the image branch (per-subject scales replace it, token by token).

Rows without boxes (classifier-free guidance's unconditional half: zero boxes, zero tokens)
contribute exactly zero, so the image branch runs only on rows with a box. Masks are built
once per layer resolution and call, for the whole batch, without Python loops over rows,
subjects or layers, and the image tokens' keys and values once per layer and call; the
image branch is one scaled_dot_product_attention with an additive mask. Per-token scales are applied to the values, which equals scaling the probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MASK_BIAS = -10000.0  # the official additive bias outside a token's region


def grid_for(tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a UNet layer with `tokens` cells, from the latent size: each level halves
    (rounding up, as stride-2 convolutions do), so H != W works too."""
    h, w = latent_hw
    for _ in range(8):
        if h * w == tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"no UNet level of a {latent_hw} latent has {tokens} cells")


def box_cells(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, S, 4] normalized xyxy -> [B, h*w, S] bool: cell (y, x) is in box s when
    floor(x0*w) <= x <= ceil(x1*w)-1 and the same for y. A zero box covers nothing."""
    boxes = boxes.float()
    x0, y0 = torch.floor(boxes[..., 0] * w), torch.floor(boxes[..., 1] * h)
    x1, y1 = torch.ceil(boxes[..., 2] * w), torch.ceil(boxes[..., 3] * h)
    xs = torch.arange(w, device=boxes.device, dtype=torch.float32)
    ys = torch.arange(h, device=boxes.device, dtype=torch.float32)
    in_x = (xs >= x0[..., None]) & (xs < x1[..., None])  # [B, S, w]
    in_y = (ys >= y0[..., None]) & (ys < y1[..., None])  # [B, S, h]
    cells = in_y[..., :, None] & in_x[..., None, :]  # [B, S, h, w]
    return cells.flatten(2).transpose(1, 2)


class ImageConditioning:
    """The image side of one UNet call: tokens, boxes and scales per batch row, and the masks
    derived from them (built on first use per resolution, dropped with the object).

    tokens: [B, dummy + S * queries, D]; boxes: [B, S, 4]; scales: [B, S] (a subject's scale,
    0 for padding). Rows whose boxes are all zero are left out of the image branch.

    Auto layout (optional, `phrase_mask` [B, S, text tokens] marking each subject's phrase in
    the prompt, and `mask_threshold`): every attn2 records, per call, the text attention of
    each phrase (mean over heads and phrase tokens); from its `start_step`-th call on, the
    mean of its records, min-max normalized per map and thresholded, replaces the boxes at
    that layer. The records live in this object, i.e. for one sampling call only.
    """

    def __init__(self, tokens: torch.Tensor, boxes: torch.Tensor, scales: torch.Tensor,
                 latent_hw: tuple[int, int], num_dummy: int = 4, phrase_mask: torch.Tensor | None = None,
                 mask_threshold: float | None = None, start_step: int = 5):
        b, s, _ = boxes.shape
        queries = (tokens.shape[1] - num_dummy) // max(s, 1)
        if tokens.shape[0] != b or tokens.shape[1] != num_dummy + s * queries or scales.shape != (b, s):
            raise ValueError(f"tokens {tuple(tokens.shape)}, boxes {tuple(boxes.shape)} and scales "
                             f"{tuple(scales.shape)} do not describe one batch")
        self.rows = torch.nonzero(boxes.flatten(1).abs().sum(-1) > 0).flatten()
        self.all_rows = len(self.rows) == b
        self.tokens = tokens[self.rows]
        self.boxes = boxes[self.rows]
        self.num_dummy, self.queries, self.latent_hw = num_dummy, queries, latent_hw
        dummy = torch.ones(len(self.rows), num_dummy, device=scales.device, dtype=scales.dtype)
        self.token_scales = torch.cat([dummy, scales[self.rows].repeat_interleave(queries, dim=1)], dim=1)
        self._masks: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.auto = phrase_mask is not None and mask_threshold is not None
        if self.auto:
            self.phrase_mask = phrase_mask[self.rows].float()  # type: ignore[index]
            self.mask_threshold, self.start_step = float(mask_threshold), start_step  # type: ignore[arg-type]
            self._maps: dict[int, list[torch.Tensor]] = {}

    def masks(self, cells: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(additive bias [R, 1, cells, T], foreground [R, cells, 1]) from the boxes."""
        key = (cells, dtype)
        if key not in self._masks:
            h, w = grid_for(cells, self.latent_hw)
            self._masks[key] = self._bias(box_cells(self.boxes, h, w), dtype)
        return self._masks[key]

    def image_kv(self, proc: "MSCrossAttnProcessor", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and scaled values of the image tokens: the same at every denoising
        step, so computed at its first step only (without autograd; training recomputes)."""
        key = (id(proc), dtype)
        if key in self._kv:
            return self._kv[key]
        tokens = self.tokens.to(dtype)
        kv = (proc.to_k_ip(tokens), proc.to_v_ip(tokens) * self.token_scales.to(dtype)[..., None])
        if not torch.is_grad_enabled():
            self._kv[key] = kv
        return kv

    def _bias(self, inside: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """inside [R, cells, S] -> (bias, foreground): subject tokens where in the subject's
        region, dummy tokens where in none, MASK_BIAS elsewhere."""
        foreground = inside.any(-1, keepdim=True)
        allowed = torch.cat([(~foreground).expand(-1, -1, self.num_dummy),
                             inside.repeat_interleave(self.queries, dim=-1)], dim=-1)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, MASK_BIAS)
        return bias[:, None], foreground.to(dtype)

    def record(self, layer: int, probs: torch.Tensor) -> None:
        """Text attention probabilities [R, heads, cells, text tokens] of one layer and call."""
        weights = self.phrase_mask / self.phrase_mask.sum(-1, keepdim=True).clamp(min=1)  # [R, S, T]
        maps = torch.einsum("rnt,rst->rns", probs.float().mean(1), weights)  # [R, cells, S]
        self._maps.setdefault(layer, []).append(maps)

    def layer_masks(self, layer: int, cells: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks a layer uses now: from its recorded attention once it has start_step
        records (auto layout), else from the boxes."""
        if not self.auto or len(self._maps.get(layer, ())) < max(self.start_step, 1):
            return self.masks(cells, dtype)
        mean = torch.stack(self._maps[layer]).mean(0)
        low, high = mean.amin(1, keepdim=True), mean.amax(1, keepdim=True)
        return self._bias((mean - low) / (high - low + 1e-5) > self.mask_threshold, dtype)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """[B, N, inner] x [B, M, inner] -> [B, N, inner] over attn.heads heads (SDPA)."""
    b, heads = q.shape[0], attn.heads
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, scale=attn.scale)
    return out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1])


def _text_probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities [B, heads, N, M] (auto layout needs them explicitly)."""
    b, heads = q.shape[0], attn.heads
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    return torch.softmax((split(q) @ split(k).transpose(-2, -1)).float() * attn.scale, dim=-1)


class MSCrossAttnProcessor(nn.Module):
    """attn2 of the UNet: the text cross-attention plus the masked image branch."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ms: ImageConditioning | None = None):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("MSCrossAttnProcessor expects a transformer block's attn2 ([B, N, C] input)")
        residual = hidden_states
        if encoder_hidden_states is None:
            raise ValueError("attn2 needs the text embeddings")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1],
                                                         hidden_states.shape[0])
            attention_mask = attention_mask.view(hidden_states.shape[0], attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        out = _attention(attn, query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states),
                         attention_mask)
        if ms is not None and len(ms.rows):
            q = query if ms.all_rows else query[ms.rows]
            if ms.auto:
                ms.record(id(self), _text_probs(attn, q, attn.to_k(encoder_hidden_states[ms.rows])))
            bias, foreground = ms.layer_masks(id(self), hidden_states.shape[1], query.dtype)
            k, v = ms.image_kv(self, query.dtype)
            image = _attention(attn, q, k, v, bias) * foreground
            out = out + image if ms.all_rows else out.index_add(0, ms.rows, image)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SelfAttnProcessor(nn.Module):
    """attn1: plain scaled-dot-product self-attention that accepts (and ignores) `ms`, so the
    conditioning can travel in cross_attention_kwargs without warnings."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ms: ImageConditioning | None = None):
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("SelfAttnProcessor expects a transformer block's attn1 ([B, N, C] input)")
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
            attention_mask = attention_mask.view(hidden_states.shape[0], attn.heads, -1, attention_mask.shape[-1])
        out = _attention(attn, attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attention_mask)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
