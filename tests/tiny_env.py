"""A module fixture's environment for running methods on the tiny backbone."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest


@contextlib.contextmanager
def tiny_env(root: Path, cases: list[str]):
    """For module fixtures that run methods on tiny: a cache (the default LoRA bank) and a data
    root holding reference images of the cases' subjects under `root`, and one torch thread,
    as `one_thread` (which starts after module fixtures): images compared across tests must be
    made with one thread count. Yields root."""
    import torch

    from .score_runs import make_references

    make_references(root / "data", cases)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RELBENCH_CACHE", str(root / "cache"))
            mp.setenv("RELBENCH_DATA", str(root / "data"))
            yield root
    finally:
        torch.set_num_threads(threads)
