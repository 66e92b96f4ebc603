"""Metric encoders (CLIP, DINO) and the scores computed from their embeddings.

`scores` and `protocols` are pure functions over embeddings; `encoders` turns images and
texts into embeddings; `cache` keeps them on disk by content hash.
"""

from .protocols import PROTOCOLS, Protocol, get_protocol
from .scores import clip_score, cosine, mean_pair_cosine, normalize

__all__ = ["PROTOCOLS", "Protocol", "get_protocol", "clip_score", "cosine", "mean_pair_cosine", "normalize"]
