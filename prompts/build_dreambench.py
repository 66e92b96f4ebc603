"""Build prompts/dreambench.yaml from DreamBooth's prompts_and_classes.txt.

    python prompts/build_dreambench.py [--src FILE] [--out FILE]

The original file (google/dreambooth, dataset/prompts_and_classes.txt) holds the
subject -> class table and two lists of 25 prompt templates ('a {0} {1} in the jungle',
{0} = unique token, {1} = class), one for objects and one for live subjects (the cats and
dogs). Every subject gets every template of its kind: 30 x 25 = 750 single cases, the prompt
being the template with the unique token dropped and the class noun in its place (methods
insert their own identifier before the class noun). Nothing else is added or changed.

Each case: id `db-<subject>-<NN>` (NN: template index 00-24), one central box
[0.1, 0.1, 0.9, 0.9] (DreamBench has no layout; a large centred box lets layout-conditioned
methods run without favouring a position), a seed derived from the id (stable_seed).
No predicates: the prompts have no relations, and the file says so (`predicates: none`), so the
scorer leaves CLIP-R empty instead of extracting verbs such as "wearing".
The output is deterministic: re-running it gives the same bytes.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SRC = REPO.parent / "shared" / "data" / "dreambench" / "prompts_and_classes.txt"
DEFAULT_OUT = REPO / "prompts" / "dreambench.yaml"

# The live subjects (pets) use the live prompt list; everything else the object list.
LIVE_SUBJECTS = ("cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8")
CENTRAL_BOX = [0.1, 0.1, 0.9, 0.9]
N_TEMPLATES = 25


def stable_seed(case_id: str) -> int:
    """A seed in [0, 2**31) from the case id: the same on every machine and version."""
    return int.from_bytes(hashlib.sha256(case_id.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def parse_prompts_and_classes(text: str, source: str = "prompts_and_classes.txt") -> tuple[dict, dict]:
    """(subject -> class, {"object": [25 templates], "live": [25 templates]}) from the file."""
    classes_part, sep, prompts_part = text.partition("\nPrompts")
    if not sep:
        raise SystemExit(f"{source}: no 'Prompts' section")
    classes: dict[str, str] = {}
    for line in classes_part.splitlines():
        line = line.strip()
        if not line or line in ("Classes", "subject_name,class"):
            continue
        name, comma, cls = line.partition(",")
        if not comma:
            raise SystemExit(f"{source}: expected 'subject,class', got {line!r}")
        classes[name.strip()] = cls.strip()
    object_part, sep, live_part = prompts_part.partition("Live Subject Prompts")
    if not sep:
        raise SystemExit(f"{source}: no 'Live Subject Prompts' section")
    templates = {"object": _templates(object_part, source), "live": _templates(live_part, source)}
    for kind, items in templates.items():
        if len(items) != N_TEMPLATES:
            raise SystemExit(f"{source}: {len(items)} {kind} templates, expected {N_TEMPLATES}")
    return classes, templates


def _templates(part: str, source: str) -> list[str]:
    # each line: 'a {0} {1} in the jungle'.format(unique_token, class_token),
    found = re.findall(r"""^\s*('[^'\n]*'|"[^"\n]*")\.format\(unique_token, class_token\)""", part, re.M)
    out = []
    for literal in found:
        template = ast.literal_eval(literal)
        if template.count("{0} {1}") != 1:
            raise SystemExit(f"{source}: template {template!r} lacks '{{0}} {{1}}'")
        out.append(template)
    return out


def build_suite(classes: dict[str, str], templates: dict[str, list[str]]) -> dict:
    unknown_live = [s for s in LIVE_SUBJECTS if s not in classes]
    if unknown_live:
        raise SystemExit(f"live subjects not in the class table: {unknown_live}")
    subjects = {
        name: {"class": cls, "source": "dreambench", "dir": name, "category": "live" if name in LIVE_SUBJECTS else "object"}
        for name, cls in classes.items()
    }
    cases = []
    for name, spec in subjects.items():
        for i, template in enumerate(templates[spec["category"]]):
            case_id = f"db-{name}-{i:02d}"
            cases.append(
                {
                    "id": case_id,
                    "kind": "single",
                    "subjects": [name],
                    "prompt": template.replace("{0} {1}", "{1}").format(None, spec["class"]),
                    "boxes": [CENTRAL_BOX],
                    "seed": stable_seed(case_id),
                }
            )
    return {
        "suite": "dreambench",
        "version": 1,
        "images_per_case": 4,  # the DreamBooth protocol: 4 images per subject and prompt (3,000)
        "description": (
            "DreamBench (DreamBooth, Ruiz et al., CVPR 2023): 30 subjects x their 25 prompt templates"
            " (object or live) = 750 single-subject cases, exactly as dataset/prompts_and_classes.txt"
            " defines them, the unique token dropped. No relations; one central box per case."
        ),
        "predicates": "none",  # no prompt has a relation: CLIP-R stays empty, nothing is extracted
        "license": (
            "Subject images: CC BY 4.0 (google/dreambooth dataset/, per-image sources in"
            " references_and_licenses.txt). Prompts: the DreamBooth paper's dataset"
            " (dataset/prompts_and_classes.txt)."
        ),
        "subjects": subjects,
        "cases": cases,
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a licence text) as literal blocks."""


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None
    ),
)


def dump_suite(suite: dict, header: str) -> str:
    """Suite YAML: `header` as comments, metadata and subjects in block style, one case a line."""
    head = {k: v for k, v in suite.items() if k not in ("subjects", "cases")}
    seeds = [c["seed"] for c in suite["cases"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit("two cases got the same seed; change stable_seed")
    flow = dict(default_flow_style=True, sort_keys=False, width=10**6, allow_unicode=True)
    lines = ["# " + line if line else "#" for line in header.strip("\n").splitlines()]
    lines.append(yaml.dump(head, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True).rstrip("\n"))
    lines.append("subjects:")
    for name, spec in suite["subjects"].items():
        lines.append(f"  {yaml.safe_dump({name: spec}, **flow).strip()[1:-1]}")
    lines.append("cases:")
    for case in suite["cases"]:
        lines.append(f"  - {yaml.safe_dump(case, **flow).strip()}")
    return "\n".join(lines) + "\n"


def write_validated(text: str, out: Path) -> None:
    """Parse `text` with the project's suite loader (raises on any problem), then write it."""
    sys.path.insert(0, str(REPO))
    from relationbench.suites import parse_suite

    parse_suite(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)), out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


HEADER = """\
DreamBench suite, generated by prompts/build_dreambench.py from
google/dreambooth dataset/prompts_and_classes.txt: do not edit by hand, re-run the script.
Subject images (relbench data fetch dreambench): CC BY 4.0, see the dataset's
references_and_licenses.txt for per-image sources.
Boxes: one central box [0.1, 0.1, 0.9, 0.9] per case (DreamBench defines no layout).
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="prompts_and_classes.txt (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="suite file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.src.is_file():
        parser.error(f"{args.src}: no such file (pass --src, the DreamBooth dataset's prompts_and_classes.txt)")
    classes, templates = parse_prompts_and_classes(args.src.read_text(encoding="utf-8"), str(args.src))
    suite = build_suite(classes, templates)
    write_validated(dump_suite(suite, HEADER), args.out)
    print(f"wrote {args.out}: {len(suite['cases'])} cases, {len(suite['subjects'])} subjects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
