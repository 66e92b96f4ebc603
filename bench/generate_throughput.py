"""How much the run loop costs on top of the method, and what batch invariance costs.

For each batch size: seconds per image for
  raw       method.generate() on the requests, nothing stored;
  harness   `relbench generate` (PNG + fsync + manifest line per image), no padding;
  invariant the same with --batch-invariant (small batches padded to 4, the CPU default).

    python bench/generate_throughput.py --backbone tiny --images 8 --batch-sizes 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--method", default="sdxl")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    import torch
    from tabulate import tabulate

    from relationbench.backbones import get_backbone
    from relationbench.data import data_root
    from relationbench.devices import resolve_device, resolve_dtype
    from relationbench.generate import GenerateOptions, generate
    from relationbench.methods import Context, Request, default_registry
    from relationbench.runs import sample_seed
    from relationbench.suites import load_suite

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cases = list(load_suite("relationbench").cases[: args.images])
    card = default_registry().card(args.method)
    method = card.build(Context(get_backbone(args.backbone), device, dtype, data_root()))
    method.prepare(cases)
    method.generate([Request(cases[0], 0, 0)])  # warm-up

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for bs in args.batch_sizes:
        requests = [Request(c, 0, sample_seed(c.seed, 0)) for c in cases]
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(requests), bs):
            method.generate(requests[i : i + bs])
        sync()
        raw = (time.perf_counter() - t0) / len(requests)
        row = [bs, f"{raw:.3f}"]
        for invariant in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                summary = generate(GenerateOptions(
                    method=args.method, suite="relationbench", backbone=args.backbone, limit=args.images,
                    batch_size=bs, out=tmp, device=device, dtype=args.dtype, quiet=True,
                    batch_invariant=invariant))
            row.append(f"{summary.seconds / summary.generated:.3f}")
        rows.append(row)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}, backbone {args.backbone}, "
          f"{args.images} images, method {args.method}")
    print(tabulate(rows, headers=["batch", "raw s/img", "harness s/img", "invariant s/img"], tablefmt="github"))


if __name__ == "__main__":
    main()
