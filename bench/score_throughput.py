"""Is scoring ever the slow part? `relbench score` images/s against the raw encoders' images/s.

Full-size metric encoders with random weights (speed does not depend on weight values):
CLIP ViT-B-32 (open_clip, QuickGELU) and DINO ViT-S/16 (transformers ViTModel, no pooler).
They replace the tiny backbone's toy encoders by patching the model loaders the metric
encoders call (`metrics.encoders.load_clip_model` / `load_dino_model`) in this process, so
`score(ScoreOptions(backbone="tiny"))` runs its real code path unchanged: run discovery,
DataLoader decoding workers, preprocessing, batched encoding, text embeddings, scores.csv,
embedding caches, then (as `relbench score` does) the leaderboard.

Measured on the same machine, device, dtype and batch size:
  raw      random preprocessed tensors already on the device, CLIP image + DINO per batch
           (and each alone), after a warm-up batch; again after the scorer runs, since a
           shared machine's load drifts; and CLIP's text tower on the run's prompts;
  decode   read + sha256 + PNG decode + CLIP and DINO preprocessing of one image in one
           process (what a DataLoader worker does per image);
  scorer   `score()` end to end on a synthetic run of --images photo-like PNGs at --size px,
           with a fresh scores.csv and image-embedding cache each time and the references'
           embeddings already cached (random ones, prefilled: the state after any first
           scoring), per --workers value; and
           its image loop alone, split by wrapping the package's functions in this process
           (nothing in the package is edited).

    python bench/score_throughput.py --images 96 --size 1024 --batch-size 64 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine_load import busy_seconds, own_seconds  # bench/machine_load.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

CLIP_ARCH = "ViT-B-32"


# --------------------------------------------------------------------------- full-size encoders


def full_size_encoders():
    """CLIP ViT-B-32 and DINO ViT-S/16 at their real sizes, random weights, eval mode, CPU fp32."""
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
    """Make the tiny backbone hand out the full-size models (built once, like weights loaded once)."""
    from relationbench.metrics import encoders

    load_clip_model, load_dino_model = encoders.load_clip_model, encoders.load_dino_model

    def clip_model(backbone, arch: str = CLIP_ARCH):
        if not backbone.is_tiny:
            return load_clip_model(backbone, arch)
        if arch != CLIP_ARCH:
            raise ValueError(f"this benchmark builds only {CLIP_ARCH}")
        return clip

    def dino_model(backbone):
        return dino if backbone.is_tiny else load_dino_model(backbone)

    encoders.load_clip_model, encoders.load_dino_model = clip_model, dino_model


# --------------------------------------------------------------------------- probes


class Probes:
    """Seconds spent in some of the scorer's functions, by wrapping them in this process."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}  # label -> perf_counter at its first call
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
            probes.marks.setdefault(key, t0)
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
        from relationbench.runs import ScoreTable

        self.wrap(sc, "_load_encoders", "load")
        self.wrap(sc, "_score_group", "group")
        self.wrap(sc._Encoders, "references", "refs", refs=True)
        self.wrap(ImageEncoder, "encode_images", "encode")  # CLIP and DINO both inherit it
        self.wrap(ClipEncoder, "encode_texts", "texts")
        self.wrap(sc, "_rows", "rows")  # includes the text embeddings
        self.wrap(ScoreTable, "append", "csv")  # every score file's rows (scores.csv, scores-<family>.csv)
        self.wrap(sc, "_save_caches", "cache")

    def loop(self) -> dict[str, float]:
        """The image loop of _score_group (after the references) and where its time went.

        `first batch`: from the loop's start to the first image encode, i.e. starting the
        workers and decoding one whole batch before the encoders have anything to do.
        `later waits`: the rest, i.e. waiting for decoded batches after the first one.
        """
        s = self.seconds
        loop = s["group"] - s["refs"]
        parts = {
            "encode images": s["encode"],
            "encode texts": s["texts"],
            "other rows": s["rows"] - s["texts"],
            "csv + cache": s["csv"] + s["cache"],
            "first batch": self.marks["encode"] - self.marks["group"] - s["refs"],
        }
        parts["later waits"] = loop - sum(parts.values())
        return {"loop": loop, **parts}


# --------------------------------------------------------------------------- synthetic data


def photo_like(size: int, seed: int) -> Image.Image:
    """A smooth two-colour gradient with sensor-like noise: compresses and decodes like a photo."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    angle = rng.uniform(0, np.pi)
    t = (np.float32(np.cos(angle)) * ramp[None, :] + np.float32(np.sin(angle)) * ramp[:, None])[..., None]
    a, b = rng.uniform(20, 235, 3).astype(np.float32), rng.uniform(20, 235, 3).astype(np.float32)
    pixels = a + (b - a) * t + rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(6)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def pick_cases(n: int):
    """n (case, sample index) pairs of the relationbench suite, single and multi cases alternating."""
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
    suite_bytes = Path(suite.path).read_bytes()
    run.start({
        "suite": {"name": suite.name, "version": suite.version,
                  "file_sha256": hashlib.sha256(suite_bytes).hexdigest()},
        "method": {"name": "synthetic"},
        "backbone": {"name": "tiny"},
        "dtype": "fp32",
        "images_per_case": max(k for _, k in items) + 1,
        "seed_rule": SEED_RULE,
    })
    run.keep_suite(suite_bytes, json_file=Path(suite.path).suffix == ".json")

    def write(item):
        case, k = item
        seed = sample_seed(case.seed, k)
        file = run.save_image(case.id, k, photo_like(size, seed))
        return {"case_id": case.id, "index": k, "seed": seed, **file, "kind": case.kind,
                "subjects": [s.name for s in case.subjects]}

    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow releases the GIL while encoding PNG
        records = list(pool.map(write, items))
    run.append(records)
    return folder


def make_references(root: Path, items, per_subject: int, size: int = 512) -> list[Path]:
    """`per_subject` photo-like JPEGs in `<root>/<source>/<dir>/` for each subject the items use."""
    subjects = sorted({(s.source, s.dir) for case, _ in items for s in case.subjects})
    files = []
    for n, (source, sub) in enumerate(subjects):
        folder = root / source / sub
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_subject):
            files.append(folder / f"{i:02d}.jpg")
            photo_like(size, 10_000 + 100 * n + i).save(files[-1], quality=90)
    return files


def prefill_reference_cache(files: list[Path], dtype) -> None:
    """Put (random, unit-length) embeddings of the reference images in the scorer's reference
    cache, under the keys it looks up: the state after any first scoring, at no encoding cost."""
    from relationbench.backbones import get_backbone
    from relationbench.devices import dtype_name
    from relationbench.metrics.cache import EmbeddingCache, cache_file, default_cache_dir
    from relationbench.score import encoder_ids

    name = dtype_name(dtype)
    rng = np.random.default_rng(0)
    for encoder_id, dim in zip(encoder_ids(get_backbone("tiny"), CLIP_ARCH, name), (512, 384)):
        cache = EmbeddingCache(cache_file(default_cache_dir(), encoder_id, name))
        for f in files:
            e = rng.standard_normal(dim).astype(np.float32)
            cache.put(hashlib.sha256(f.read_bytes()).hexdigest(), e / np.linalg.norm(e))
        cache.save()


# --------------------------------------------------------------------------- measurements


class Raw:
    """The encoders alone, on preprocessed tensors already on the device."""

    def __init__(self, clip, dino, n: int, batch_size: int, device: str, dtype, min_seconds: float):
        import torch

        self.clip, self.dino = clip.to(device, dtype), dino.to(device, dtype)
        self.batch_size, self.device, self.min_seconds = batch_size, device, min_seconds
        self.warm = False
        gen = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(n, 3, 224, 224, generator=gen).to(device, dtype)

    def _encode(self, batch, which: str) -> None:
        import torch

        if which in ("both", "clip"):
            torch.nn.functional.normalize(self.clip.encode_image(batch).float(), dim=-1).cpu().numpy()
        if which in ("both", "dino"):
            out = self.dino(pixel_values=batch).last_hidden_state[:, 0]
            torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()  # .cpu() waits for the device

    def images_per_second(self, which: str) -> float:
        """Whole passes over the images in batches (the scorer's split), at least min_seconds,
        after a warm-up batch."""
        import torch

        n, bs, done = len(self.pixels), self.batch_size, 0
        with torch.inference_mode():
            if not self.warm:  # one warm-up batch through both encoders serves every later call
                self._encode(self.pixels[:bs], "both")
                self.warm = True
            t0 = time.perf_counter()
            while done == 0 or time.perf_counter() - t0 < self.min_seconds:
                for i in range(0, n, bs):
                    self._encode(self.pixels[i : i + bs], which)
                done += n
            return done / (time.perf_counter() - t0)

    def texts_per_second(self, texts: list[str]) -> float:
        """CLIP's text tower as the scorer calls it (open_clip tokens padded to 77), batches of 256."""
        import open_clip
        import torch

        tokenizer = open_clip.tokenizer.SimpleTokenizer()  # what load_clip gives the tiny backbone
        with torch.inference_mode():
            self.clip.encode_text(tokenizer(texts[:8]).to(self.device))  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(texts), 256):
                self.clip.encode_text(tokenizer(texts[i : i + 256]).to(self.device)).float().cpu()
            return len(texts) / (time.perf_counter() - t0)


def decode_costs(files: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each step a decoding worker takes, one process."""
    from relationbench.images import read_image
    from relationbench.metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS

    ms: dict[str, float] = defaultdict(float)
    for f in files:
        t0 = time.perf_counter()
        data = f.read_bytes()
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        t2 = time.perf_counter()
        image = read_image(data)
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
    """Forget the run's scores and image embeddings, so that the next score() does all the work."""
    (run / "scores.csv").unlink(missing_ok=True)
    shutil.rmtree(run / ".cache", ignore_errors=True)
    shutil.rmtree(board, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="generated images in the synthetic run")
    parser.add_argument("--size", type=int, default=1024, help="their side in pixels (SDXL: 1024)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="decoding processes to try (default: 0, 1, 2 and the scorer's default)")
    parser.add_argument("--device", default="auto", help="as `relbench score --device`")
    parser.add_argument("--dtype", default="fp32", help="as `relbench score --dtype` (its default: fp32)")
    parser.add_argument("--refs", type=int, default=2, help="reference images per subject")
    parser.add_argument("--decode-sample", type=int, default=16, help="images timed for decode + preprocess")
    parser.add_argument("--min-raw-seconds", type=float, default=2.0,
                        help="repeat raw passes until this long (a GPU finishes one pass in milliseconds)")
    parser.add_argument("--keep", type=Path, default=None, help="build the data here and keep it (default: a temp dir)")
    args = parser.parse_args()

    import torch

    from relationbench.devices import resolve_device, resolve_dtype
    from relationbench.report.leaderboard import build_leaderboard
    from relationbench.score import ScoreOptions, default_workers, score, scoring_text

    t_start = time.perf_counter()
    busy_start, own_start = busy_seconds(), own_seconds()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    default = default_workers(device)
    worker_counts = list(dict.fromkeys(args.workers if args.workers is not None else [0, 1, 2]))
    if default not in worker_counts:
        worker_counts.append(default)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="score-bench-") if args.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        # 1. data: a run of generated images, a 4-image warm-up run, reference images; private roots
        os.environ["RELBENCH_DATA"] = str(tmp / "data")
        os.environ["RELBENCH_CACHE"] = str(tmp / "cache")
        suite, items = pick_cases(args.images)
        t0 = time.perf_counter()
        run = make_run(tmp / "results" / "relationbench" / "synthetic", suite, items, args.size)
        warm_run = make_run(tmp / "warmup" / "relationbench" / "warm", suite, items[:4], args.size)
        refs = make_references(tmp / "data", items, args.refs)
        prefill_reference_cache(refs, dtype)
        png_mb = sum(p.stat().st_size for p in (run / "images").rglob("*.png")) / 1e6
        print(f"data: {args.images} PNGs at {args.size} px ({png_mb / args.images:.2f} MB each), "
              f"{len(refs)} reference images, {time.perf_counter() - t0:.1f} s", flush=True)

        # 2. the encoders, and the scorer wired to them
        clip, dino = full_size_encoders()
        use_full_size_encoders(clip, dino)
        probes = Probes()
        probes.install()

        # 3. raw encoder throughput
        raw = Raw(clip, dino, args.images, args.batch_size, device, dtype, args.min_raw_seconds)
        ips = {which: raw.images_per_second(which) for which in ("both", "clip", "dino")}
        texts = list(dict.fromkeys(scoring_text(case, {"prompt": case.prompt}) for case, _ in items))
        text_ps = raw.texts_per_second(texts[:32] if device == "cpu" else texts)
        print("raw img/s: " + ", ".join(f"{k} {v:.2f}" for k, v in ips.items()) + f"; CLIP texts/s {text_ps:.2f}",
              flush=True)

        # 4. decode + preprocess alone
        files = sorted((run / "images").rglob("*.png"))[: args.decode_sample]
        decode_costs(files[:2])  # warm the page cache and the imports
        dec = decode_costs(files)
        print("decode ms/img: " + ", ".join(f"{k} {v:.1f}" for k, v in dec.items()), flush=True)

        # 5. the scorer, after one small untimed run (imports, first calls)
        board = tmp / "leaderboard"

        def opts(path: Path, workers: int) -> ScoreOptions:
            return ScoreOptions(paths=[path], backbone="tiny", device=device, dtype=args.dtype,
                                batch_size=args.batch_size, workers=workers, quiet=True)

        def score_command(path: Path, workers: int):
            """What `relbench score` runs: the scorer, then the leaderboard (timed together)."""
            start = time.perf_counter()
            summary = score(opts(path, workers))
            build_leaderboard(summary.runs, board, n_boot=100)
            return summary, time.perf_counter() - start

        score_command(warm_run, 0)
        results = {}
        for w in worker_counts:
            fresh(run, board)
            probes.reset()
            summary, seconds = score_command(run, w)
            if summary.scored != args.images or summary.failures or summary.missing_references:
                raise SystemExit(f"scored {summary.scored} of {args.images}; failures {summary.failures[:3]}; "
                                 f"missing references {summary.missing_references[:3]}")
            parts = probes.loop()
            results[w] = {"e2e": seconds, "refs": probes.seconds["refs"], **parts}
            print(f"workers {w}: end to end {seconds:.2f} s, image loop {parts['loop']:.2f} s; "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items() if k != "loop"), flush=True)
        texts_per_image = len(set(texts) | {c.predicate for c, _ in items if c.predicate}) / args.images

        # 6. the raw encoders again: on a shared machine the load may have changed meanwhile
        ips_after = raw.images_per_second("both")
        print(f"raw img/s again: both {ips_after:.2f}", flush=True)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()

    # 7. report
    n = args.images
    wall = time.perf_counter() - t_start
    busy_end = busy_seconds()
    others = busy_end - busy_start - (own_seconds() - own_start) if busy_start is not None else float("nan")
    raw_both = (ips["both"] + ips_after) / 2
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU used"
    print()
    print(f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), device {device}, {args.dtype}; CLIP {CLIP_ARCH} + DINO ViT-S/16 "
          f"full size, random weights; {n} images, {args.size} px PNG, batch {args.batch_size}; scorer's default "
          f"workers here: {default}; other processes used {max(others, 0) / wall:.2f} cores on average meanwhile")
    print()
    print("| what | images/s | ms/image | where the time went (s) |")
    print("|---|---:|---:|---|")
    print(f"| raw encoders: CLIP image + DINO | {raw_both:.2f} | {1000 / raw_both:.0f} | "
          f"mean of {ips['both']:.2f} before and {ips_after:.2f} after the scorer runs |")
    print(f"| raw encoder: CLIP image only | {ips['clip']:.2f} | {1000 / ips['clip']:.0f} | |")
    print(f"| raw encoder: DINO only | {ips['dino']:.2f} | {1000 / ips['dino']:.0f} | |")
    print(f"| raw CLIP text tower (texts/s; the scorer embeds {texts_per_image:.2f} texts per image here) "
          f"| {text_ps:.2f} | {1000 / text_ps:.0f} | |")
    steps = ", ".join(f"{k} {v:.1f}" for k, v in dec.items() if k != "total")
    print(f"| decode + preprocess alone, 1 process | {1000 / dec['total']:.2f} | {dec['total']:.0f} | "
          f"ms per image: {steps} |")
    for w, r in results.items():
        mark = " (default)" if w == default else ""
        split = ", ".join(f"{k} {r[k]:.1f}" for k in
                          ("encode images", "encode texts", "other rows", "csv + cache", "first batch", "later waits"))
        print(f"| scorer end to end, workers {w}{mark} | {n / r['e2e']:.2f} | {1000 * r['e2e'] / n:.0f} | "
              f"outside the image loop {r['e2e'] - r['loop']:.1f} (references, cached: {r['refs']:.1f}) |")
        print(f"| scorer image loop, workers {w}{mark} | {n / r['loop']:.2f} | {1000 * r['loop'] / n:.0f} | "
              f"{split} |")
    d = results[default]
    print()
    print(f"scorer / raw = {n / d['e2e'] / raw_both:.2f} (end to end, workers {default}; target >= 0.5)")
    print(f"image loop / raw = {n / d['loop'] / raw_both:.2f}; without its text embeddings "
          f"{n / (d['loop'] - d['encode texts']) / raw_both:.2f}; without texts and the first batch "
          f"{n / (d['loop'] - d['encode texts'] - d['first batch']) / raw_both:.2f}")
    print(f"(benchmark wall time {wall:.0f} s)")


if __name__ == "__main__":
    main()
