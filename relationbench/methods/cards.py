"""Method cards, their variants and the registry that finds them.

A method card (methods/<name>.yaml) names the adapter class and its settings:

    name: sdxl
    adapter: relationbench.methods.sdxl:SDXLMethod
    version: 1
    description: ...
    settings: {steps: 30, guidance_scale: 5.0}
    tiny: {train_steps: 2}     # optional: a smoke schedule applied on the tiny backbone

A variant changes a few settings of another card, either in a card file

    base: msdiffusion
    settings: {scale: 0.4}

or on the command line (`--set scale=0.4`). Its name records the change
(`msdiffusion[scale=0.4]`), so it gets its own run folder and run identity.

Settings resolve in layers, each recorded as the source of the values it sets: the adapter's
Settings defaults, the root card, the tiny schedule (on the tiny backbone only), then every
variant layer (base-card children, then --set). A variant's explicit value therefore beats
the tiny schedule: "tiny means seconds unless settings say otherwise".

Third-party methods register through the entry point group `relationbench.methods`; the
entry point loads either a card path or an adapter class with a `card_path` attribute.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import UserError
from ..userfiles import CONTROL_CHARS, QUOTE_HINT, load_yaml, read_text, show, text_problem, type_problem
from .base import Context, Method

ENTRY_POINT_GROUP = "relationbench.methods"
CARD_KEYS = {"name", "base", "adapter", "settings", "tiny", "version", "description", "paper"}
DEFAULT_SOURCE = "default"
TINY_SOURCE = "tiny schedule"
SET_SOURCE = "--set"
_FLOAT_MAX = sys.float_info.max
VALUE_CHARS = 32  # of a setting value in a variant's name; a 300-character prompt made a name too long for a folder
# a card's name is its run folder's (results/<suite>/<name>): no separators, no "..", one line, short
CARD_NAME = re.compile(r"[A-Za-z0-9][^/\\]{0,99}")
ADAPTER = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Layer:
    """Settings from one place (a card file, the tiny schedule, --set), applied in order."""

    source: str
    values: Mapping[str, Any]
    variant: bool  # a user's change: applied after the tiny schedule


@dataclass(frozen=True)
class Resolved:
    """A card's settings for one backbone: every field's value and where it came from."""

    values: dict[str, Any]
    sources: dict[str, str]

    @property
    def tiny_applied(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if self.sources[k] == TINY_SOURCE}


@dataclass(frozen=True)
class MethodCard:
    """A parsed method card (or a variant of one): adapter import path and settings layers."""

    name: str
    adapter: str
    layers: tuple[Layer, ...] = ()
    tiny: Mapping[str, Any] = field(default_factory=dict)
    version: int = 1
    description: str = ""
    paper: str | None = None
    path: str | None = None
    base: str | None = None  # the name of the card this one varies

    @property
    def changes(self) -> dict[str, Any]:
        """What this variant changes relative to its root card."""
        out: dict[str, Any] = {}
        for layer in self.layers:
            if layer.variant:
                out.update(layer.values)
        return out

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

    def settings_class(self) -> type:
        cls = self.adapter_class()
        settings_cls = getattr(cls, "Settings", None)
        if settings_cls is None or not dataclasses.is_dataclass(settings_cls):
            raise UserError(f"adapter {self.adapter} has no Settings dataclass", path=self.path)
        return settings_cls

    def with_settings(self, values: Mapping[str, Any], source: str = SET_SOURCE) -> "MethodCard":
        """A variant of this card with `values` changed; its name records the change."""
        if not values:
            return self
        self.check_keys(values, source)
        hints = typing.get_type_hints(self.settings_class())
        values = {k: coerce(k, v, hints.get(k, Any), self, source) for k, v in values.items()}
        return dataclasses.replace(self, name=variant_name(self.name, values),
                                   layers=self.layers + (Layer(source, values, True),),
                                   base=self.base or self.name)

    def check_keys(self, values: Mapping[str, Any], source: str) -> None:
        """Refuse unknown setting names, with the close matches and the full list."""
        known = [f.name for f in dataclasses.fields(self.settings_class())]
        unknown = sorted(set(values) - set(known))
        if unknown:
            close = sorted({m for u in unknown for m in difflib.get_close_matches(u, known, n=2)})
            guess = f"did you mean {' or '.join(close)}? " if close else ""
            raise UserError(
                f"method {self.name!r}: unknown setting(s) {', '.join(unknown)} ({source})",
                path=self.path,
                hint=f"{guess}settings of {self.adapter} are: {', '.join(sorted(known))}",
            )

    def resolve(self, tiny: bool = False) -> Resolved:
        """Every setting's value on a backbone (tiny or not), with its source, type-checked."""
        settings_cls = self.settings_class()
        hints = typing.get_type_hints(settings_cls)
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for f in dataclasses.fields(settings_cls):
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                values[f.name] = f.default_factory()  # type: ignore[misc]
            sources[f.name] = DEFAULT_SOURCE
        tiny_layer = [Layer(TINY_SOURCE, self.tiny, False)] if tiny and self.tiny else []
        ordered = [lay for lay in self.layers if not lay.variant] + tiny_layer + [lay for lay in self.layers if lay.variant]
        for layer in ordered:
            self.check_keys(layer.values, layer.source)
            for key, value in layer.values.items():
                values[key] = coerce(key, value, hints.get(key, Any), self, layer.source)
                sources[key] = layer.source
        missing = [k for k in sources if k not in values]
        if missing:
            raise UserError(f"method {self.name!r}: setting(s) {', '.join(missing)} have no default; set them",
                            path=self.path)
        self.settings(values)  # the adapter's own checks (steps >= 1, ...) before anything records them
        return Resolved(values, sources)

    def settings(self, values: Mapping[str, Any]) -> Any:
        """The adapter's Settings of resolved `values`; what its checks refuse is a UserError."""
        try:
            return self.settings_class()(**values)
        except (TypeError, ValueError) as exc:
            raise UserError(f"method {self.name!r}: {exc}", path=self.path) from None

    def digest(self, tiny: bool = False) -> str:
        """Stable hash of what changes images: adapter, version and the resolved settings."""
        return self._digest(self.resolve(tiny).values)

    def _digest(self, values: Mapping[str, Any]) -> str:
        blob = json.dumps({"adapter": self.adapter, "version": self.version, "settings": values},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def describe(self, tiny: bool = False) -> dict[str, Any]:
        """What run.json records about the method."""
        resolved = self.resolve(tiny)
        info = {"name": self.name, "adapter": self.adapter, "version": self.version,
                "settings": resolved.values, "digest": self._digest(resolved.values)}
        if self.base:
            info["base"] = self.base
            info["changes"] = self.changes
        if resolved.tiny_applied:
            info["tiny_schedule"] = resolved.tiny_applied
        return json.loads(json.dumps(info, default=list))  # tuples as lists, as JSON reads back

    def build(self, context: Context) -> Method:
        cls = self.adapter_class()
        if context is not None:
            context = dataclasses.replace(context, card=self.name)
        return cls(self.settings(self.resolve(bool(context and context.backbone.is_tiny)).values), context)


def variant_name(name: str, values: Mapping[str, Any]) -> str:
    """`msdiffusion` + {scale: 0.4} -> `msdiffusion[scale=0.4]`; a variant of a variant merges
    into one bracket, later values replacing earlier ones."""
    base, _, inner = name.partition("[")
    pairs: dict[str, str] = {}
    for part in inner.rstrip("]").split(",") if inner else ():
        key, _, value = part.partition("=")
        pairs[key] = value
    pairs.update({k: format_value(v) for k, v in values.items()})
    return f"{base}[{','.join(f'{k}={v}' for k, v in sorted(pairs.items()))}]"


def format_value(value: Any) -> str:
    """A compact, path-safe rendering of a setting value for variant names (a run folder's
    name): no '/', ',' or control characters, at most VALUE_CHARS characters; a longer or
    altered text keeps its start and a hash of all of it, so two values never share a name."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, (list, tuple)):
        text = "[" + ";".join(format_value(v) for v in value) + "]"
    else:
        text = str(value)
    text = text.replace("/", "_").replace(",", ";")
    safe = CONTROL_CHARS.sub("_", text).replace("\\", "_")
    if safe == text and len(safe) <= VALUE_CHARS:
        return safe
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe[:VALUE_CHARS - 9]}~{digest}"


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` strings -> values read as YAML (0.4, null, [0.6, 0.4], true, text)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {pair!r} must look like KEY=VALUE", hint="e.g. --set scale=0.4")
        out[key] = RawValue(raw)
    return out


class RawValue(str):
    """A --set value as typed: kept as text for str settings, read as YAML for the rest."""


def coerce(key: str, value: Any, hint: Any, card: MethodCard, source: str) -> Any:
    """`value` checked against the Settings field's type hint (and converted where lossless:
    int -> float, list -> tuple); a mismatch is a UserError naming the setting and source."""
    ok, out = _coerce(value, hint)
    if not ok:
        raise UserError(
            f"method {card.name!r}: setting {key} must be {_hint_name(hint)}, got {show(value)} ({source})",
            path=card.path,
        )
    return out


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, _read_yaml(value) if isinstance(value, RawValue) else value
    if origin in (typing.Union, types.UnionType):
        if isinstance(value, RawValue) and type(None) in args and value.strip() in ("null", "~", ""):
            return True, None
        for arg in sorted(args, key=lambda a: a is str):  # str last: "0.4" is a float first
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if hint is type(None):
        return value is None, None
    if isinstance(value, RawValue):
        if hint is str:
            return text_problem(value, one_line=False) is None, str(value)
        value = _read_yaml(value)
        if isinstance(value, str) and not (hint is float and _EXPONENT_FLOAT.fullmatch(value)):
            return False, value
    if hint is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value):
        value = float(value)  # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as text
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:  # finite: a NaN guidance scale would only show as black images
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= _FLOAT_MAX
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str) and text_problem(value, one_line=False) is None, value
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (list, tuple)):
            return False, value
        item = args[0] if args else Any
        items = [_coerce(v, item) for v in value]
        if not all(ok for ok, _ in items):
            return False, value
        return True, (tuple if (origin or hint) is tuple else list)(v for _, v in items)
    if origin is dict or hint is dict:
        return isinstance(value, dict), value
    return True, value


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _read_yaml(text: str) -> Any:
    """A --set value read as YAML; text that is not YAML (or is an alias bomb) stays text."""
    try:
        return load_yaml(str(text), None)  # libyaml takes a str, not a subclass
    except UserError:
        return str(text)


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def cards_dir() -> Path:
    """The project's methods/ folder of cards (next to the package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "methods"


def load_card(path: Path, registry: "Registry | None" = None, chain: tuple[Path, ...] = ()) -> MethodCard:
    """A card file; one with `base:` is a variant of the named card (or of a card file
    relative to this one). `chain`: the cards whose bases are being loaded, to refuse a loop."""
    path = Path(path)
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(p.name for p in (*chain[chain.index(here):], here))
        raise UserError(f"the method cards' `base:` entries form a loop: {loop}", path=path,
                        hint="a card's base must lead to a card with an adapter")
    chain = (*chain, here)
    data = load_yaml(read_text(path), path)
    if not isinstance(data, dict):
        raise UserError("a method card is a mapping with name, adapter (or base), settings", path=path)
    data = {k: v for k, v in data.items() if v is not None}  # `version:` left empty: as if absent
    extra = sorted(map(str, set(data) - CARD_KEYS))
    if extra:
        raise UserError(f"method card has unknown key(s) {', '.join(extra)}", path=path,
                        hint=f"a card has: {', '.join(sorted(CARD_KEYS))}")
    _check_card_fields(data, path)
    settings = data.get("settings") or {}
    if "base" in data:
        if "adapter" in data:
            raise UserError("a variant card names its base, not an adapter", path=path,
                            hint="drop 'adapter' (it comes from the base card)")
        base_ref = data["base"]
        rel = path.parent / base_ref
        parent = load_card(rel, registry, chain) if rel.suffix in (".yaml", ".yml") and rel.is_file() else \
            (registry or default_registry()).named(base_ref, chain)
        card = dataclasses.replace(
            parent.with_settings(settings, source=f"card {path.name}"),
            tiny={**parent.tiny, **(data.get("tiny") or {})},
            base=parent.base or parent.name,
            path=str(path),
            description=(data.get("description") or parent.description).strip(),
        )
        return dataclasses.replace(card, name=data.get("name") or card.name)
    missing = [k for k in ("name", "adapter") if k not in data]
    if missing:
        raise UserError(f"method card lacks {', '.join(missing)}", path=path,
                        hint="a card names its adapter, or a `base:` card to vary")
    return MethodCard(
        name=data["name"],
        adapter=data["adapter"],
        layers=(Layer(f"card {path.name}", settings, False),) if settings else (),
        tiny=dict(data.get("tiny") or {}),
        version=data.get("version", 1),
        description=(data.get("description") or "").strip(),
        paper=data.get("paper"),
        path=str(path),
    )


def _check_card_fields(data: dict, path: Path) -> None:
    """Every card field's type in one place: text fields strings (the name one line and
    path-safe: it names the run folder), version a positive integer, settings and tiny
    mappings keyed by setting names."""
    for key in ("name", "base", "adapter", "description", "paper"):
        value = data.get(key)
        why = None if value is None else type_problem(value, (str,), one_line=key != "description")
        if why:
            raise UserError(f"{key} {why}", path=path, hint=None if isinstance(value, str) else QUOTE_HINT)
    adapter = data.get("adapter")
    if adapter is not None and not ADAPTER.fullmatch(adapter):
        raise UserError(f"adapter {adapter!r} must look like 'package.module:ClassName'", path=path)
    name = data.get("name")
    if name is not None and not CARD_NAME.fullmatch(name):
        raise UserError(f"card name {name!r} must start with a letter or digit, hold no '/' or '\\' and at most "
                        "100 characters (it names the run folder)", path=path)
    version = data.get("version", 1)
    if type_problem(version, (int,)) or version < 1:
        raise UserError(f"version must be a positive integer, got {show(version)}", path=path)
    for key in ("settings", "tiny"):
        value = data.get(key)
        if value is not None and not isinstance(value, dict):
            raise UserError(f"'{key}' must be a mapping of setting names to values, got {show(value)}", path=path)
        names = [k for k in value or {} if not isinstance(k, str)]
        if names:
            raise UserError(f"'{key}' has setting name(s) that are not strings: {show(names)}", path=path,
                            hint="quote them")


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

    def card(self, name_or_path: str, overrides: Mapping[str, Any] | None = None) -> MethodCard:
        """A card by registered name, or by path to a YAML file; `overrides` (--set) make a variant."""
        p = Path(name_or_path)
        card = load_card(p, self) if p.suffix in (".yaml", ".yml") and p.exists() else self.named(name_or_path)
        return card.with_settings(overrides or {})

    def named(self, name: str, chain: tuple[Path, ...] = ()) -> MethodCard:
        """The card registered as `name` (`chain`: see load_card)."""
        paths = self._scan()
        if name not in paths:
            close = difflib.get_close_matches(name, list(paths), n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "pass a card name or a card file path"
            raise UserError(f"unknown method {name!r} (known: {', '.join(sorted(paths)) or 'none'})", hint=hint)
        card = load_card(paths[name], self, chain)
        if card.name != name:
            raise UserError(f"card is registered as {name!r} but is named {card.name!r}", path=card.path)
        return card


def default_registry() -> Registry:
    return Registry()
