"""MS-Diffusion's masked image cross-attention, vectorized, as processors for SDXL's UNet.

Every attn2 keeps its own to_q/to_k/to_v/to_out as the text path (so a LoRA on them, e.g.
RelationLoRA, wraps exactly those) and gains to_k_ip/to_v_ip for the image tokens:

    out = to_out( text_attention + image_attention )
    image tokens per row: 4 dummy tokens, then 16 per subject (REFERENCE 1)
    subject j's tokens are reachable only from cells in box j (bias -10000 elsewhere);
    dummy tokens only from background cells (in no box); image attention is zeroed on
    background cells after the softmax; a cell in several boxes attends to all of them.
    scale multiplies the image branch (per-subject scales replace it, token by token).

Speed without changing a number: everything that depends only on the call's inputs (masks
per layer resolution, the image tokens' keys and values per layer) is built once, before the
denoising loop, by ImageConditioning; inside the loop every shape is static (the rows without
boxes that lead the batch, classifier-free guidance's unconditional half, are a fixed slice
left out of the image branch; any other row without boxes contributes exactly zero through
its all-background mask), and the auto layout keeps fixed-size running sums. So a compiled
UNet traces once per batch layout (batches that mix subject counts add one graph per mix of
row groups). Padding changes no bit: a row with fewer subjects than the batch's widest
attends to its own tokens only (key_groups), and each subject's phrase map is its own
product (phrase_attention), so a row computes as it would alone (on the CPU, given MKL's
strict mode and the run loop's batches of at least 4; generate.py). Fused projections
(diffusers' `Attention.fuse_projections`: to_qkv on self-attention, to_kv on cross-attention)
are used when present. The image path has nothing to fuse for: its keys and values are
computed once per sampling call, not per step, so a fused [to_k_ip; to_v_ip] copy (about 340M
parameters on SDXL) would buy one matmul launch per layer and call.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

MASK_BIAS = -10000.0  # the official additive bias outside a token's region


def level_grid(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """The (h, w) of UNet level `level` (0: the latent itself; each level halves, rounding up)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


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


def key_groups(slots: list[list[bool]], num_dummy: int, queries: int,
               device) -> list[tuple[torch.Tensor | None, int]]:
    """Rows by the number of image tokens they attend to: [(row indices, tokens)], indices
    None where one group holds every row (the common case: no gather).

    slots [R][S]: which subject slots a row uses (a box, or a phrase in the auto layout). A row
    attends to the dummy tokens and the tokens up to its last used slot; the slots after it only
    pad the row to the batch's widest, and are left out rather than masked: the CPU's attention
    kernel rounds differently with the key length, so with masked padding a one-subject row's
    image would depend on what else is in its batch.
    """
    by_tokens: dict[int, list[int]] = {}
    for row, used in enumerate(slots):
        last = max((j + 1 for j, on in enumerate(used) if on), default=0)
        by_tokens.setdefault(num_dummy + queries * last, []).append(row)
    if len(by_tokens) == 1:
        return [(None, next(iter(by_tokens)))]
    return [(torch.tensor(rows, device=device), n) for n, rows in sorted(by_tokens.items())]


def phrase_attention(text_probs: torch.Tensor, phrase_weights: torch.Tensor) -> torch.Tensor:
    """text_probs [R, heads, cells, text tokens], phrase_weights [R, S, text tokens] -> [R, cells, S]:
    each subject's attention map (mean over heads, weighted over its phrase's tokens).

    One matrix-vector product per subject slot: a product over all slots at once takes another
    kernel on the CPU when S changes (e.g. a one-subject row padded to two rounds differently).
    """
    probs = text_probs.float().mean(1)
    return torch.cat([probs @ phrase_weights[:, j, :, None] for j in range(phrase_weights.shape[1])], dim=-1)


class ImageConditioning:
    """The image side of one sampling call: tokens, boxes and scales per batch row, with all
    it derives for the given attn2 processors prepared here, before the denoising loop.

    tokens: [B, dummy + S * queries, D]; boxes: [B, S, 4]; scales: [B, S] (a subject's scale,
    0 for padding); grids: each MSCrossAttnProcessor that will see this object -> its layer's
    (h, w). The leading rows whose boxes are all zero (the unconditional half) are left out of
    the image branch: rows `start:` take part (`start` is fixed here, a static slice). Zero
    boxes after a row's last subject pad it to S: `groups` (key_groups) leaves their tokens
    out of that row's attention.

    Per layer: the image keys and scaled values [R, T, inner] and the box masks of its
    resolution; `calls` [layers] counts the calls each layer made (so a caller can check that
    every layer consumed it).

    Auto layout (optional, `phrase_mask` [B, S, text tokens] marking each subject's phrase in
    the prompt, and `mask_threshold`): every layer adds, per call, the text attention of each
    phrase (mean over heads and phrase tokens) to a running sum [R, cells, S]; from its
    `start_step`-th call on, the mean (sum / calls), min-max normalized per map and
    thresholded, replaces the boxes at that layer. The choice is a tensor select, not a Python
    branch, so a compiled UNet does not retrace at the switch. The sums live in this object,
    i.e. for one sampling call only.
    """

    def __init__(self, tokens: torch.Tensor, boxes: torch.Tensor, scales: torch.Tensor,
                 grids: Mapping["MSCrossAttnProcessor", tuple[int, int]], num_dummy: int = 4,
                 phrase_mask: torch.Tensor | None = None, mask_threshold: float | None = None, start_step: int = 5):
        b, s, _ = boxes.shape
        queries = (tokens.shape[1] - num_dummy) // max(s, 1)
        if tokens.shape[0] != b or tokens.shape[1] != num_dummy + s * queries or scales.shape != (b, s):
            raise ValueError(f"tokens {tuple(tokens.shape)}, boxes {tuple(boxes.shape)} and scales "
                             f"{tuple(scales.shape)} do not describe one batch")
        auto = phrase_mask is not None and mask_threshold is not None
        boxed = boxes.abs().sum(-1) > 0  # [B, S]
        used = boxed | (phrase_mask.abs().sum(-1) > 0) if auto else boxed  # type: ignore[union-attr]
        boxed_rows, used_rows = torch.stack([boxed, used]).tolist()  # one host sync, before the loop
        self.batch = b
        self.start = next((i for i, row in enumerate(boxed_rows) if any(row)), b)
        self.rows = b - self.start
        self.num_dummy, self.queries = num_dummy, queries
        self.groups = key_groups(used_rows[self.start :], num_dummy, queries, boxes.device)
        boxes = boxes[self.start :]
        dummy = torch.ones(self.rows, num_dummy, device=scales.device, dtype=scales.dtype)
        token_scales = torch.cat([dummy, scales[self.start :].repeat_interleave(queries, dim=1)], dim=1)
        tokens = tokens[self.start :]
        dtype = tokens.dtype
        self._procs = list(grids)
        self._grid = {id(proc): grid for proc, grid in grids.items()}
        self._slot = {id(proc): i for i, proc in enumerate(grids)}
        self.calls = torch.zeros(len(grids), dtype=torch.int64, device=tokens.device)
        self._masks = {grid: self._bias(box_cells(boxes, *grid), dtype) for grid in set(grids.values())}
        self._kv = {id(proc): proc.image_kv(tokens, token_scales) for proc in grids}
        self.auto = auto
        if auto:
            phrase = phrase_mask[self.start :].float()  # type: ignore[index]
            self._phrase_weights = phrase / phrase.sum(-1, keepdim=True).clamp(min=1)  # [R, S, T]
            self.mask_threshold, self.start_step = float(mask_threshold), max(start_step, 1)  # type: ignore[arg-type]
            self._sums = {id(proc): torch.zeros(self.rows, h * w, s, device=tokens.device)
                          for proc, (h, w) in grids.items()}

    def _bias(self, inside: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """inside [R, cells, S] -> (bias [R, 1, cells, T], foreground [R, cells, 1]): subject
        tokens where in the subject's region, dummy tokens where in none, MASK_BIAS elsewhere."""
        foreground = inside.any(-1, keepdim=True)
        allowed = torch.cat([(~foreground).expand(-1, -1, self.num_dummy),
                             inside.repeat_interleave(self.queries, dim=-1)], dim=-1)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, MASK_BIAS)
        return bias[:, None], foreground.to(dtype)

    def unused(self) -> list["MSCrossAttnProcessor"]:
        """The processors prepared for that have not been called with this object yet."""
        return [proc for proc, n in zip(self._procs, self.calls.tolist()) if n == 0]

    def image_kv(self, proc: "MSCrossAttnProcessor") -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and scaled values of the image tokens, [R, T, inner] each."""
        return self._kv[id(proc)]

    def step(self, proc: "MSCrossAttnProcessor", cells: int,
             text_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One call of a layer: count it, add its phrase attention (auto layout; text_probs
        [R, heads, cells, text tokens]) and return the (bias, foreground) it uses now."""
        key = id(proc)
        if key not in self._grid:
            raise ValueError("this ImageConditioning was not prepared for this attn2 processor "
                             "(build it with MSAdapter.conditioning for the UNet it runs on)")
        h, w = self._grid[key]
        if cells != h * w:
            raise ValueError(f"an attn2 prepared for a {h}x{w} grid got {cells} cells")
        slot = self._slot[key]
        self.calls[slot] += 1
        boxes = self._masks[(h, w)]
        if not self.auto:
            return boxes
        if text_probs is None:
            raise ValueError("auto layout needs the layer's text attention probabilities")
        total = self._sums[key]
        total += phrase_attention(text_probs, self._phrase_weights)
        calls = self.calls[slot]
        mean = total / calls
        low, high = mean.amin(1, keepdim=True), mean.amax(1, keepdim=True)
        bias, foreground = self._bias((mean - low) / (high - low + 1e-5) > self.mask_threshold, boxes[0].dtype)
        use = calls >= self.start_step
        return torch.where(use, bias, boxes[0]), torch.where(use, foreground, boxes[1])


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """[B, N, inner] x [B, M, inner] -> [B, N, inner] over attn.heads heads (SDPA)."""
    heads = attn.heads
    out = F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads),
                                         attn_mask=mask, scale=attn.scale)
    return out.transpose(1, 2).flatten(2)


def _image_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     groups: list[tuple[torch.Tensor | None, int]]) -> torch.Tensor:
    """q [R, N, inner], image keys/values [R, T, inner], bias [R, 1, N, T] -> [R, N, inner]:
    each group of rows (key_groups) over its own first tokens only."""
    rows, n = groups[0]
    if rows is None:
        return _attention(attn, q, k[:, :n], v[:, :n], bias[..., :n])
    out = torch.empty_like(q)
    for rows, n in groups:
        out.index_copy_(0, rows, _attention(attn, q[rows], k[rows, :n], v[rows, :n], bias[rows, ..., :n]))
    return out


def _text_probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities [B, heads, N, M] (auto layout needs them explicitly)."""
    q, k = _split_heads(q, attn.heads), _split_heads(k, attn.heads)
    return torch.softmax((q @ k.transpose(-2, -1)).float() * attn.scale, dim=-1)


def _projections(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    """query, key, value of an attention module, through its fused projection when
    diffusers' `Attention.fuse_projections` made one (to_qkv for self-attention, to_q and
    to_kv for cross-attention)."""
    if not attn.fused_projections:
        return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.is_cross_attention:
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_qkv(hidden_states).chunk(3, dim=-1)


def _prepare(attn, hidden_states, encoder_hidden_states, attention_mask):
    """The checks and input handling both processors share: (context, attention mask)."""
    if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
        raise ValueError("MS-Diffusion's processors expect a transformer block's attention ([B, N, C] input)")
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
        attention_mask = attention_mask.view(hidden_states.shape[0], attn.heads, -1, attention_mask.shape[-1])
    return context, attention_mask


def _finish(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class MSCrossAttnProcessor(nn.Module):
    """attn2 of the UNet: the text cross-attention plus the masked image branch."""

    def __init__(self, hidden_size: int, cross_attention_dim: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    def image_kv(self, tokens: torch.Tensor, token_scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [R, T, D], token_scales [R, T] -> keys, values * scales [R, T, inner]
        (once per sampling call, by ImageConditioning)."""
        v = self.to_v_ip(tokens)
        return self.to_k_ip(tokens), v * token_scales.to(v.dtype)[..., None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ms: ImageConditioning | None = None):
        if encoder_hidden_states is None:
            raise ValueError("attn2 needs the text embeddings")
        context, attention_mask = _prepare(attn, hidden_states, encoder_hidden_states, attention_mask)
        query, key, value = _projections(attn, hidden_states, context)
        out = _attention(attn, query, key, value, attention_mask)
        if ms is not None:
            if hidden_states.shape[0] != ms.batch:
                raise ValueError(f"the UNet batch has {hidden_states.shape[0]} rows, the image conditioning {ms.batch}")
            q = query[ms.start :]
            probs = _text_probs(attn, q, key[ms.start :]) if ms.auto else None
            bias, foreground = ms.step(self, hidden_states.shape[1], probs)
            if ms.rows:
                k, v = ms.image_kv(self)
                image = _image_attention(attn, q, k, v, bias.to(q.dtype), ms.groups) * foreground.to(q.dtype)
                out = torch.cat([out[: ms.start], out[ms.start :] + image]) if ms.start else out + image
        return _finish(attn, out, hidden_states)


class SelfAttnProcessor(nn.Module):
    """attn1: plain scaled-dot-product self-attention that accepts (and ignores) `ms`, so the
    conditioning can travel in cross_attention_kwargs without warnings."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ms: ImageConditioning | None = None):
        context, attention_mask = _prepare(attn, hidden_states, encoder_hidden_states, attention_mask)
        out = _attention(attn, *_projections(attn, hidden_states, context), attention_mask)
        return _finish(attn, out, hidden_states)
