"""The results layout of one run, and the rules that make it resumable and safe.

    <run>/run.json          what made the run (suite, card, backbone, versions, seed rule)
    <run>/suite.yaml        the exact bytes of the suite file the run was generated from
                            (suite.json for a JSON suite): scoring reads its cases from here
    <run>/manifest.jsonl    one line per finished image, with the file's size and sha256
    <run>/images/<case_id>/<k>.png
    <run>/scores.csv        one row per scored image and protocol (relbench score)
    <run>/scores-<family>.csv  one row per scored image and model of a metric family (vqa, grounded)

An image counts only once its manifest line exists. Images are written under a temporary
name, flushed and renamed, then the line is appended (one write, under a file lock), so a
process killed at any moment loses at most the batch in flight and never counts a partial
file. One writer (launch) per run folder, enforced by an exclusive lock on <run>/.lock.
A rerun first checks every line against its file (size and sha256) and rewrites the manifest
with one checked line per (case, sample), so what it counts as done is what is on disk.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .data import sha256_file
from .errors import UserError

RUN_JSON = "run.json"
MANIFEST = "manifest.jsonl"
IMAGES = "images"
LOCK = ".lock"
SCORES = "scores.csv"
SUITE_COPIES = ("suite.yaml", "suite.json")  # the run's copy of its suite file (JSON kept as JSON)
SCORE_LOCK = ".score.lock"  # the scorer's own lock: scoring may run while generate appends
# scores.csv's columns, in file order: the scorer writes them, the report reads them, and a
# file with any other header is refused (it was written by another version: rescore it).
# predicate_source: where CLIP-R's predicate came from ("suite": the suite file; a spaCy model
# id when extracted at score time, also when the model found none, or when the suite file
# marks its stored predicate as extracted and unreviewed; empty when the suite file says the
# case has no relation).
SCORE_COLUMNS = (
    "case_id", "index", "kind", "subject_1", "subject_2", "clip_t", "clip_r", "clip_i", "dino",
    "clip_i_1", "clip_i_2", "dino_1", "dino_2", "text", "predicate", "predicate_source", "protocol",
    "clip_encoder", "dino_encoder", "image_sha256",
)
# a family's file (scores-vqa.csv, scores-grounded.csv; metrics/registry.py): these keys, then
# the family's columns; `model` is the scorer's id (its weights, and dtype when not fp32)
FAMILY_SCORES = "scores-{family}.csv"
FAMILY_KEY_COLUMNS = ("case_id", "index", "kind", "image_sha256", "model")
# a row's score group: rows of one image count once per group (the scorer keeps one, the report
# refuses two), and only rows of one group are ever pooled
SCORE_GROUP = ("protocol", "clip_encoder", "dino_encoder")  # scores.csv: protocol and encoders
FAMILY_GROUP = ("model",)  # a family's file: the scorer's model id
SCORE_FLOAT_COLUMNS = ("clip_t", "clip_r", "clip_i", "dino", "clip_i_1", "clip_i_2", "dino_1", "dino_2")
TMP_SUFFIX = ".tmp"
SEED_RULE = "sample 0: the case seed; sample k > 0: first 4 bytes of sha256('<case seed>:<k>'), big-endian"
# run.json keys that must match for a rerun to continue a run
IDENTITY_KEYS = ("suite", "method", "backbone", "dtype")
# run.json's suite.images_sha256: subject name -> its images' sha256 (subjects named by path),
# recorded for the subjects of the cases generated so far; a rerun adds subjects, never changes one
IMAGES_SHA256 = "images_sha256"


def _identity(meta: dict[str, Any], key: str) -> Any:
    """meta[key] as runs compare it: the suite without its images' sha256 (_merged_images)."""
    value = meta.get(key)
    if key == "suite" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != IMAGES_SHA256}
    return value


def _merged_images(old: dict[str, Any], new: dict[str, Any], path: Path) -> dict[str, list[str]]:
    """The subject images' sha256 of a run and of its rerun, merged; UserError when a subject
    both recorded has other images now (the method would see other pictures)."""
    before = (old.get("suite") or {}).get(IMAGES_SHA256) or {}
    now = (new.get("suite") or {}).get(IMAGES_SHA256) or {}
    check_subject_images(before, now, path)
    return {**before, **now}


def check_subject_images(recorded: dict[str, list[str]], now: dict[str, list[str]], path: Path) -> None:
    """UserError naming the subjects recorded in run.json (`path`) whose images' sha256 differ now."""
    changed = sorted(n for n in recorded.keys() & now.keys() if recorded[n] != now[n])
    if changed:
        raise UserError(f"the images of subject(s) {', '.join(changed)} changed after the run was generated "
                        "(run.json records other sha256)", path=path,
                        hint="put back the images the run was made from, or generate the run again into "
                             "another --out folder")


def sample_seed(case_seed: int, index: int) -> int:
    """The seed of sample `index` of a case: depends on nothing else (see SEED_RULE)."""
    if index == 0:
        return case_seed
    digest = hashlib.sha256(f"{case_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write under a temporary name, flush to disk, rename into place: readers see the old
    file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def image_key(record: dict[str, Any]) -> tuple[str, int]:
    """(case_id, index): what a manifest line or a scores.csv row is the image of."""
    return record["case_id"], int(record["index"])


@dataclass
class Checked:
    """What RunDir.check_manifest found: the lines kept and the lines dropped, with why."""

    kept: list[dict[str, Any]]  # one line per (case, sample), each matching its file
    dropped: list[tuple[dict[str, Any], str]]  # (line, why: "missing", "changed on disk", ...)


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
            images = _merged_images(old, meta, self.run_json)
            diff = [k for k in IDENTITY_KEYS if _identity(old, k) != _identity(meta, k)]
            if diff:
                raise UserError(
                    f"this folder holds a different run (differs in: {', '.join(diff)})",
                    path=self.run_json,
                    hint="pass another --out folder, or delete this run to start over",
                )
            meta = {**old, "images_per_case": max(old.get("images_per_case", 0), meta["images_per_case"])}
            if images:
                meta["suite"] = {**meta["suite"], IMAGES_SHA256: images}
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

    def latest(self) -> dict[tuple[str, int], dict[str, Any]]:
        """The current line of each (case, sample): a later line (a regenerated image) wins."""
        return _latest(self.records())

    def finished(self) -> set[tuple[str, int]]:
        """(case_id, index) of every image the manifest holds and the disk still has (after
        check_manifest, which the main process runs first, every such file is whole)."""
        return {key for key, r in self.latest().items() if (self.root / r["path"]).is_file()}

    def check_manifest(self) -> Checked:
        """Check each (case, sample)'s current line against its file, then rewrite the manifest
        atomically with the lines that pass, one per (case, sample).

        A line with a size and sha256 passes when the file has both (hashed once, in threads:
        hashlib's sha256 releases the GIL); a line of an older version without them
        passes when its file decodes fully, and is given them. Call only while holding the
        writer's lock, before anything appends.
        """
        lines = self.records()
        latest = _latest(lines)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(self._check_line, latest.values()))
        checked = Checked(kept=[], dropped=[])
        for line, (good, why) in zip(latest.values(), results):
            if good is None:
                checked.dropped.append((line, why))
            else:
                checked.kept.append(good)
        if checked.kept != lines:
            atomic_write_text(self.manifest, "".join(_manifest_line(r) for r in checked.kept))
        return checked

    def _check_line(self, line: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
        """(the line, possibly given its size and hash; "") if its file is what it says, else
        (None, why)."""
        path = self.root / str(line.get("path", ""))
        if not line.get("path") or not path.is_file():
            return None, "missing"
        if "sha256" in line:
            if path.stat().st_size != line.get("bytes") or sha256_file(path) != line["sha256"]:
                return None, "changed on disk"
            return line, ""
        from .images import read_image

        data = path.read_bytes()
        try:
            read_image(data, name=path)
        except UserError:
            return None, "not a readable image"
        return {**line, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, ""

    def image_relpath(self, case_id: str, index: int) -> str:
        return f"{IMAGES}/{case_id}/{index}.png"

    def save_image(self, case_id: str, index: int, image) -> dict[str, Any]:
        """Write a PNG under a temporary name, flush it to disk, rename it into place.

        Returns its manifest fields: path, bytes (file size) and sha256, both of the encoded
        bytes as written, so nothing reads the file back to record them.
        """
        rel = self.image_relpath(case_id, index)
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getbuffer()
        atomic_write_bytes(final, data)
        return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append manifest lines in one locked write (several shard processes may append)."""
        _append_locked(self.manifest, "".join(_manifest_line(r) for r in records).encode())

    # -- the suite's copy -------------------------------------------------------------------
    def suite_copy(self) -> Path | None:
        """The copy of the suite file the run was generated from; None in a run made before
        runs kept one."""
        return next((p for p in (self.root / n for n in SUITE_COPIES) if p.is_file()), None)

    def keep_suite(self, data: bytes, json_file: bool = False) -> Path:
        """Keep the suite file's bytes as the run's copy (rewritten only if they differ)."""
        path = self.root / SUITE_COPIES[1 if json_file else 0]
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)
        return path

    # -- scores ---------------------------------------------------------------------------
    def score_table(self) -> "ScoreTable":
        """scores.csv: the paper family's rows (SCORE_COLUMNS)."""
        return ScoreTable(self.scores, SCORE_COLUMNS)

    def family_table(self, family: str, columns: tuple[str, ...]) -> "ScoreTable":
        """scores-<family>.csv: FAMILY_KEY_COLUMNS, then the family's columns."""
        return ScoreTable(self.root / FAMILY_SCORES.format(family=family), (*FAMILY_KEY_COLUMNS, *columns))


class ScoreTable:
    """One per-image score file with a fixed header: read, append (locked), replace (atomic)."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path, self.columns = Path(path), tuple(columns)

    def read(self) -> list[dict[str, str]]:
        """The rows (a torn last line dropped); refuses a file whose header is not `columns`.

        Call while holding SCORE_LOCK.
        """
        if not self.path.exists():
            return []
        _drop_torn_tail(self.path)
        with open(self.path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != list(self.columns):
                raise UserError(
                    f"{self.path.name} has other columns than this version of relbench writes",
                    path=self.path,
                    hint="delete it (it is derived data) and score again",
                )
            return list(reader)

    def append(self, rows: list[dict]) -> None:
        """Append rows in one locked write, with the header if the file is new."""
        new = not self.path.exists() or self.path.stat().st_size == 0
        _append_locked(self.path, _csv_text(rows, self.columns, header=new).encode())

    def write(self, rows: list[dict]) -> None:
        """Replace the file with these rows, atomically. Call while holding SCORE_LOCK."""
        atomic_write_text(self.path, _csv_text(rows, self.columns, header=True))


def _csv_text(rows: list[dict], columns: tuple[str, ...], header: bool) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _latest(lines: list[Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """The last line of each (case, sample); a line without them (not one generate wrote) is
    skipped, and check_manifest's rewrite drops it."""
    out = {}
    for line in lines:
        try:
            out[image_key(line)] = line
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _manifest_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True) + "\n"


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
