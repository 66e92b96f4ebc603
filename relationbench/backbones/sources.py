"""Weight sources: where one component's weights come from, and `--weight KEY=VALUE` parsing."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from ..errors import UserError


@dataclass(frozen=True)
class WeightSource:
    """Where one component's weights come from.

    kind "hub":       `location` is a hub repo id; `subfolder` / `filename` point inside it.
    kind "local":     `location` is a local folder or file (absolute).
    kind "open_clip": `location` is an open_clip pretrained tag for architecture `model`.
    """

    kind: Literal["hub", "local", "open_clip"]
    location: str
    subfolder: str | None = None
    filename: str | None = None
    model: str | None = None

    @classmethod
    def hub(cls, repo: str, *, subfolder: str | None = None, filename: str | None = None) -> "WeightSource":
        return cls("hub", repo, subfolder=subfolder, filename=filename)

    @classmethod
    def local(cls, path: str | os.PathLike) -> "WeightSource":
        return cls("local", str(Path(path).expanduser().absolute()))

    @classmethod
    def open_clip(cls, model: str, tag: str) -> "WeightSource":
        return cls("open_clip", tag, model=model)

    def __str__(self) -> str:
        if self.kind == "open_clip":
            return f"open_clip {self.model}/{self.location}"
        inside = "/".join(p for p in (self.subfolder, self.filename) if p)
        return f"{self.location} ({inside})" if inside else self.location

    def to_dict(self) -> dict[str, str]:
        """The non-empty fields, for run.json."""
        return {k: v for k, v in asdict(self).items() if v is not None}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.*)?$")
_OPEN_CLIP_TAG = re.compile(r"^[\w.-]+$")


def parse_override(key: str, value: str, default: WeightSource | None) -> WeightSource:
    """Turn a `--weight KEY=VALUE` string into a source replacing `default`.

    VALUE is an existing local path, or for hub components a repo id `owner/name`, optionally
    `owner/name:PATH` where PATH replaces the preset's subfolder (folder components) or file
    (file components); without `:PATH` the preset's subfolder/file are kept. For open_clip
    components VALUE may be another pretrained tag of the same architecture. A component with
    no default (an optional SDXL part such as `vae`) is a folder component.
    """
    value = value.strip()
    path = Path(value).expanduser()
    if path.exists():
        return WeightSource.local(path)
    default = default or WeightSource.hub("")
    if default.kind == "open_clip" and _OPEN_CLIP_TAG.match(value):
        return WeightSource.open_clip(default.model or "", value)
    if default.kind != "open_clip" and _HUB_ID.match(value) and not value.startswith("."):
        repo, _, inside = value.partition(":")
        if ":" not in value:
            return replace(default, kind="hub", location=repo)
        inside = inside.strip("/") or None
        if default.filename is not None:  # a file component: PATH is the file inside the repo
            if inside is None:
                raise UserError(
                    f"--weight {key}={value}: '{key}' is a single file; name it after the colon",
                    hint=f"--weight {key}={repo}:{default.filename}",
                )
            sub, _, name = inside.rpartition("/")
            return WeightSource.hub(repo, subfolder=sub or None, filename=name)
        return WeightSource.hub(repo, subfolder=inside)
    raise UserError(
        f"--weight {key}={value}: no such file or folder",
        path=path.absolute(),
        hint=(
            "give an existing local path (for sdxl a folder in the diffusers layout, with "
            "model_index.json) or a hub repo id like owner/name"
        ),
    )
