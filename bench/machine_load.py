"""How busy the machine was while a benchmark ran: the figures a timing on a shared VM needs
beside it (bench/RESULTS.md notes the other processes' load with each result)."""

from __future__ import annotations

import os
from pathlib import Path


def busy_seconds() -> float | None:
    """CPU seconds the machine has been busy (all cores, all processes); None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children (workers, a browser)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
