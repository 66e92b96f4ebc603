"""Subject images on disk: where they live, how to get them, and how to check them.

(The package also holds the relation triplets RelationBooth trains on: `triplets.py`, the
format and its checker; `example_triplets.py`; `authors.py`, the import of the authors' layout.)

Layout: `<root>/<source>/<dir>/<image files>`, where `source` is a dataset name
("dreambench", "customconcept101") and `dir` a subject folder (Subject.dir). The root is
`data_root()`: an explicit path, else $RELBENCH_DATA, else ~/.cache/relationbench/data.
A suite may instead name a subject's images by path (Subject.images: files, or folders
meaning their image files): those are used as named, wherever the data root is.

Getting a dataset (`relbench data fetch NAME` / `relbench data import NAME PATH`) never leaves
a half-written copy: files go to a temporary folder inside the root, are verified (expected
subject folders present and non-empty, every image decodable), get a `SHA256SUMS` and a
`SOURCE.json`, and only then replace `<root>/<name>`.

Facts about each dataset (licence, origin, expected folders and files) are data: the
`DatasetSpec` records below and the JSON files in `relationbench/data_files/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterable, Iterator

from ..errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_ROOT = Path("~/.cache/relationbench/data")
ROOT_ENV = "RELBENCH_DATA"
SUMS_FILE = "SHA256SUMS"
SOURCE_FILE = "SOURCE.json"
DOWNLOAD_TIMEOUT_S = 60.0
_NOTICE_NAMES = ("license", "licence", "copying", "references_and_licenses")
_TRUE = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------
# dataset specs


@dataclass(frozen=True)
class DatasetSpec:
    """One downloadable image collection.

    `url` is the default download (a zip), overridable per call or with the `url_env`
    variable. In the archive (or local folder) a subject's images are the files
    `.../<subject>/<file>`; when `archive_dir` is set, the subject folder must sit directly in
    a folder of that name (or at the top of the source).
    """

    name: str
    title: str
    license: str
    license_url: str
    origin: str  # where the originals live, for people
    url: str
    url_env: str
    subjects_file: str  # JSON in relationbench/data_files: expected folders (and files)
    archive_dir: str | None = None
    on_hub: bool = False  # a Hugging Face hub file: HF_HUB_OFFLINE=1 refuses to fetch it
    license_notice: str | None = None  # package data file always written next to the images
    notes: str = ""

    @cached_property
    def _subjects_data(self) -> dict:
        text = resources.files("relationbench").joinpath("data_files", self.subjects_file).read_text("utf-8")
        return json.loads(text)

    @property
    def subjects(self) -> tuple[str, ...]:
        """The expected subject folder names."""
        data = self._subjects_data
        return tuple(sorted(data.get("subjects") or data.get("concepts")))

    @property
    def expected_files(self) -> dict[str, tuple[str, ...]] | None:
        """Folder -> expected image file names, where the dataset's file names are known."""
        data = self._subjects_data.get("subjects")
        return {k: tuple(v) for k, v in data.items()} if data else None

    def download_url(self, override: str | None = None) -> tuple[str, bool]:
        """The URL to fetch and whether it is the default (not overridden)."""
        if override:
            return override, False
        if os.environ.get(self.url_env):
            return os.environ[self.url_env], False
        url = self.url
        if self.on_hub and os.environ.get("HF_ENDPOINT"):
            url = url.replace("https://huggingface.co", os.environ["HF_ENDPOINT"].rstrip("/"), 1)
        return url, True


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="dreambench",
            title="DreamBench (the DreamBooth dataset)",
            license="CC BY 4.0 (per-image sources and licences in references_and_licenses.txt)",
            license_url="https://creativecommons.org/licenses/by/4.0/",
            origin="https://github.com/google/dreambooth (folder dataset/)",
            url="https://github.com/google/dreambooth/archive/refs/heads/main.zip",
            url_env="RELBENCH_DREAMBENCH_URL",
            subjects_file="dreambench_files.json",
            archive_dir="dataset",
            notes="30 subjects, 158 images (Ruiz et al., DreamBooth, CVPR 2023)",
        ),
        DatasetSpec(
            name="customconcept101",
            title="CustomConcept101",
            license="Adobe Research License (noncommercial research use only); images: Unsplash"
            " License / CC BY-SA 4.0 / per-image sources (see upstream README)",
            license_url="https://github.com/adobe-research/custom-diffusion/blob/main/customconcept101/README.md",
            origin="https://huggingface.co/datasets/nupurkmr9/custom-diffusion (benchmark_dataset.zip)",
            url="https://huggingface.co/datasets/nupurkmr9/custom-diffusion/resolve/main/benchmark_dataset.zip",
            url_env="RELBENCH_CC101_URL",
            subjects_file="customconcept101_concepts.json",
            on_hub=True,
            license_notice="LICENSE-customconcept101.md",
            notes="101 concepts (Kumari et al., Custom Diffusion, CVPR 2023)",
        ),
    )
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(
            f"unknown dataset {name!r} (known: {', '.join(DATASETS)})",
            hint="pass one of the known dataset names",
        )
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# where images are


def data_root(explicit: str | Path | None = None) -> Path:
    """The data root: `explicit`, else $RELBENCH_DATA, else ~/.cache/relationbench/data."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser()
    return DEFAULT_ROOT.expanduser()


def is_image(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def subject_dir(subject, root: str | Path | None = None) -> Path:
    """`<root>/<source>/<dir>` for a suites.Subject of a dataset."""
    return data_root(root) / subject.source / subject.dir


def reference_images(subject, root: str | Path | None = None) -> list[Path]:
    """The subject's reference images, in the order every consumer uses them.

    A dataset subject: the image files of `<root>/<source>/<dir>` sorted by name, [] when none
    are on disk. A subject named by path (`root` unused): its paths in the suite's order, a
    folder replaced by its image files sorted by name; a path that is missing, or a folder
    without image files, is a UserError naming the suite file, the subject and the path.
    """
    if not subject.images:
        folder = subject_dir(subject, root)
        return _image_files(folder) if folder.is_dir() else []
    out: list[Path] = []
    for named in map(Path, subject.images):
        found = [named] if named.is_file() else _image_files(named) if named.is_dir() else []
        if not found:
            what = (f"folder {named} holds no image files ({', '.join(IMAGE_SUFFIXES)})" if named.is_dir()
                    else f"no image file or folder {named}")
            raise UserError(f"subject {subject.name!r}: {what}", path=subject.suite_file,
                            hint="fix the subject's `images:` in the suite file (a relative path is relative to "
                                 "the suite file's folder)")
        out.extend(found)
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p) and not p.name.startswith("."))


def subject_images_sha256(subjects: Iterable) -> dict[str, list[str]]:
    """Subject name -> the sha256 of each reference image, in order, for the subjects named by
    path (a dataset's files are checked by its SHA256SUMS): what a run records, so that images
    changed under a run are seen. A missing image is reference_images' UserError."""
    return {s.name: [sha256_file(p) for p in reference_images(s)] for s in subjects if s.images}


def missing_subjects(subjects: Iterable, root: str | Path | None = None) -> list:
    """The subjects (in the given order, each once) that have no reference images."""
    out, seen = [], set()
    for s in subjects:
        key = (s.images_key, s.name)
        if key not in seen and not reference_images(s, root):
            out.append(s)
        seen.add(key)
    return out


def fetch_hint(subject, root: str | Path | None = None) -> str:
    """How to give a subject its reference images: the dataset's command, the folder to fill,
    or the suite file whose paths to fix."""
    if subject.images:
        return f"fix its `images:` paths in {subject.suite_file}"
    if subject.source in DATASETS:
        return get_command(subject.source, root=root)
    return f"put its images in {subject_dir(subject, root)}/"


def get_command(source: str, *, local: bool = False, root: str | Path | None = None) -> str:
    """The relbench command that puts `source`'s images in place.

    `relbench data fetch NAME`, or with local=True `relbench data import NAME DIR`; with a
    non-default root, `--data-dir ROOT` is added.
    """
    spec = get_spec(source)
    cmd = f"relbench data import {spec.name} DIR" if local else f"relbench data fetch {spec.name}"
    if root is not None and data_root(root) != data_root():
        cmd += f" --data-dir {data_root(root)}"
    return cmd


def require_images(subjects: Iterable, root: str | Path | None = None) -> dict[str, list[Path]]:
    """Subject name -> its images; one UserError listing every subject without images.

    Call before any work (generate, score) so a run never stops half-way for missing data.
    """
    subjects = list(subjects)
    missing = missing_subjects(subjects, root)
    if missing:
        base = data_root(root)
        by_source: dict[str, list[str]] = {}
        for s in missing:
            by_source.setdefault(s.source, []).append(s.name)
        lines, fixes = [], []
        for source, names in by_source.items():
            lines.append(f"  {source} ({len(names)}): {', '.join(names)}")
            if source in DATASETS:
                fixes.append(
                    f"`{get_command(source, root=root)}` (offline: download elsewhere, then "
                    f"`{get_command(source, local=True, root=root)}`)"
                )
            else:
                fixes.append(f"put {source}'s images in {base / source}/<subject>/")
        raise UserError(
            f"no reference images for {len(missing)} subject(s) in this data root:\n" + "\n".join(lines),
            path=base,
            hint="; ".join(fixes),
        )
    return {s.name: reference_images(s, root) for s in subjects}


# ---------------------------------------------------------------------------------------------
# fetch / import


def fetch(
    name: str,
    root: str | Path | None = None,
    *,
    url: str | None = None,
    quiet: bool = False,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download dataset `name` (a zip of the originals), verify it and put it in place.

    `url` (or $RELBENCH_DREAMBENCH_URL / $RELBENCH_CC101_URL) replaces the default URL of the
    zip, e.g. a mirror. Returns `<root>/<name>`.
    """
    spec = get_spec(name)
    url, default = spec.download_url(url)
    offline_hint = (
        f"download {url} on a machine with access, copy it here, then run "
        f"`relbench data import {spec.name} PATH` (PATH: the zip or its unpacked folder)"
    )
    if spec.on_hub and default and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise UserError(
            f"{spec.name} lives on the Hugging Face hub and HF_HUB_OFFLINE is set; not downloading",
            hint=offline_hint + f", or unset HF_HUB_OFFLINE, or set {spec.url_env} to a mirror",
        )
    with _staging(spec, data_root(root)) as tmp:
        archive = tmp / "download.zip"
        _download(url, archive, timeout=timeout, quiet=quiet, hint=offline_hint, what=spec.name)
        return _build(spec, _ZipSource(archive, label=url), tmp, origin=url, method="fetch", quiet=quiet)


def import_(name: str, src: str | Path, root: str | Path | None = None, *, quiet: bool = False) -> Path:
    """Copy dataset `name` from a local folder (`<subject>/<file>` inside, or an unpacked
    archive) or zip into `<root>/<name>`, verified. Returns `<root>/<name>`."""
    spec = get_spec(name)
    src = Path(src).expanduser()
    if src.is_dir():
        source: _Source = _DirSource(src)
    elif src.is_file() and zipfile.is_zipfile(src):
        source = _ZipSource(src, label=str(src))
    elif src.exists():
        raise UserError("not a folder or a zip file", path=src, hint=f"pass the {spec.name} folder or its zip")
    else:
        raise UserError("no such file or folder", path=src, hint=f"pass the {spec.name} folder or its zip")
    with _staging(spec, data_root(root)) as tmp:
        return _build(spec, source, tmp, origin=str(src.resolve()), method="import", quiet=quiet)


class _staging:
    """A temporary folder inside root, removed on exit; root too if this created it empty."""

    def __init__(self, spec: DatasetSpec, root: Path):
        self.spec, self.root = spec, root

    def __enter__(self) -> Path:
        self.created_root = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the data root: {exc.strerror}", path=self.root,
                            hint=f"pass another root or set {ROOT_ENV}") from None
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.spec.name}.partial-", dir=self.root))
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created_root and exc[0] is not None:
            try:
                self.root.rmdir()  # only when empty
            except OSError:
                pass


def _download(url: str, dest: Path, *, timeout: float, quiet: bool, hint: str, what: str) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "relationbench"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, dest.open("wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"fetch {what}", disable=quiet) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as exc:
        raise UserError(f"could not download {what}: HTTP {exc.code} {exc.reason} from {url}", hint=hint) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"could not download {what} from {url}: {reason}", hint=hint) from None


# Sources: a zip or a folder, both seen as (posix relative path, opener) pairs.


class _Source:
    label: str

    def members(self) -> Iterator[tuple[PurePosixPath, Callable[[], BinaryIO]]]:
        raise NotImplementedError


class _DirSource(_Source):
    def __init__(self, path: Path):
        self.path, self.label = path, str(path)

    def members(self):
        for p in sorted(self.path.rglob("*")):
            if p.is_file():
                yield PurePosixPath(p.relative_to(self.path).as_posix()), (lambda p=p: p.open("rb"))


class _ZipSource(_Source):
    def __init__(self, path: Path, label: str):
        self.path, self.label = path, label

    def members(self):
        try:
            zf = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise UserError(f"not a zip file: {self.label}", hint="check the URL or file") from None
        with zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield PurePosixPath(info.filename), (lambda info=info: zf.open(info))


def _skip(rel: PurePosixPath) -> bool:
    return any(part == "__MACOSX" or part.startswith(".") for part in rel.parts)


def _build(spec: DatasetSpec, source: _Source, tmp: Path, *, origin: str, method: str, quiet: bool) -> Path:
    """Copy, verify, checksum and describe `source` in tmp, then move it to root/name."""
    from tqdm import tqdm

    # 1. copy the subject images and the licence notices
    stage = tmp / spec.name
    stage.mkdir()
    wanted = set(spec.subjects)
    taken: dict[str, str] = {}  # dest rel path -> source rel path
    notices: dict[str, tuple[int, bytes]] = {}  # file name -> (depth, text): shallowest wins
    try:
        for rel, opener in tqdm(source.members(), desc=f"copy {spec.name}", unit="file", disable=quiet):
            if _skip(rel):
                continue
            parts = rel.parts
            if len(parts) >= 2 and parts[-2] in wanted and is_image(parts[-1]):
                if spec.archive_dir and len(parts) >= 3 and parts[-3] != spec.archive_dir:
                    continue
                dest_rel = f"{parts[-2]}/{parts[-1]}"
                if dest_rel in taken:
                    raise UserError(
                        f"{source.label}: two copies of {dest_rel} ({taken[dest_rel]} and {rel})",
                        hint=f"pass a source holding one copy of {spec.name}",
                    )
                taken[dest_rel] = str(rel)
                (stage / parts[-2]).mkdir(exist_ok=True)
                with opener() as fin, (stage / dest_rel).open("wb") as fout:
                    shutil.copyfileobj(fin, fout)
            elif parts[-1].lower().startswith(_NOTICE_NAMES) and not (set(parts[:-1]) & wanted):
                depth = len(parts)
                if parts[-1] not in notices or depth < notices[parts[-1]][0]:
                    with opener() as fin:
                        notices[parts[-1]] = (depth, fin.read())
        for fname, (_, text) in sorted(notices.items()):
            (stage / fname).write_bytes(text)
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"could not read {source.label}: {exc}", hint="check the file; fetch or copy it again") from None

    # 2. verify: every expected folder (and file), each image decodable
    _check_complete(spec, stage, source.label)
    images = sorted(p for p in stage.glob("*/*") if p.is_file())
    bad = []
    for p in tqdm(images, desc=f"verify {spec.name}", unit="img", disable=quiet):
        problem = _undecodable(p)
        if problem:
            bad.append(f"{taken[p.relative_to(stage).as_posix()]} ({problem})")
    if bad:
        raise UserError(
            f"{len(bad)} image(s) in {source.label} cannot be decoded: " + "; ".join(bad[:10])
            + (" ..." if len(bad) > 10 else ""),
            path=source.label,
            hint=f"replace the broken files (fetch or copy {spec.name} again); nothing was written",
        )

    # 3. licence notice, SOURCE.json, SHA256SUMS
    if spec.license_notice:
        text = resources.files("relationbench").joinpath("data_files", spec.license_notice).read_bytes()
        (stage / spec.license_notice).write_bytes(text)
    from .. import __version__

    record = {
        "dataset": spec.name,
        "title": spec.title,
        "method": method,
        "origin": origin,
        "upstream": spec.origin,
        "retrieved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "subjects": len({p.parent.name for p in images}),
        "images": len(images),
        "license": spec.license,
        "license_url": spec.license_url,
        "license_files": sorted(set(notices) | ({spec.license_notice} if spec.license_notice else set())),
        "relationbench_version": __version__,
    }
    (stage / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _write_sums(stage)

    # 4. into place; an older copy goes only now, and comes back if the move fails
    final = tmp.parent / spec.name
    old = None
    if final.exists():
        old = tmp / "previous"
        final.rename(old)
    try:
        stage.rename(final)
    except OSError:
        if old is not None:
            old.rename(final)
        raise
    return final


def _check_complete(spec: DatasetSpec, stage: Path, label: str) -> None:
    present = {p.name for p in stage.iterdir() if p.is_dir() and any(p.iterdir())}
    missing = [s for s in spec.subjects if s not in present]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(spec.subjects)} subject folder(s) missing or empty: "
                        + ", ".join(missing))
    expected = spec.expected_files or {}
    missing_files = [
        f"{s}/{f}" for s, files in expected.items() if s in present for f in files if not (stage / s / f).is_file()
    ]
    if missing_files:
        problems.append(f"{len(missing_files)} expected image(s) missing: " + ", ".join(missing_files[:10])
                        + (" ..." if len(missing_files) > 10 else ""))
    if problems:
        layout = f"{spec.archive_dir}/<subject>/<image>" if spec.archive_dir else "<subject>/<image>"
        raise UserError(
            f"{label} is not a complete copy of {spec.name}: " + "; ".join(problems),
            path=label,
            hint=f"pass the full {spec.name} ({spec.origin}; layout {layout}); nothing was written",
        )


def _undecodable(path: Path) -> str | None:
    """None when the project's image reader accepts the file (whole pixel data), else the reason."""
    from ..images import read_image

    try:
        read_image(path)
    except UserError as exc:
        return exc.message
    return None


# ---------------------------------------------------------------------------------------------
# checksums


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_sums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    lines = [f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    (folder / SUMS_FILE).write_text("".join(lines), encoding="utf-8")


@dataclass
class VerifyReport:
    """The outcome of `verify`: files checked, and those missing, changed or unlisted."""

    name: str
    path: Path
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.modified or self.unlisted)

    def summary(self) -> str:
        if self.ok:
            return f"{self.name}: {self.checked} files match {self.path / SUMS_FILE}"
        parts = [f"{self.name}: {self.path / SUMS_FILE} does not match"]
        for label, items in (("missing", self.missing), ("modified", self.modified), ("not listed", self.unlisted)):
            if items:
                parts.append(f"  {label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        return "\n".join(parts)

    __str__ = summary


def verify(name: str, root: str | Path | None = None) -> VerifyReport:
    """Re-check `<root>/<name>` against its SHA256SUMS (`relbench data verify NAME`)."""
    spec = get_spec(name)
    folder = data_root(root) / spec.name
    sums = folder / SUMS_FILE
    if not sums.is_file():
        raise UserError(
            f"no {spec.name} copy with checksums here" if not folder.is_dir() else f"{SUMS_FILE} missing",
            path=folder,
            hint=f"run `{get_command(spec.name, root=root)}` (or `{get_command(spec.name, local=True, root=root)}`)",
        )
    report = VerifyReport(name=spec.name, path=folder)
    listed = set()
    for n, line in enumerate(sums.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise UserError(f"line {n} is not '<sha256>  <path>'", path=sums, hint=f"fetch or import {spec.name} again")
        listed.add(rel)
        path = folder / rel
        if not path.is_file():
            report.missing.append(rel)
        elif sha256_file(path) != digest:
            report.modified.append(rel)
        report.checked += 1
    report.unlisted = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != SUMS_FILE and p.relative_to(folder).as_posix() not in listed
    )
    return report


__all__ = [
    "DATASETS",
    "DatasetSpec",
    "VerifyReport",
    "data_root",
    "fetch",
    "fetch_hint",
    "get_command",
    "get_spec",
    "import_",
    "missing_subjects",
    "reference_images",
    "require_images",
    "subject_dir",
    "subject_images_sha256",
    "verify",
]
