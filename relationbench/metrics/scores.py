"""The metrics as small pure functions over embeddings (numpy, float64 inside).

Every score here is a cosine similarity; a protocol (protocols.py) puts it on its scale.
    CLIP-T   cos(image, prompt)               per generated image
    CLIP-R   cos(image, relation predicate)   per generated image
    CLIP-I   mean cos over (image, reference) pairs of one subject, CLIP image tower
    DINO     the same with DINO's CLS feature
"""

from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, D) arrays -> (N,)."""
    return np.sum(normalize(a) * normalize(b), axis=-1)


def clip_score(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """CLIP-T / CLIP-R before scaling: per-sample cosine of image i with text i."""
    return cosine(images, texts)


def mean_pair_cosine(generated: np.ndarray, references: np.ndarray) -> np.ndarray:
    """CLIP-I / DINO before scaling: for each generated row, the mean cosine over all references.

    (N, D) x (R, D) -> (N,). Averaging the per-image values over a subject's images gives the
    mean over all (generated, reference) pairs, the DreamBooth / Custom Diffusion definition.
    """
    return (normalize(generated) @ normalize(references).T).mean(axis=-1)
