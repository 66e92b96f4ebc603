"""The results layout of one run, and the rules that make it resumable and safe.

    <run>/run.json          what made the run (suite, card, backbone, versions, seed rule)
    <run>/manifest.jsonl    one line per finished image
    <run>/images/<case_id>/<k>.png
    <run>/scores.csv        one row per scored image and protocol (relbench score)

An image counts only once its manifest line exists. Images are written under a temporary
name, flushed and renamed, then the line is appended (one write, under a file lock), so a
process killed at any moment loses at most the batch in flight and never counts a partial
file. One writer (launch) per run folder, enforced by an exclusive lock on <run>/.lock.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

RUN_JSON = "run.json"
MANIFEST = "manifest.jsonl"
IMAGES = "images"
LOCK = ".lock"
SCORES = "scores.csv"
SCORE_LOCK = ".score.lock"  # the scorer's own lock: scoring may run while generate appends
# scores.csv's columns, in file order: the scorer writes them, the report reads them, and a
# file with any other header is refused (it was written by another version: rescore it).
# predicate_source: where CLIP-R's predicate came from ("suite": the suite file; a spaCy model
# id when extracted at score time, also when the model found none; empty when the suite file
# says the case has no relation).
SCORE_COLUMNS = (
    "case_id", "index", "kind", "subject_1", "subject_2", "clip_t", "clip_r", "clip_i", "dino",
    "clip_i_1", "clip_i_2", "dino_1", "dino_2", "text", "predicate", "predicate_source", "protocol",
    "clip_encoder", "dino_encoder", "image_sha256",
)
SCORE_FLOAT_COLUMNS = ("clip_t", "clip_r", "clip_i", "dino", "clip_i_1", "clip_i_2", "dino_1", "dino_2")
TMP_SUFFIX = ".tmp"
SEED_RULE = "sample 0: the case seed; sample k > 0: first 4 bytes of sha256('<case seed>:<k>'), big-endian"
# run.json keys that must match for a rerun to continue a run
IDENTITY_KEYS = ("suite", "method", "backbone", "dtype")


def sample_seed(case_seed: int, index: int) -> int:
    """The seed of sample `index` of a case: depends on nothing else (see SEED_RULE)."""
    if index == 0:
        return case_seed
    digest = hashlib.sha256(f"{case_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """One run folder. Methods never see it; generate.py is its only writer."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.run_json = self.root / RUN_JSON
        self.manifest = self.root / MANIFEST
        self.images = self.root / IMAGES
        self.scores = self.root / SCORES

    def is_run(self) -> bool:
        return self.run_json.is_file() and self.manifest.is_file()

    # -- metadata -------------------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        if not self.run_json.exists():
            return None
        try:
            return json.loads(self.run_json.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"run.json is not valid JSON ({exc})", path=self.run_json) from None

    def start(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Write run.json for a new run, or check that an existing run is the same run.

        A rerun may ask for more images per case (the larger count is kept); anything in
        IDENTITY_KEYS that differs is refused, since mixing it would mix two experiments.
        """
        old = self.read_meta()
        if old is not None:
            diff = [k for k in IDENTITY_KEYS if old.get(k) != meta.get(k)]
            if diff:
                raise UserError(
                    f"this folder holds a different run (differs in: {', '.join(diff)})",
                    path=self.run_json,
                    hint="pass another --out folder, or delete this run to start over",
                )
            meta = {**old, "images_per_case": max(old.get("images_per_case", 0), meta["images_per_case"])}
            if meta == old:
                return old
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_json, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return meta

    # -- locking --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str = LOCK) -> Iterator[None]:
        """Hold one of the run's locks (the writer's by default); refuse at once if another
        process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(
                    f"another relbench process (pid {holder}) is writing this run",
                    path=self.root,
                    hint="wait for it to finish, or write to another --out folder",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock; a killed process releases it too

    # -- manifest -------------------------------------------------------------------------
    def repair(self) -> None:
        """Drop what a killed writer may have left: a partial last line, temporary images.

        Call only while holding the lock.
        """
        _drop_torn_tail(self.manifest)
        if self.images.exists():
            for tmp in self.images.rglob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)

    def records(self) -> list[dict[str, Any]]:
        """Manifest lines that parse; a torn last line is ignored."""
        if not self.manifest.exists():
            return []
        out = []
        for line in self.manifest.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def finished(self) -> set[tuple[str, int]]:
        """(case_id, index) of every image the manifest holds and the disk still has."""
        return {
            (r["case_id"], int(r["index"]))
            for r in self.records()
            if (self.root / r["path"]).is_file()
        }

    def image_relpath(self, case_id: str, index: int) -> str:
        return f"{IMAGES}/{case_id}/{index}.png"

    def save_image(self, case_id: str, index: int, image) -> str:
        """Write a PNG under a temporary name, flush it to disk, rename it into place."""
        rel = self.image_relpath(case_id, index)
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return rel

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append manifest lines in one locked write (several shard processes may append)."""
        _append_locked(self.manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())

    # -- scores ---------------------------------------------------------------------------
    def read_scores(self) -> list[dict[str, str]]:
        """The rows of scores.csv (a torn last line dropped); refuses a file whose header is not
        SCORE_COLUMNS.

        Call while holding SCORE_LOCK.
        """
        if not self.scores.exists():
            return []
        _drop_torn_tail(self.scores)
        with open(self.scores, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != list(SCORE_COLUMNS):
                raise UserError(
                    "scores.csv has other columns than this version of relbench writes",
                    path=self.scores,
                    hint="delete it (it is derived data) and score again",
                )
            return list(reader)

    def append_scores(self, rows: list[dict]) -> None:
        """Append rows (keys: SCORE_COLUMNS) to scores.csv in one locked write, with the header
        if the file is new."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=SCORE_COLUMNS, lineterminator="\n")
        if not self.scores.exists() or self.scores.stat().st_size == 0:
            writer.writeheader()
        writer.writerows(rows)
        _append_locked(self.scores, buf.getvalue().encode())


def _drop_torn_tail(path: Path) -> None:
    """Cut a file back to its last newline: what a process killed mid-append leaves."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def _append_locked(path: Path, data: bytes) -> None:
    """Append bytes in one write under an exclusive lock, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
