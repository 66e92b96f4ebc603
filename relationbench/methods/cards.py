"""Method cards, their variants and the registry that finds them.

A method card (methods/<name>.yaml) names the adapter class and its settings:

    name: sdxl
    adapter: relationbench.methods.sdxl:SDXLMethod
    version: 1
    description: ...
    settings: {steps: 30, guidance_scale: 5.0}

Third-party methods register through the entry point group `relationbench.methods`; the
entry point loads either a card path or an adapter class with a `card_path` attribute.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..errors import UserError
from .base import Context, Method

ENTRY_POINT_GROUP = "relationbench.methods"


@dataclass(frozen=True)
class MethodCard:
    """A parsed method card: adapter import path and its settings, with where it came from."""

    name: str
    adapter: str
    settings: dict[str, Any]
    version: int = 1
    description: str = ""
    paper: str | None = None
    path: str | None = None

    def digest(self) -> str:
        """Stable hash of what changes images: adapter, version and settings."""
        blob = json.dumps({"adapter": self.adapter, "version": self.version, "settings": self.settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def adapter_class(self) -> type:
        module_name, _, attr = self.adapter.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UserError(
                f"method card {self.name!r}: cannot import adapter {self.adapter!r} ({exc})",
                path=self.path,
                hint="adapter must be 'package.module:ClassName' of an installed package",
            ) from None

    def build(self, context: Context) -> Method:
        cls = self.adapter_class()
        settings = parse_settings(getattr(cls, "Settings"), self.settings, self)
        return cls(settings, context)


def parse_settings(settings_cls: type, values: dict[str, Any], card: MethodCard):
    """Fill the adapter's Settings dataclass from the card, rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(settings_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(
            f"method card {card.name!r}: unknown setting(s) {', '.join(unknown)}",
            path=card.path,
            hint=f"settings of {card.adapter} are: {', '.join(sorted(known))}",
        )
    try:
        return settings_cls(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"method card {card.name!r}: {exc}", path=card.path) from None


def cards_dir() -> Path:
    """The project's methods/ folder of cards (next to the package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "methods"


def load_card(path: Path) -> MethodCard:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read method card: {exc}", path=path) from None
    if not isinstance(data, dict):
        raise UserError("a method card is a mapping with name, adapter, settings", path=path)
    missing = [k for k in ("name", "adapter") if k not in data]
    if missing:
        raise UserError(f"method card lacks {', '.join(missing)}", path=path)
    extra = sorted(set(data) - {"name", "adapter", "settings", "version", "description", "paper"})
    if extra:
        raise UserError(f"method card has unknown key(s) {', '.join(extra)}", path=path)
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise UserError("'settings' must be a mapping", path=path)
    return MethodCard(
        name=str(data["name"]),
        adapter=str(data["adapter"]),
        settings=settings,
        version=int(data.get("version", 1)),
        description=str(data.get("description", "")).strip(),
        paper=data.get("paper"),
        path=str(path),
    )


class Registry:
    """Method cards by name: the project's methods/ folder plus installed entry points.

    Nothing is imported until a card is asked for; duplicate names are refused.
    """

    def __init__(self, directories: Sequence[Path] | None = None, use_entry_points: bool = True):
        self.directories = list(directories) if directories is not None else [cards_dir()]
        self.use_entry_points = use_entry_points
        self._paths: dict[str, Path] | None = None

    def _scan(self) -> dict[str, Path]:
        if self._paths is not None:
            return self._paths
        found: dict[str, Path] = {}
        for d in self.directories:
            for p in sorted(Path(d).glob("*.yaml")):
                self._add(found, p.stem, p)
        if self.use_entry_points:
            from importlib.metadata import entry_points

            for ep in entry_points(group=ENTRY_POINT_GROUP):
                obj = ep.load()
                path = getattr(obj, "card_path", obj)
                self._add(found, ep.name, Path(path))
        self._paths = found
        return found

    @staticmethod
    def _add(found: dict[str, Path], name: str, path: Path) -> None:
        if name in found and found[name] != path:
            raise UserError(f"method {name!r} is defined twice: {found[name]} and {path}")
        found[name] = path

    def names(self) -> list[str]:
        return sorted(self._scan())

    def card(self, name_or_path: str) -> MethodCard:
        """A card by registered name, or by path to a YAML file."""
        p = Path(name_or_path)
        if p.suffix in (".yaml", ".yml") and p.exists():
            return load_card(p)
        paths = self._scan()
        if name_or_path not in paths:
            close = difflib.get_close_matches(name_or_path, list(paths), n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "pass a card name or a card file path"
            raise UserError(
                f"unknown method {name_or_path!r} (known: {', '.join(sorted(paths)) or 'none'})", hint=hint
            )
        card = load_card(paths[name_or_path])
        if card.name != name_or_path:
            raise UserError(f"card is registered as {name_or_path!r} but is named {card.name!r}", path=card.path)
        return card


def default_registry() -> Registry:
    return Registry()
