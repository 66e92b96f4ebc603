"""The RelationBooth authors' inference config (REFERENCE 7) as a one-case suite.

Their `inference.py --config FILE` reads a YAML file like

    lora_weights: lora-weights/hug/pytorch_lora_weights.safetensors
    class_names: [cat, plushie bear]                    # one per subject
    prompt: A cat is hugging with a plushie bear.
    images_path: [assets/cat.jpg, assets/bear.jpg]      # one reference image per subject
    boxes: [[[0.0, 0.2, 0.55, 0.85], [0.55, 0.26, 0.95, 0.9]]]   # normalized xyxy (a batch of one)
    phrases: [[cat, plushie bear]]                      # grounding phrases, one per box

`relbench prompts import FILE` turns it into a suite of one case: a subject per class name
(named after it, its class noun the class name), its reference image the given file (a
subject named by path), the prompt, the boxes (a flat list of boxes is accepted too), the
predicate extracted from the prompt with spaCy's English model (marked `predicate_source:` for
review, as every extracted predicate) and the relation its base verb (predicates.base_verb),
the seed 42 of their script unless the config gives one. Relative paths are relative to
`image_root`, by default the config file's folder (their script reads them relative to the
folder it runs in, their repo root: pass that). What a suite has no place for becomes a note
for the user: `lora_weights` (relationbench takes LoRAs from its bank: `relbench lora import`),
`scale` and `steps` (method settings: `--set`), phrases other than the class names
(relationbench grounds each subject by its class noun).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..userfiles import load_data, load_json, read_text, show
from .loader import KINDS, check_fields, check_suite_name, parse_boxes, parse_suite
from .predicates import base_verb, extract_predicate, predicate_backend

# their keys, and the script options a config may carry (their inference.py's command line)
FIELDS = {"lora_weights": (str,), "class_names": (list,), "prompt": (str,), "images_path": (list,),
          "boxes": (list,), "phrases": (list,), "seed": (int,), "scale": (int, float), "steps": (int,),
          "num_inference_steps": (int,)}
REQUIRED = ("class_names", "prompt", "images_path", "boxes")
SEED = 42  # their inference.py's default --seed (REFERENCE 7)
SETTINGS = {"scale": "scale", "steps": "steps", "num_inference_steps": "steps"}  # key -> card setting


def is_authors_config(path: Path) -> bool:
    """Whether `relbench prompts import` reads `path` as an authors' config: a YAML file (case
    lists are JSON, JSONL or CSV), or a JSON file whose top level is a mapping with
    `class_names` (a case list's is a list, or {"cases": [...]})."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return True
    if suffix != ".json":
        return False
    try:
        data = load_json(read_text(path), path)
    except UserError:  # JSONL, or broken: the case-list reader says what is wrong
        return False
    return isinstance(data, dict) and "class_names" in data


def import_authors_config(path: Path, out: Path, name: str,
                          image_root: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the suite file's data, notes for the user) for the config at `path`, validated as the
    suite `name` that will be written to `out` (its image paths are written relative to `out`'s
    folder when under it, else absolute)."""
    check_suite_name(name)

    def fail(msg: str, hint: str | None = None) -> UserError:
        return UserError(msg, path=path, hint=hint)

    raw = load_data(path)
    if not isinstance(raw, dict):
        raise fail(f"expected the authors' inference config, a mapping with keys {', '.join(REQUIRED)}")
    check_fields(raw, FIELDS, REQUIRED, fail)
    classes, prompt = raw["class_names"], raw["prompt"]
    if not all(isinstance(c, str) and c.strip() for c in classes):
        raise fail(f"class_names must be a list of class names, got {show(classes)}")
    if len(classes) not in KINDS.values():
        raise fail(f"class_names: a relationbench case has 1 or 2 subjects, this config has {len(classes)}",
                   hint="split it into configs of one or two subjects")
    root = (path.parent if image_root is None else Path(image_root)).resolve()
    images = _images(raw["images_path"], classes, root, fail)
    boxes = _unbatched(raw["boxes"], list)
    if len(boxes) != len(classes):
        raise fail(f"boxes: {len(boxes)} box(es) for {len(classes)} class_names {show(classes)}",
                   hint="one normalized [x0, y0, x1, y1] box per class name, in their order")
    parse_boxes(boxes, len(classes), lambda msg, hint=None: fail(f"boxes: {msg}", hint))
    predicate = extract_predicate(prompt, classes, backend="model")
    if predicate is None:
        raise fail(f"no relation predicate found in the prompt {prompt!r}",
                   hint="name the relation with a verb, e.g. 'a cat hugging a plushie bear'")
    extractor = predicate_backend("model")
    relation = base_verb(predicate, backend="model")
    names = _subject_names(classes)
    folder = out.resolve().parent
    lora = raw.get("lora_weights")
    lora_path = os.path.normpath(root / Path(lora).expanduser()) if lora else None
    data = {
        "suite": name,
        "version": 1,
        "description": f"Imported from {path.name}, a RelationBooth authors' inference config, with "
                       f"`relbench prompts import`" + (f"; its LoRA: {lora_path}." if lora_path else "."),
        "predicates": extractor,
        "subjects": {n: {"class": c, "images": [_written(p, folder)]} for n, c, p in zip(names, classes, images)},
        "cases": [{
            "id": f"{name}-0000",
            "kind": "single" if len(classes) == 1 else "multi",
            "subjects": names,
            "prompt": prompt,
            "predicate": predicate,
            "predicate_source": extractor,
            "relation": relation,
            "boxes": [list(b) for b in boxes],
            "seed": raw["seed"] if raw.get("seed") is not None else SEED,
        }],
    }
    parse_suite(data, path, base=folder)  # the checks of any suite (class nouns in the prompt...)
    return data, _notes(raw, classes, relation, lora_path)


def _images(raw: list, classes: list[str], root: Path, fail) -> list[Path]:
    """The reference image of each class name, resolved against `root`; each must be a file."""
    if len(raw) != len(classes) or not all(isinstance(p, str) and p.strip() for p in raw):
        raise fail(f"images_path must list one image file per class name ({len(classes)}), got {show(raw)}")
    out = []
    for i, (given, cls) in enumerate(zip(raw, classes)):
        path = Path(os.path.normpath(root / Path(given).expanduser()))
        if not path.is_file():
            raise fail(f"images_path[{i}] ({cls!r}): no image file {path}",
                       hint="relative paths are relative to the config file's folder, or to --image-root DIR "
                            "(the authors' code reads them relative to the folder it runs in)")
        out.append(path)
    return out


def _unbatched(values: list, item: type) -> list:
    """Their boxes and phrases are a batch of one list ([[box, box]], [[cat, bear]]): the list;
    a flat one ([box, box]) as it is. `item`: the type of the list's items (list, str)."""
    if len(values) == 1 and isinstance(values[0], list) and values[0] and all(isinstance(v, item) for v in values[0]):
        return values[0]
    return values


def _subject_names(classes: list[str]) -> list[str]:
    """A subject name per class name: its words joined by '_', numbered when repeated."""
    names: list[str] = []
    for cls in classes:
        base = re.sub(r"\W+", "_", cls.strip()).strip("_") or "subject"
        n, name = 1, base
        while name in names:
            n += 1
            name = f"{base}_{n}"
        names.append(name)
    return names


def _written(path: Path, folder: Path) -> str:
    """An image path as the suite at `folder` writes it: relative when under it, else absolute."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def _notes(raw: dict, classes: list[str], relation: str, lora_path: str | None) -> list[str]:
    """What the suite does not hold, and where it goes instead."""
    notes = []
    if lora_path:
        notes.append(f"lora_weights: relationbench takes LoRAs from its bank; add this one with "
                     f"`relbench lora import {shlex.quote(lora_path)} --relation {shlex.quote(relation)}`")
    for key, setting in SETTINGS.items():
        if raw.get(key) is not None:
            notes.append(f"{key}: {raw[key]} is a method setting, not part of a suite: pass "
                         f"`--set {setting}={raw[key]}` to `relbench generate`")
    phrases = _unbatched(raw.get("phrases") or [], str)
    if phrases and phrases != classes:
        notes.append(f"phrases {show(phrases)} not used: relationbench grounds each subject by its class name "
                     f"{show(classes)}")
    return notes
