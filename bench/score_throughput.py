"""Is scoring ever the slow part? `relbench score` images/s against the raw encoders' images/s.

Full-size metric encoders with random weights (speed does not depend on weight values):
CLIP ViT-B-32 (open_clip, QuickGELU) and DINO ViT-S/16 (transformers ViTModel, no pooler).
They replace the tiny backbone's toy encoders by patching `Backbone.clip_model` and
`Backbone.dino_model` in this process, so `score(ScoreOptions(backbone="tiny"))` runs its real
code path unchanged: run discovery, DataLoader decoding workers, preprocessing, batched
encoding, text embeddings, scores.csv, embedding caches and the leaderboard.

Measured, on the same machine and the same images per batch:
  raw        random preprocessed tensors already in memory, CLIP image + DINO per batch
             (and each alone), after a warm-up batch;
  decode     read + sha256 + PNG decode + CLIP and DINO preprocessing of one image, one
             process (what each DataLoader worker does per image);
  scorer     `score()` end to end on a synthetic run of --images photo-like PNGs at --size px
             (fresh scores.csv and image cache each time; reference embeddings already cached,
             as they are after a first scoring), per --workers value; plus its image loop
             alone (the package's `_score_group` minus embedding the references), timed by
             wrapping the package's functions in this process, not by editing them.

    python bench/score_throughput.py --images 96 --size 1024 --batch-size 64 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CLIP_ARCH = "ViT-B-32"


# --------------------------------------------------------------------------- full-size encoders


def full_size_encoders():
    """CLIP ViT-B-32 and DINO ViT-S/16 at their real sizes, random weights, eval mode."""
    import logging

    import open_clip
    from transformers import ViTConfig, ViTModel

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no weights were loaded
    clip = open_clip.create_model(CLIP_ARCH, pretrained=None, force_quick_gelu=True).eval()
    dino = ViTModel(
        ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  image_size=224, patch_size=16, qkv_bias=True),
        add_pooling_layer=False,
    ).eval()
    return clip, dino


def use_full_size_encoders(clip, dino) -> None:
    """Make the tiny backbone hand out the full-size models (built once, like loaded weights)."""
    from relationbench.backbones import Backbone

    tiny_clip, tiny_dino = Backbone.clip_model, Backbone.dino_model

    def clip_model(self, arch: str = CLIP_ARCH):
        if not self.is_tiny:
            return tiny_clip(self, arch)
        if arch != CLIP_ARCH:
            raise ValueError(f"this benchmark builds only {CLIP_ARCH}")
        return clip

    def dino_model(self):
        return dino if self.is_tiny else tiny_dino(self)

    Backbone.clip_model, Backbone.dino_model = clip_model, dino_model


# --------------------------------------------------------------------------- probes


class Probes:
    """Seconds spent in some of the scorer's functions, by wrapping them in this process."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}  # label -> perf_counter of its first call
        self._in_refs = False

    def reset(self) -> None:
        self.seconds.clear()
        self.marks.clear()

    def wrap(self, owner, name: str, label: str, *, refs: bool = False) -> None:
        inner = getattr(owner, name)
        probes = self

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            if refs:
                probes._in_refs = True
            key = f"{label}@refs" if (probes._in_refs and not refs) else label
            t0 = time.perf_counter()
            probes.marks.setdefault(key, t0)  # when it was first called
            try:
                return inner(*args, **kwargs)
            finally:
                probes.seconds[key] += time.perf_counter() - t0
                if refs:
                    probes._in_refs = False

        setattr(owner, name, timed)

    def install(self) -> None:
        import relationbench.score as sc
        from relationbench.metrics.encoders import ClipEncoder, ImageEncoder
        from relationbench.runs import RunDir

        self.wrap(sc, "_load_encoders", "load")
        self.wrap(sc, "_score_group", "group")
        self.wrap(sc._Encoders, "references", "refs", refs=True)
        self.wrap(ImageEncoder, "encode_images", "encode")  # CLIP and DINO both inherit it
        self.wrap(ClipEncoder, "encode_texts", "texts")
        self.wrap(sc, "_rows", "rows")  # includes the text embeddings
        self.wrap(RunDir, "append_scores", "csv")
        self.wrap(sc, "_save_caches", "cache")

    def loop(self) -> dict[str, float]:
        """The image loop of _score_group and what it spent its time on.

        `first batch` is the wait from the loop's start (after the references) to the first
        image encode: starting the workers and decoding a whole batch before anything else can run.
        """
        s = self.seconds
        loop = s["group"] - s["refs"]
        first = self.marks["encode"] - self.marks["group"] - s["refs"]
        parts = {"encode images": s["encode"], "encode texts": s["texts"], "other rows": s["rows"] - s["texts"],
                 "csv + cache": s["csv"] + s["cache"], "first batch": first}
        parts["later waits"] = loop - sum(parts.values())
        return {"loop": loop, **parts}


# --------------------------------------------------------------------------- synthetic data


def photo_like(size: int, seed: int) -> Image.Image:
    """A smooth two-colour gradient with sensor-like noise: compresses and decodes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    a, b = rng.uniform(20, 235, 3).astype(np.float32), rng.uniform(20, 235, 3).astype(np.float32)
    pixels = a * (1 - t) + b * t + rng.normal(0, 6, (size, size, 3)).astype(np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def pick_cases(n: int):
    """n (case, index) pairs of the relationbench suite, single and multi cases alternating."""
    from relationbench.suites import load_suite

    suite = load_suite("relationbench")
    single = [c for c in suite.cases if c.kind == "single"]
    multi = [c for c in suite.cases if c.kind == "multi"]
    cases = [c for pair in zip(single, multi) for c in pair]
    return suite, [(cases[j % len(cases)], j // len(cases)) for j in range(n)]


def make_run(folder: Path, suite, items, size: int, threads: int = 4) -> Path:
    """A run folder as `relbench generate` leaves it: run.json, images, manifest.jsonl."""
    from relationbench.runs import SEED_RULE, RunDir, sample_seed

    run = RunDir(folder)
    run.start({
        "suite": {"name": suite.name, "version": suite.version},
        "method": {"name": "synthetic"},
        "backbone": {"name": "tiny"},
        "dtype": "fp32",
        "images_per_case": max(k for _, k in items) + 1,
        "seed_rule": SEED_RULE,
    })

    def write(j_item):
        j, (case, k) = j_item
        seed = sample_seed(case.seed, k)
        rel = run.save_image(case.id, k, photo_like(size, seed))
        return {"case_id": case.id, "index": k, "seed": seed, "path": rel, "kind": case.kind,
                "subjects": [s.name for s in case.subjects]}

    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow releases the GIL in PNG encoding
        records = list(pool.map(write, enumerate(items)))
    run.append(records)
    return folder


def make_references(root: Path, items, per_subject: int, size: int = 512) -> int:
    """`per_subject` photo-like JPEGs for each subject the items use; returns how many subjects."""
    subjects = {(s.source, s.dir): s for case, _ in items for s in case.subjects}
    for n, (source, sub) in enumerate(sorted(subjects)):
        folder = root / source / sub
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_subject):
            photo_like(size, 10_000 + 100 * n + i).save(folder / f"{i:02d}.jpg", quality=90)
    return len(subjects)


# --------------------------------------------------------------------------- measurements


def raw_throughput(clip, dino, n: int, batch_size: int, which: str) -> float:
    """Images/s of the encoders alone on preprocessed tensors in memory (warm-up batch first)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(n, 3, 224, 224, generator=gen)

    def encode(batch):
        if which in ("both", "clip"):
            torch.nn.functional.normalize(clip.encode_image(batch).float(), dim=-1).numpy()
        if which in ("both", "dino"):
            torch.nn.functional.normalize(dino(pixel_values=batch).last_hidden_state[:, 0].float(), dim=-1).numpy()

    with torch.inference_mode():
        encode(pixels[:batch_size])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            encode(pixels[i : i + batch_size])
        return n / (time.perf_counter() - t0)


def decode_costs(files: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each step a decoding worker takes, one process."""
    import hashlib

    from relationbench.metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS, decode

    ms: dict[str, float] = defaultdict(float)
    for f in files:
        t0 = time.perf_counter()
        data = f.read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        image = decode(data)
        t3 = time.perf_counter()
        CLIP_PREPROCESS(image)
        t4 = time.perf_counter()
        DINO_PREPROCESS(image)
        t5 = time.perf_counter()
        for key, dt in (("read", t1 - t0), ("sha256", t2 - t1), ("PNG decode", t3 - t2),
                        ("CLIP preprocess", t4 - t3), ("DINO preprocess", t5 - t4)):
            ms[key] += dt * 1000 / len(files)
    ms["total"] = sum(ms.values())
    return dict(ms)


def fresh(run: Path, board: Path) -> None:
    """Forget every score and image embedding of the run, so the next score() does all the work."""
    (run / "scores.csv").unlink(missing_ok=True)
    shutil.rmtree(run / ".cache", ignore_errors=True)
    shutil.rmtree(board, ignore_errors=True)


def busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy (all cores, all processes); None off Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children (the DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="generated images in the synthetic run")
    parser.add_argument("--size", type=int, default=1024, help="their side in pixels (SDXL: 1024)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="decoding processes to try (default: 0, 1, 2 and the scorer's own default)")
    parser.add_argument("--refs", type=int, default=2, help="reference images per subject")
    parser.add_argument("--decode-sample", type=int, default=16, help="images timed for decode + preprocess")
    parser.add_argument("--keep", type=Path, default=None, help="build the data here and keep it (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from relationbench.score import ScoreOptions, default_workers, score

    t_start = time.perf_counter()
    busy_start, own_start = busy_seconds(), own_seconds()
    default = default_workers("cpu")
    worker_counts = list(dict.fromkeys(args.workers if args.workers is not None else [0, 1, 2, default]))
    if default not in worker_counts:
        worker_counts.append(default)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="score-bench-") if args.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # 1. data: a run of generated images, reference images, private data and cache roots
        os.environ["RELBENCH_DATA"] = str(tmp / "data")
        os.environ["RELBENCH_CACHE"] = str(tmp / "cache")
        suite, items = pick_cases(args.images)
        t0 = time.perf_counter()
        run = make_run(tmp / "results" / "relationbench" / "synthetic", suite, items, args.size)
        warm_run = make_run(tmp / "warmup" / "relationbench" / "warm", suite, items[:4], args.size)
        n_subjects = make_references(tmp / "data", items, args.refs)
        png_mb = sum(p.stat().st_size for p in (run / "images").rglob("*.png")) / 1e6
        print(f"data: {args.images} PNGs at {args.size} px ({png_mb / args.images:.2f} MB each), "
              f"{n_subjects} subjects x {args.refs} references, {time.perf_counter() - t0:.1f} s", flush=True)

        # 2. the encoders, and the scorer wired to them
        clip, dino = full_size_encoders()
        use_full_size_encoders(clip, dino)
        probes = Probes()
        probes.install()

        # 3. raw encoder throughput
        raw = {which: raw_throughput(clip, dino, args.images, args.batch_size, which)
               for which in ("both", "clip", "dino")}
        print("raw img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in raw.items()), flush=True)

        # 4. decode + preprocess alone
        files = sorted((run / "images").rglob("*.png"))[: args.decode_sample]
        decode_costs(files[:2])  # warm the page cache and numpy
        dec = decode_costs(files)
        print("decode ms/img: " + ", ".join(f"{k} {v:.1f}" for k, v in dec.items()), flush=True)

        # 5. the scorer. First a small run, which embeds (and caches) every subject's references and
        # warms up imports; reference embeddings are then cached, as after any first scoring.
        board = tmp / "leaderboard"

        def opts(path: Path, workers: int) -> ScoreOptions:
            return ScoreOptions(paths=[path], backbone="tiny", batch_size=args.batch_size, workers=workers,
                                quiet=True, bootstrap=100, leaderboard_dir=board)

        t0 = time.perf_counter()
        score(opts(warm_run, 0))
        score(opts(run, 0))  # embeds the remaining references (warm_run has 4 cases only)
        print(f"warm-up (reference embeddings cached, one untimed pass): {time.perf_counter() - t0:.1f} s",
              flush=True)

        results = {}
        for w in worker_counts:
            fresh(run, board)
            probes.reset()
            summary = score(opts(run, w))
            if summary.scored != args.images or summary.failures:
                raise SystemExit(f"scored {summary.scored} of {args.images}; failures {summary.failures[:3]}")
            parts = probes.loop()
            results[w] = {"e2e": summary.seconds, "refs": probes.seconds["refs"], **parts}
            print(f"workers {w}: end to end {summary.seconds:.2f} s, image loop {parts['loop']:.2f} s "
                  f"({args.images / summary.seconds:.2f} / {args.images / parts['loop']:.2f} img/s); "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items() if k != "loop"), flush=True)

        # 6. the raw encoders again: on a shared machine the load may have changed meanwhile
        raw_after = raw_throughput(clip, dino, args.images, args.batch_size, "both")
        print(f"raw img/s again: both {raw_after:.2f}", flush=True)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()

    # 7. report
    n = args.images
    raw_both = (raw["both"] + raw_after) / 2
    wall = time.perf_counter() - t_start
    busy_end = busy_seconds()
    others = (busy_end - busy_start - (own_seconds() - own_start)) if busy_start is not None else float("nan")
    print()
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), CPU fp32; CLIP {CLIP_ARCH} + DINO ViT-S/16 full size, random weights; {n} images, "
          f"{args.size} px PNG, batch {args.batch_size}; default workers here: {default}; "
          f"other processes used {max(others, 0) / wall:.2f} cores on average meanwhile (0: a quiet machine)")
    print()
    print("| what | images/s | ms/image | where the time went (s) |")
    print("|---|---:|---:|---|")
    print(f"| raw encoders: CLIP image + DINO (before / after the scorer runs: {raw['both']:.2f} / {raw_after:.2f}) "
          f"| {raw_both:.2f} | {1000 / raw_both:.0f} | |")
    print(f"| raw encoder: CLIP image only | {raw['clip']:.2f} | {1000 / raw['clip']:.0f} | |")
    print(f"| raw encoder: DINO only | {raw['dino']:.2f} | {1000 / raw['dino']:.0f} | |")
    steps = ", ".join(f"{k} {v:.1f}" for k, v in dec.items() if k != "total")
    print(f"| decode + preprocess alone, 1 process | {1000 / dec['total']:.2f} | {dec['total']:.0f} | "
          f"ms/image: {steps} |")
    for w, r in results.items():
        mark = " (default)" if w == default else ""
        split = ", ".join(f"{k} {r[k]:.1f}" for k in
                          ("encode images", "encode texts", "other rows", "csv + cache", "first batch", "later waits"))
        print(f"| scorer end to end, workers {w}{mark} | {n / r['e2e']:.2f} | {1000 * r['e2e'] / n:.0f} | "
              f"outside the image loop {r['e2e'] - r['loop']:.1f} (references {r['refs']:.1f}) |")
        print(f"| scorer image loop, workers {w}{mark} | {n / r['loop']:.2f} | {1000 * r['loop'] / n:.0f} | "
              f"{split} |")
    d = results[default]
    print()
    print(f"scorer / raw = {n / d['e2e'] / raw_both:.2f} (end to end, workers {default}; target >= 0.5); "
          f"image loop / raw = {n / d['loop'] / raw_both:.2f}; "
          f"image loop without its first batch / raw = "
          f"{n / (d['loop'] - d['first batch']) / raw_both:.2f}")
    print(f"(total benchmark time {wall:.0f} s)")


if __name__ == "__main__":
    main()
