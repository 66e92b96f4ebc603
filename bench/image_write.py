"""What storing an image costs the run loop: save_image (PNG + fsync + rename) per image,
one after another versus a batch's images encoded in parallel threads as generate.py does.

    python bench/image_write.py --size 1024 --batch 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from relationbench.runs import RunDir


def photo_like(size: int, seed: int) -> Image.Image:
    """A smooth gradient with sensor-like noise: compresses like a photograph, not like noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)
    base = np.add.outer(ramp, ramp)[..., None] / 2 + rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch = [photo_like(args.size, i) for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        timings = {"sequential": [], "threaded": []}
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            for k, img in enumerate(batch):
                run.save_image(f"seq{rep}", k, img)
            timings["sequential"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=min(4, args.batch)) as pool:
                list(pool.map(lambda kv: run.save_image(f"par{rep}", kv[0], kv[1]), enumerate(batch)))
            timings["threaded"].append(time.perf_counter() - t0)
    print(f"{platform.machine()}, {os.cpu_count()} cores, {args.size} px, batch {args.batch}, "
          f"best of {args.repeats}")
    for name, values in timings.items():
        print(f"{name:>10}: {min(values) / args.batch * 1000:.0f} ms per image")


if __name__ == "__main__":
    main()
