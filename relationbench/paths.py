"""Where relationbench keeps what it computes once and reuses (LoRA banks, embeddings)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RELBENCH_CACHE"


def cache_root() -> Path:
    """$RELBENCH_CACHE, else ~/.cache/relationbench (a leading ~ expanded either way)."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/relationbench").expanduser()
