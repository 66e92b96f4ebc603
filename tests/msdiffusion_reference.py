"""A plain, loop-by-loop reference of MS-Diffusion's rules (REFERENCE 1), written from the
description only, to check the vectorized implementation against. Slow on purpose."""

from __future__ import annotations

import math

import torch


def fourier(box: list[float], freqs: int = 8, temperature: float = 100.0) -> list[float]:
    """Layout [freq][sin, cos][x0, y0, x1, y1], flattened."""
    out = []
    for f in range(freqs):
        band = temperature ** (f / freqs)
        out += [math.sin(c * band) for c in box]
        out += [math.cos(c * band) for c in box]
    return out


def layer_norm(x: torch.Tensor, ln) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def perceiver(attn, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """One subject: x [257, dim], latents [16, dim]."""
    x, lat = layer_norm(x, attn.norm1), layer_norm(latents, attn.norm2)
    q = lat @ attn.to_q.weight.T
    kv = torch.cat([x, lat]) @ attn.to_kv.weight.T
    inner = q.shape[-1]
    k, v = kv[:, :inner], kv[:, inner:]
    out = torch.zeros_like(q)
    d = attn.dim_head
    for h in range(attn.heads):
        sl = slice(h * d, (h + 1) * d)
        logits = (q[:, sl] @ k[:, sl].T) / math.sqrt(d)
        out[:, sl] = torch.softmax(logits, dim=-1) @ v[:, sl]
    return out @ attn.to_out.weight.T


def resampler(model, image_tokens: torch.Tensor, phrase: torch.Tensor, box: list[float], drop: bool = False):
    """One subject through the resampler: [257, E], [P], box -> [16, output_dim]."""
    cfg = model.cfg
    g = torch.cat([phrase, torch.tensor(fourier(box, cfg.fourier_freqs), dtype=phrase.dtype)])
    p0, p2 = model.latent_proj[0], model.latent_proj[2]
    hidden = torch.nn.functional.gelu(g @ p0.weight.T + p0.bias)
    latents = (hidden @ p2.weight.T + p2.bias).view(cfg.num_queries, cfg.dim)
    latents = layer_norm(latents, model.latent_norm)
    if drop:
        latents = model.grounding_latents[0]
    x = image_tokens @ model.proj_in.weight.T + model.proj_in.bias
    for attn, ff in model.layers:
        latents = perceiver(attn, x, latents) + latents
        h = layer_norm(latents, ff[0]) @ ff[1].weight.T
        latents = torch.nn.functional.gelu(h) @ ff[3].weight.T + latents
    latents = layer_norm(latents, model.attention_norm)
    latents = latents @ model.proj_out.weight.T + model.proj_out.bias
    return layer_norm(latents, model.norm_out)


def in_box(box, y: int, x: int, h: int, w: int) -> bool:
    x0, y0, x1, y1 = box
    return math.floor(x0 * w) <= x <= math.ceil(x1 * w) - 1 and math.floor(y0 * h) <= y <= math.ceil(y1 * h) - 1


def auto_regions(attn, hiddens, text, phrase_tokens, threshold: float, w: int) -> list[list[set]]:
    """The auto layout's regions after len(hiddens) calls of one attn2, cell by cell: per row
    and subject, the cells (y, x) where the phrase's text attention (softmax per head, mean
    over heads, then over the phrase's tokens), averaged over the calls and min-max normalized
    over the cells, exceeds `threshold`. hiddens: one [B, h*w, C] per call; text [B, 77, D];
    phrase_tokens [B][S]: the prompt positions of each subject's phrase (empty: none)."""
    heads = attn.heads
    regions = []
    for i, row in enumerate(phrase_tokens):
        k = text[i] @ attn.to_k.weight.T
        d = k.shape[-1] // heads
        row_regions = []
        for positions in row:
            n = hiddens[0].shape[1]
            total = [0.0] * n
            for hidden in hiddens:
                q = hidden[i] @ attn.to_q.weight.T
                for cell in range(n):
                    per_head = []
                    for hd in range(heads):
                        sl = slice(hd * d, (hd + 1) * d)
                        p = torch.softmax(q[cell, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
                        per_head.append(p)
                    p = sum(per_head) / heads
                    total[cell] += float(sum(p[t] for t in positions) / max(len(positions), 1))
            mean = [t / len(hiddens) for t in total]
            low, high = min(mean), max(mean)
            row_regions.append({divmod(c, w) for c in range(n) if (mean[c] - low) / (high - low + 1e-5) > threshold})
        regions.append(row_regions)
    return regions


def cross_attention(attn, proc, hidden, text, image_tokens, boxes, token_scale, h: int, w: int,
                    num_dummy: int = 4, queries: int = 16, regions=None):
    """The official rules cell by cell: hidden [B, h*w, C], text [B, 77, D], image_tokens
    [B, num_dummy + S*queries, D], boxes nested lists [B][S][4] (zeros: none), token_scale:
    scale per image token [B][T] (global scale or per-subject; dummy tokens 1). regions
    [B][S] (sets of (y, x) cells, e.g. from auto_regions) replace the boxes where given."""
    b, n, _ = hidden.shape
    heads = attn.heads
    out_rows = []
    for i in range(b):
        q = hidden[i] @ attn.to_q.weight.T
        k, v = text[i] @ attn.to_k.weight.T, text[i] @ attn.to_v.weight.T
        ki, vi = image_tokens[i] @ proc.to_k_ip.weight.T, image_tokens[i] @ proc.to_v_ip.weight.T
        d = q.shape[-1] // heads
        row = torch.zeros_like(q)
        for cell in range(n):
            y, x = divmod(cell, w)
            if regions is not None:
                covering = [j for j, cells in enumerate(regions[i]) if (y, x) in cells]
            else:
                covering = [j for j, box in enumerate(boxes[i]) if any(box) and in_box(box, y, x, h, w)]
            background = not covering
            bias = []
            for t in range(image_tokens.shape[1]):
                if t < num_dummy:
                    allowed = background
                else:
                    allowed = (t - num_dummy) // queries in covering
                bias.append(0.0 if allowed else -10000.0)
            bias = torch.tensor(bias)
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                p_text = torch.softmax(q[cell, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
                text_out = p_text @ v[:, sl]
                p_img = torch.softmax(q[cell, sl] @ ki[:, sl].T / math.sqrt(d) + bias, dim=-1)
                if background:
                    p_img = torch.zeros_like(p_img)
                p_img = p_img * torch.tensor(token_scale[i])
                row[cell, sl] = text_out + p_img @ vi[:, sl]
        out_rows.append(row @ attn.to_out[0].weight.T + attn.to_out[0].bias)
    return torch.stack(out_rows)
