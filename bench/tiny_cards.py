"""Tiny means seconds: every registered card end to end (train + sample) on one case.

Each card runs as a user would run it, `relbench generate --backbone tiny` in a fresh
process with an empty cache (so training methods train their smoke schedule), on one
relationbench case whose subjects are DreamBench's. The wall time includes the Python start
(~5 s of imports). Target: under 60 s per card on the 2-core development VM.

    python bench/tiny_cards.py [--case rb-s-001] [--data ../shared/data/dreambench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default=None, help="Default: the first single case with DreamBench subjects.")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dreambench")
    parser.add_argument("--target", type=float, default=60.0)
    args = parser.parse_args()

    from tabulate import tabulate

    from relationbench.methods import default_registry
    from relationbench.suites import load_suite

    case = args.case or next(c.id for c in load_suite("relationbench").cases
                             if c.kind == "single" and all(s.source == "dreambench" for s in c.subjects))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RELBENCH_CACHE": str(tmp / "cache")}
        relbench = [sys.executable, "-m", "relationbench.cli"]
        subprocess.run([*relbench, "data", "import", "dreambench", str(args.data), "--data-dir", str(tmp / "data")],
                       check=True, env=env, capture_output=True)
        for name in default_registry().names():
            out = tmp / "runs" / name
            t0 = time.perf_counter()
            proc = subprocess.run([*relbench, "generate", "--method", name, "--backbone", "tiny", "--cases", case,
                                   "--images-per-case", "1", "--data-dir", str(tmp / "data"), "--out", str(out),
                                   "--quiet"], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stdout}\n{proc.stderr}")
            meta = json.loads((out / "run.json").read_text())
            schedule = meta["method"].get("tiny_schedule", {})
            rows.append([name, f"{wall:.1f}", "yes" if wall < args.target else "NO",
                         ", ".join(f"{k}={v}" for k, v in schedule.items()) or "-"])
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; case {case}")
    print(tabulate(rows, headers=["card", "wall s", f"< {args.target:.0f} s", "tiny schedule applied"]))


if __name__ == "__main__":
    main()
