"""Reading the files users write (suites, method cards, case lists): text, YAML, JSON.

Every malformed file becomes one UserError naming it, never another exception, and never a
silent change: bytes that are not UTF-8 (a UTF-8 BOM is dropped), YAML nested deeper than
libyaml's composer survives (past ~20k levels it crashes the process), aliases that expand
to a "billion laughs" or refer to themselves, duplicate keys (YAML and JSON would keep the
last one), JSON's NaN and Infinity, numbers Python cannot hold. `text_problem` is the one
check of strings that end up in files and prompts, `type_problem` the one check of a field.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import reprlib
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

MAX_DEPTH = 64  # nesting levels of a YAML file; a suite needs 5
MAX_VALUES = 1_000_000  # values of a YAML file with every alias expanded; the largest suite has 32k
# control characters (Unicode category Cc: NUL, tab, newline, ...) and the two other line breaks
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a mapping"}
QUOTE_HINT = "quote it: YAML reads 007, 1.0, yes, null as numbers, booleans or nothing"
# libyaml's safe loader parses the 1212-case suite in 0.1 s instead of 1.5 s
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


class _UniqueKeyLoader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """The safe loader, refusing a mapping that repeats a key (merge keys `<<` may override)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # unhashable: the base class refuses it with its own message
                    continue
                if repeated:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"found duplicate key {show(key)}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_text(path: Path) -> str:
    """A file's text, decoded as UTF-8 (a leading BOM dropped)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the file ({exc.strerror or exc})", path=path) from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise UserError("the file is UTF-16 (or UTF-32) text", path=path, hint="save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 text: byte {data[exc.start]:#04x} on line {line}", path=path,
                        hint="save the file as UTF-8") from None


def load_yaml(text: str, path: Path | str | None) -> Any:
    """YAML text (JSON too) as plain data, refusing deep nesting, alias bombs and repeated keys."""
    try:
        _check_shape(text, path)
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML: {exc}", path=path) from None
    except (ValueError, OverflowError, LookupError, AttributeError) as exc:
        # the safe constructor's failures on odd scalars: a 5000-digit integer, a 13th month,
        # `!!bool maybe` (KeyError), `!!int ''` (IndexError), `!!timestamp x` (AttributeError)
        raise UserError(f"not valid YAML: {exc!r}", path=path) from None


def load_json(text: str, path: Path | str | None) -> Any:
    """JSON text as plain data, refusing NaN/Infinity, numbers beyond float and repeated keys."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant,
                          parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise UserError(f"not valid JSON: {exc}", path=path) from None
    except (ValueError, RecursionError) as exc:  # from the hooks; a 5000-digit integer; nesting
        raise UserError(f"not valid JSON: {exc or 'nested too deep'}", path=path) from None


def load_data(path: Path) -> Any:
    """A .json file read as JSON, anything else as YAML (JSON read as YAML would turn
    "\\ud83d\\ude00" into two lone surrogates instead of one emoji)."""
    text = read_text(path)
    return load_json(text, path) if Path(path).suffix.lower() == ".json" else load_yaml(text, path)


def text_problem(value: str, *, one_line: bool = True) -> str | None:
    """Why `value` cannot stand in a prompt or a file name (None when it can): a lone
    surrogate (not writable as UTF-8) or, in a one-line field, a control character or line
    break (a tab or newline in a prompt or name is a pasting accident nobody can see)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds {ord(value[exc.start]):#06x}, a lone surrogate that is not valid Unicode text"
    control = CONTROL_CHARS.search(value) if one_line else None
    if control:
        return f"holds {control.group()!r} (U+{ord(control.group()):04X}), a control character or line break"
    return None


def type_problem(value: Any, kinds: tuple[type, ...], *, one_line: bool = True) -> str | None:
    """Why `value` cannot stand in a field of type `kinds` (None when it can): another type
    (a bool is never a number: YAML reads `yes` as one; a tuple passes for a list), or a
    string with a text_problem."""
    if isinstance(value, bool) or not isinstance(value, kinds + ((tuple,) if list in kinds else ())):
        return f"must be {' or '.join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)}, got {show(value)}"
    return text_problem(value, one_line=one_line) if isinstance(value, str) else None


def show(value: Any) -> str:
    """A short repr of a value of unknown shape, for error messages."""
    return _REPR.repr(value)


def _check_shape(text: str, path: Path | str | None) -> None:
    """Refuse nesting past MAX_DEPTH and more than MAX_VALUES values with aliases expanded,
    from libyaml's event stream (iterative: nothing is built, a bomb stops early)."""
    open_: list[list] = []  # [values so far, anchor] of each open collection
    sizes: dict[str, int] = {}  # expanded size of each anchored node
    root = [0, None]
    for event in yaml.parse(text, Loader=_BASE_LOADER):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_) >= MAX_DEPTH:
                raise UserError(f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})", path=path)
            open_.append([1, event.anchor])
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            n, anchor = open_.pop()
            if anchor is not None:
                sizes[anchor] = n
        elif isinstance(event, yaml.ScalarEvent):
            n = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for _, anchor in open_):
                raise UserError(f"alias *{event.anchor} refers to a value that contains it "
                                f"(line {event.start_mark.line + 1})", path=path)
            n = sizes.get(event.anchor, 1)  # an undefined alias: the loader names it
        else:
            continue
        parent = open_[-1] if open_ else root
        parent[0] += n
        if parent[0] > MAX_VALUES:
            raise UserError(f"expands to more than {MAX_VALUES:,} values (its aliases repeat too much)", path=path,
                            hint="write the values out, or use fewer nested aliases")


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {show(key)}")
        out[key] = value
    return out


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a float")
    return value
