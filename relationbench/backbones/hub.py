"""The hub, without waiting on it: local cache lookup, a bounded availability probe, and the
download command to suggest when weights are missing.

Everything reads the environment at call time (HF_HUB_CACHE, HF_HOME, HF_ENDPOINT), so tests
and users can redirect the cache after import.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .sources import WeightSource

HUB_PROBE_TIMEOUT_S = 3.0  # how long check_available waits for the hub before giving up


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_cache_dir() -> Path:
    """The hub cache as the environment names it now (read at call time, not import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def open_clip_hub_file(source: WeightSource) -> tuple[str, tuple[str, ...]]:
    """The hub repo and candidate file names that hold an open_clip pretrained tag."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(source.model or "", source.location)
    repo = (cfg or {}).get("hf_hub", "").strip("/")
    if not repo:
        raise UserError(
            f"open_clip has no hub copy of {source.model}/{source.location}",
            hint="pass a local checkpoint file with --weight clip=/path/to/file",
        )
    return repo, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def local_copy(source: WeightSource) -> Path | None:
    """The local path of a source if it is on this machine (folder, file or HF cache); no network."""
    if source.kind == "local":
        path = Path(source.location)
        return path if path.exists() else None
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    cache = hub_cache_dir()
    if source.kind == "open_clip":
        repo, names = open_clip_hub_file(source)
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(hit, str):
                return Path(hit)
        return None
    if source.filename is not None:
        name = "/".join(p for p in (source.subfolder, source.filename) if p)
        hit = try_to_load_from_cache(source.location, name, cache_dir=cache)
        return Path(hit) if isinstance(hit, str) else None
    try:
        root = Path(snapshot_download(source.location, cache_dir=cache, local_files_only=True))
    except Exception:  # huggingface_hub raises LocalEntryNotFoundError (an OSError) and friends
        return None
    path = root / source.subfolder if source.subfolder else root
    return path if path.is_dir() and any(path.iterdir()) else None


def hub_repo(source: WeightSource) -> str:
    return open_clip_hub_file(source)[0] if source.kind == "open_clip" else source.location


def probe_hub(repo: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None if the hub answers for `repo` within `timeout`, else why not (a short sentence).

    Runs in a daemon thread so that a hanging DNS lookup cannot hold the caller longer.
    """
    result: list[str | None] = []

    def probe():
        try:
            from huggingface_hub import HfApi
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

            try:
                HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo, timeout=timeout)
                result.append(None)
            except GatedRepoError:
                result.append(f"the hub repo {repo} is gated: accept its licence and log in (hf auth login)")
            except RepositoryNotFoundError:
                result.append(f"the hub has no repo {repo} (or it is private)")
        except Exception as exc:  # any network failure means: not reachable
            result.append(f"the hub is unreachable ({type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"the hub did not answer within {timeout:.0f} s"


def download_hint(key: str, source: WeightSource) -> str:
    """How to get `key`'s weights onto this machine: the hf command, a local override, or tiny."""
    repo = hub_repo(source)
    if source.kind == "hub" and source.filename:
        what = f"hf download {repo} {'/'.join(p for p in (source.subfolder, source.filename) if p)}"
    elif source.kind == "hub" and source.subfolder:
        what = f'hf download {repo} --include "{source.subfolder}/*"'
    else:
        what = f"hf download {repo}"
    local = source.filename or ("checkpoint_file" if source.kind == "open_clip" else "folder")
    return (
        f"on a connected machine run `{what}` and copy the HF cache (or the files) here; "
        f"or pass `--weight {key}=/path/to/{local}`; or use `--backbone tiny` for an offline run"
    )


@contextlib.contextmanager
def loading_from(path: Path, what: str, hint: str) -> Iterator[None]:
    """Turn a from_pretrained failure on a local folder (OSError, ValueError, KeyError: a
    missing or mismatched file) into one UserError naming the folder, `what` it should hold
    and how to fix it."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load {what} from this folder: {exc}", path=path, hint=hint) from exc
