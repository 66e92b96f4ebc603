"""Embeddings on disk, keyed by the SHA-256 of the image file's bytes.

One file per (place, encoder id, dtype): rescoring a run, or scoring it under another
protocol with the same encoders, re-encodes nothing. The key is the content, not the path,
so a moved or copied run still hits, and a regenerated image never does.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from ..images import READER_VERSION
from ..paths import cache_root


def cache_file(folder: Path, encoder_id: str, dtype: str) -> Path:
    """A readable, collision-free file name for one encoder's embeddings. The image reader's
    version is part of it: the same file bytes may decode to other pixels under a new reader."""
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", encoder_id).strip("_")[:60]
    digest = hashlib.sha256(f"{encoder_id}|{dtype}|reader {READER_VERSION}".encode()).hexdigest()[:10]
    return folder / f"{slug}-{dtype}-{digest}.npz"


class EmbeddingCache:
    """content hash -> unit-length embedding, loaded whole and saved atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._rows: dict[str, np.ndarray] = {}
        self._dirty = False
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as data:
                    self._rows = dict(zip(data["keys"].tolist(), data["embeddings"]))
            except (OSError, ValueError, KeyError):
                self._rows = {}  # a damaged cache is only lost time: start over

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, key: str) -> np.ndarray | None:
        return self._rows.get(key)

    def put(self, key: str, embedding: np.ndarray) -> None:
        self._rows[key] = np.asarray(embedding, dtype=np.float32)
        self._dirty = True

    def keys(self) -> set[str]:
        return set(self._rows)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._rows)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, keys=np.array(keys, dtype="U64"), embeddings=np.stack([self._rows[k] for k in keys]))
        os.replace(tmp, self.path)
        self._dirty = False


def default_cache_dir() -> Path:
    """Where reference-image embeddings are kept: $RELBENCH_CACHE or ~/.cache/relationbench."""
    return cache_root() / "embeddings"
