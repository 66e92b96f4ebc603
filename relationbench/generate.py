"""Cases -> groups -> batches -> images: the resumable, shardable run loop behind `relbench generate`.

Reads top to bottom: check every input, then prepare the run folder, then sample. Nothing
is written before all checks pass.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .data import data_root, require_images, subject_images_sha256
from .errors import UserError
from .methods.cards import parse_set
from .runs import IMAGES_SHA256, SEED_RULE, RunDir, image_key, sample_seed
from .suites import Case, Suite, load_suite


# On the CPU, batch size must not change an image's bytes. Two things in MKL's fp32 GEMM do:
# its default mode picks kernels whose rounding depends on the row count (fixed by strict
# conditional-numerical-reproducibility mode, which MKL reads at its first call), and calls
# with fewer than 4 rows take another path even then (avoided by padding each model call to
# 4 requests: the pooled text projection sees one row per prompt). The padding costs time
# at small batch sizes, so it is on by default on the CPU only (--batch-invariant). GPUs make
# no such promise: there, batch size changes images within floating-point tolerance only.
CPU_REPRODUCIBLE_ENV = {"MKL_CBWR": "AUTO,STRICT"}
INVARIANT_MIN_BATCH = 4


def cpu_reproducible_env() -> None:
    """Ask MKL for strict reproducibility; takes effect if no GEMM ran in this process yet."""
    for key, value in CPU_REPRODUCIBLE_ENV.items():
        os.environ.setdefault(key, value)


@dataclass
class GenerateOptions:
    method: str
    suite: str
    set_values: Sequence[str] = ()  # --set KEY=VALUE: a variant of the card
    backbone: str = "sdxl"
    weights: dict[str, str] = field(default_factory=dict)  # backbone weight overrides
    limit: int | None = None
    cases: Sequence[str] = ()
    kind: str | None = None
    images_per_case: int | None = None  # None: the suite's default
    batch_size: int = 1
    out: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str | None = None
    quiet: bool = False
    batch_invariant: bool | None = None  # None: on for the CPU (see INVARIANT_MIN_BATCH)


@dataclass
class GenerateSummary:
    run_dir: Path
    generated: int
    skipped: int
    seconds: float
    # images whose manifest line failed the rerun's check, as (path, why): made again when
    # selected (`replaced`); otherwise only dropped from the manifest until they are
    replaced: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)


def select_cases(suite: Suite, ids: Sequence[str] = (), kind: str | None = None, limit: int | None = None) -> list[Case]:
    """Cases in suite order: the given ids (all of them must exist), one kind, the first N."""
    cases = list(suite.cases)
    if ids:
        wanted = list(dict.fromkeys(i.strip() for part in ids for i in part.split(",") if i.strip()))
        known = {c.id for c in cases}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise UserError(
                f"suite {suite.name!r} has no case(s) {', '.join(unknown)}",
                hint=f"list the ids with `relbench prompts export --suite {suite.name}`",
            )
        keep = set(wanted)
        cases = [c for c in cases if c.id in keep]
    if kind is not None:
        cases = [c for c in cases if c.kind == kind]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        cases = cases[:limit]
    if not cases:
        raise UserError("no case selected", hint="check --cases, --kind and --limit")
    return cases


def default_out(suite: str, method: str, backbone: str, root: str | Path = "results") -> Path:
    """<root>/<suite>/<card>, with @<backbone> added for anything but the real sdxl; a
    variant's name (`msdiffusion[scale=0.4]`) is its folder name."""
    name = method.replace(os.sep, "_")
    if backbone != "sdxl":
        name = f"{name}@{backbone}"
    return Path(root) / suite / name


class Shard:
    """This process's share of the work: rank r of w takes cases r, r+w, r+2w, ...

    Under `accelerate launch` (WORLD_SIZE > 1) ranks come from accelerate; alone, 0 of 1.
    """

    def __init__(self):
        self.state = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch
            from accelerate import PartialState

            # without cpu=True, accelerate ignores a CPU-only launch and every process is rank 0
            self.state = PartialState(cpu=not torch.cuda.is_available())
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    def take(self, cases: list[Case]) -> list[Case]:
        return cases[self.rank :: self.world]

    def device(self, requested: str) -> str:
        if self.state is not None and requested == "auto":
            device = self.state.device
            return "cpu" if device.type == "cpu" else str(device)
        return requested

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value: Any) -> Any:
        """The main process's `value` on every process (a decision all must take alike)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def agree(self, ok: bool, message: str) -> None:
        """Every process stops if the main one could not start (e.g. the run is locked)."""
        ok, message = self.share((ok, message))
        if not ok:
            raise UserError(message)


def run_meta(suite: Suite, suite_bytes: bytes, card, backbone, dtype_name: str, images_per_case: int,
             method_info: dict | None = None, cases: Sequence[Case] = ()) -> dict:
    """What run.json records: enough to say exactly how every image was made. `suite_bytes`:
    the suite file as read once, hashed here and kept as the run's copy; `method_info`: the
    loaded method's run_info() (what it decided at load time), under method.run; `cases`: the
    selected ones, whose subjects named by path get their images' sha256 recorded (a rerun
    with other cases adds its own: RunDir.start)."""
    import diffusers
    import torch
    import transformers

    used = {s.name for c in cases for s in c.subjects}
    images = subject_images_sha256(s for s in suite.used_subjects() if s.name in used)
    return {
        "suite": {"name": suite.name, "version": suite.version,
                  "file_sha256": hashlib.sha256(suite_bytes).hexdigest(),
                  **({IMAGES_SHA256: images} if images else {})},
        # where the scorer finds it, and whose folder a run's copy resolves relative image paths
        # against (not part of the identity)
        "suite_path": str(Path(suite.path).resolve()),
        "method": {**card.describe(backbone.is_tiny),  # resolved settings; a tiny schedule is named
                   **({"run": method_info} if method_info else {})},
        "backbone": backbone.describe(),
        "dtype": dtype_name,
        "images_per_case": images_per_case,
        "seed_rule": SEED_RULE,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"relationbench": __version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "git": _git_hash(),
    }


def generate(opts: GenerateOptions) -> GenerateSummary:
    from tqdm.auto import tqdm

    from .backbones import get_backbone
    from .devices import dtype_name, resolve_device, resolve_dtype
    from .methods import Context, Request, default_registry

    # 1. check every input before anything is written
    if (opts.images_per_case is not None and opts.images_per_case < 1) or opts.batch_size < 1:
        raise UserError("--images-per-case and --batch-size must be at least 1")
    suite = load_suite(opts.suite)
    per_case = opts.images_per_case or suite.images_per_case
    cases = select_cases(suite, opts.cases, opts.kind, opts.limit)
    card = default_registry().card(opts.method, parse_set(opts.set_values))
    adapter = card.adapter_class()
    backbone = get_backbone(opts.backbone, opts.weights)
    backbone.check_available(adapter.weights)  # every weight the method loads, in seconds
    root = data_root(opts.data_dir)
    if adapter.needs_references:
        require_images({s.name: s for c in cases for s in c.subjects}.values(), root)
    shard = Shard()
    device = resolve_device(shard.device(opts.device))
    if device == "cpu":
        cpu_reproducible_env()
    invariant = device == "cpu" if opts.batch_invariant is None else opts.batch_invariant
    min_batch = INVARIANT_MIN_BATCH if invariant else 1
    dtype = resolve_dtype(opts.dtype, device)
    method = card.build(Context(backbone=backbone, device=device, dtype=dtype, data_root=root, quiet=opts.quiet))
    try:
        method.check(cases)
        method.load()  # every weight loaded and checked: a bad one stops here, before any write
    except BaseException:
        method.close()  # undo what a half-done load changed on the backbone's pipeline
        raise
    run = RunDir(opts.out or default_out(suite.name, card.name, backbone.name))

    # 2. the run folder: one launch writes it; the main process locks, repairs, records,
    # checks every finished image and drops the lines that fail (made again below)
    suite_bytes = Path(suite.path).read_bytes() if shard.main else b""
    meta = (run_meta(suite, suite_bytes, card, backbone, dtype_name(dtype), per_case,
                     getattr(method, "run_info", dict)(), cases)
            if shard.main else None)
    with contextlib.closing(method), _main_lock(run, shard, meta, suite_bytes) as main_lock:
        done = run.finished()
        mine = shard.take(cases)
        work = [
            Request(c, k, sample_seed(c.seed, k))
            for c in mine
            for k in range(per_case)
            if (c.id, k) not in done
        ]
        skipped = len(mine) * per_case - len(work)

        # 3. sample, group by group, batch by batch; each finished batch is on disk and in the manifest
        start = time.perf_counter()
        if work:
            method.prepare(list(dict.fromkeys(r.case for r in work)))
        bar = tqdm(total=len(work), unit="img", desc=f"{card.name} · {suite.name}",
                   disable=opts.quiet or not shard.main)
        # a 1024 px PNG takes ~0.2 s to encode: a batch's images are encoded in parallel
        # (Pillow releases the GIL), all before the batch's manifest lines are written
        with bar, ThreadPoolExecutor(max_workers=min(4, opts.batch_size)) as writers:
            for batch in group_batches(work, method.group, opts.batch_size):
                t0 = time.perf_counter()
                samples = _generate_padded(method, batch, min_batch)
                if len(samples) != len(batch):
                    raise RuntimeError(f"{card.adapter} returned {len(samples)} images for {len(batch)} requests")
                per_image = round((time.perf_counter() - t0) / len(batch), 4)
                files = writers.map(lambda pair: run.save_image(pair[0].case.id, pair[0].index, pair[1].image),
                                    zip(batch, samples))
                run.append([
                    {"case_id": req.case.id, "index": req.index, "seed": req.seed, **file,
                     "kind": req.case.kind, "subjects": [s.name for s in req.case.subjects],
                     "time_s": per_image, "device": device, "rank": shard.rank, **sample.meta}
                    for req, sample, file in zip(batch, samples, files)
                ])
                bar.update(len(batch))
        shard.barrier()
    selected = {(c.id, k) for c in cases for k in range(per_case)}
    failed = [(image_key(line), (str(line.get("path")), why)) for line, why in main_lock.dropped]
    return GenerateSummary(run.root, len(work), skipped, time.perf_counter() - start,
                           replaced=[f for key, f in failed if key in selected],
                           dropped=[f for key, f in failed if key not in selected])


def group_batches(work: Sequence, group, batch_size: int) -> list[list]:
    """Requests ordered by group (groups in order of first appearance, requests in their
    order within a group) and cut into batches that never span two groups, so a method sets
    each group up (e.g. switches to its LoRA) once per run. Seeds belong to requests, so the
    order changes no image."""
    by_group: dict[Any, list] = {}
    for request in work:
        by_group.setdefault(group(request.case), []).append(request)
    return [members[i : i + batch_size] for members in by_group.values() for i in range(0, len(members), batch_size)]


def _generate_padded(method, batch: list, min_batch: int) -> list:
    """method.generate(batch), repeating the last request up to min_batch and dropping extras."""
    padded = batch + [batch[-1]] * (min_batch - len(batch))
    return method.generate(padded)[: len(batch)]


class _main_lock:
    """The main process holds the run lock for the whole launch, repairs the folder, writes
    run.json and the suite's copy, and checks the manifest against the images (`dropped`:
    the lines that failed); the others start only once it has, or stop with its error."""

    def __init__(self, run: RunDir, shard: Shard, meta: dict | None, suite_bytes: bytes):
        self.run, self.shard, self.meta, self.suite_bytes = run, shard, meta, suite_bytes
        self.held = contextlib.ExitStack()
        self.dropped: list[tuple[dict, str]] = []

    def __enter__(self):
        error = ""
        if self.shard.main:
            try:
                self.held.enter_context(self.run.lock())
                self.run.repair()
                self.run.start(self.meta)
                # start() refused a different suite file, so an existing copy holds these bytes
                self.run.keep_suite(self.suite_bytes, json_file=Path(self.meta["suite_path"]).suffix == ".json")
                self.dropped = self.run.check_manifest().dropped
            except UserError as exc:
                self.held.close()
                error = exc.render()
        self.shard.agree(not error, error)
        return self

    def __exit__(self, *exc):
        self.held.close()
        return False


def _git_hash() -> str | None:
    """The project's commit, when it runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
