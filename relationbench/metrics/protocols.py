"""Named metric protocols: which encoders and which scale a score uses (REFERENCE 4).

No convention is universal, so every score is written with its protocol's name, and the
encoder ids beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UserError


def _times_100(cos: np.ndarray) -> np.ndarray:
    return 100.0 * cos


def _raw(cos: np.ndarray) -> np.ndarray:
    return np.asarray(cos, dtype=np.float64)


def _custom_diffusion_text(cos: np.ndarray) -> np.ndarray:
    return 2.5 * np.maximum(cos, 0.0)


@dataclass(frozen=True)
class Protocol:
    """How cosines become scores: one scale for image-text scores, one for image-image."""

    name: str
    description: str
    text_scale: Callable[[np.ndarray], np.ndarray]  # CLIP-T, CLIP-R
    image_scale: Callable[[np.ndarray], np.ndarray]  # CLIP-I, DINO
    digits: int = 1  # decimals the tables show


PROTOCOLS: dict[str, Protocol] = {
    # the RelationBooth tables (and DreamBench++, torchmetrics): 100 x cosine, per sample
    "paper": Protocol("paper", "100 x cosine for all four metrics (the RelationBooth tables)", _times_100, _times_100),
    # Custom Diffusion's evaluate.py: CLIP-T = 2.5 * max(cos, 0); CLIP-I and DINO raw cosine.
    # CLIP-R, which it does not define, gets the CLIP-T scale (it is an image-text score).
    "customdiffusion": Protocol(
        "customdiffusion", "CLIP-T/CLIP-R 2.5 x max(cos, 0), CLIP-I/DINO raw cosine (Custom Diffusion)",
        _custom_diffusion_text, _raw, digits=3,
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise UserError(f"unknown metric protocol {name!r}; protocols: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
