"""The metric encoders: CLIP (open_clip; image and text towers) and DINO ViT-S/16.

Models come from `models` (real weights for sdxl, seeded toy models for tiny); this
module adds preprocessing, batching, device and dtype, and returns unit-length float32
embeddings. Each encoder has an `id` naming its weights, written next to every score and
used as the embedding-cache key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .models import clip_id, dino_id, load_clip_model, load_dino_model
from .preprocess import CLIP_PREPROCESS, DINO_PREPROCESS, Preprocess

if TYPE_CHECKING:
    import torch

    from ..backbones import Backbone


@dataclass
class ImageEncoder:
    """A vision model, its preprocessing and where it runs."""

    id: str
    preprocess: Preprocess
    model: Any
    device: str
    dtype: "torch.dtype"

    def _features(self, pixels: "torch.Tensor") -> "torch.Tensor":
        raise NotImplementedError

    def encode_images(self, pixels: np.ndarray | "torch.Tensor") -> np.ndarray:
        """Preprocessed pixels (N, 3, 224, 224) -> unit-length embeddings (N, D), float32."""
        import torch

        pixels = torch.as_tensor(pixels)
        with torch.inference_mode():
            out = self._features(pixels.to(self.device, self.dtype, non_blocking=True)).float()
            out = torch.nn.functional.normalize(out, dim=-1)
        return out.cpu().numpy()


class ClipEncoder(ImageEncoder):
    """open_clip CLIP: image features and text features in one space."""

    def __init__(self, *args, tokenizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer

    def _features(self, pixels):
        return self.model.encode_image(pixels)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Texts -> unit-length embeddings (N, D). open_clip's tokenizer truncates at 77
        tokens and keeps the end-of-text token (torchmetrics does not, REFERENCE 4)."""
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                ids = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
                feats = _encode_text_trimmed(self.model, ids).float()
                out.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _encode_text_trimmed(model, ids: "torch.Tensor") -> "torch.Tensor":
    """open_clip's encode_text over the positions up to the last end-of-text token only.

    The text tower is causal and pools at the end-of-text token (the largest id), so the
    padding after it cannot change the result; benchmark prompts use ~12 of 77 positions, and
    the full length cost a quarter of CPU scoring time (bench/RESULTS.md). Other text towers
    (no causal mask, other pooling) take the full path.
    """
    import torch

    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        return model.encode_text(ids)
    eot = ids.argmax(dim=-1)
    n = int(eot.max()) + 1
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(ids[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


class DinoEncoder(ImageEncoder):
    """DINO ViT: the CLS token of the last hidden state, which the ViT has already passed
    through its final LayerNorm (the DreamBooth / Custom Diffusion feature)."""

    def _features(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def _place(model, device: str, dtype):
    import torch

    model = model.to(device)
    return model if dtype == torch.float32 else model.to(dtype)


def load_clip(backbone: "Backbone", arch: str = "ViT-B-32", device: str = "cpu", dtype=None) -> ClipEncoder:
    import open_clip
    import torch

    dtype = dtype or torch.float32
    tokenizer = open_clip.tokenizer.SimpleTokenizer() if backbone.is_tiny else open_clip.get_tokenizer(arch)
    return ClipEncoder(clip_id(backbone, arch), CLIP_PREPROCESS, _place(load_clip_model(backbone, arch), device, dtype),
                       device, dtype, tokenizer=tokenizer)


def load_dino(backbone: "Backbone", device: str = "cpu", dtype=None) -> DinoEncoder:
    import torch

    dtype = dtype or torch.float32
    return DinoEncoder(dino_id(backbone), DINO_PREPROCESS, _place(load_dino_model(backbone), device, dtype),
                       device, dtype)
