"""Build prompts/customconcept101-multi.yaml from CustomConcept101's multi-concept benchmark.

    python prompts/build_customconcept101.py [--src DIR] [--out FILE]

DIR is adobe-research/custom-diffusion's `customconcept101/` folder: dataset.json (101
concepts), dataset_multiconcept.json (101 concept pairs, each naming a composition prompt
file) and prompts/*.txt (12 prompts per composition file, {0} and {1} standing for the first
and second concept). Every pair gets every prompt of its file: 101 x 12 = 1212 multi cases.

- Subject = concept folder (the basename of instance_data_dir); class noun = the text after
  "<new1> " in the concept's instance_prompt in dataset.json, looked up by folder. The pair
  file's own labels are not used (upstream it calls furniture_chair3 a "sofa").
- Prompt = the composition prompt with {0}/{1} replaced by the two class nouns, surrounding
  whitespace stripped; a few upstream typos are fixed (PROMPT_FIXES, each with its reason).
- Case id `cc-<NNN>-<NN>`: NNN = the pair's 0-based index in dataset_multiconcept.json, NN =
  the prompt's 0-based line in its file. Boxes: two side-by-side boxes
  [[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]], first concept left (CustomConcept101 has no
  layout). Seed: stable_seed(id), as for DreamBench.
- Predicate (CLIP-R's relation phrase): extracted here, once, with spaCy's English model
  (relationbench.suites.predicates, backend "model"; the rule-based fallback differs on 26 of
  these prompts, so the script refuses to run without the model). Stored where the prompt has
  one; the suite's `predicates:` names the model, so a case without one has no relation.

The result is a derivative of Adobe Research-licensed material: the file carries the notice
(noncommercial research use only) in its `license:` field and in its header comment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_dreambench import REPO, dump_suite, stable_seed, write_validated  # noqa: E402

sys.path.insert(0, str(REPO))
from relationbench.errors import UserError  # noqa: E402
from relationbench.suites.predicates import extract_predicate, predicate_backend  # noqa: E402

DEFAULT_SRC = REPO.parent / "shared" / "data" / "customconcept101"
DEFAULT_OUT = REPO / "prompts" / "customconcept101-multi.yaml"
PAIR_BOXES = [[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]]
PROMPTS_PER_FILE = 12

# (prompt file, upstream line) -> (fixed line, why). Every prompt must name both concepts.
PROMPT_FIXES = {
    ("prompts/scene_pet.txt", "A photo of {0} at dawn with {0} sleeping peacefully."): (
        "A photo of {0} at dawn with {1} sleeping peacefully.",
        "upstream names the scene {0} twice and never the pet {1}; in every other line of this"
        " file {0} is the scene and {1} the pet, so the second {0} is read as {1}",
    ),
}


def concept_classes(dataset: list[dict]) -> dict[str, str]:
    """Concept folder -> class noun, from dataset.json's instance prompts."""
    out = {}
    for entry in dataset:
        folder = PurePosixPath(entry["instance_data_dir"]).name
        prompt = entry["instance_prompt"]
        marker = "<new1> "
        if marker not in prompt:
            raise SystemExit(f"dataset.json: {folder}: instance_prompt {prompt!r} lacks {marker!r}")
        out[folder] = prompt.split(marker, 1)[1].strip()
    return out


def read_prompts(src: Path, filename: str) -> list[str]:
    lines = [line.strip() for line in (src / filename).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) != PROMPTS_PER_FILE:
        raise SystemExit(f"{src / filename}: {len(lines)} prompts, expected {PROMPTS_PER_FILE}")
    out = []
    for line in lines:
        line = PROMPT_FIXES.get((filename, line), (line,))[0]
        if "{0}" not in line or "{1}" not in line:
            raise SystemExit(f"{src / filename}: prompt {line!r} does not name both concepts; add a fix to PROMPT_FIXES")
        out.append(line)
    return out


def build_suite(src: Path, license_text: str) -> dict:
    """The suite as a dict, its predicates extracted with spaCy's English model (UserError
    without one), which `predicates:` names."""
    model = predicate_backend("model")
    classes = concept_classes(json.loads((src / "dataset.json").read_text(encoding="utf-8")))
    pairs = json.loads((src / "dataset_multiconcept.json").read_text(encoding="utf-8"))
    subjects: dict[str, dict] = {}
    cases = []
    for p, pair in enumerate(pairs):
        concepts = [c for c in pair if "instance_data_dir" in c]
        compose = [c["prompt_filename_compose"] for c in pair if "prompt_filename_compose" in c]
        if len(concepts) != 2 or len(compose) != 1:
            raise SystemExit(f"dataset_multiconcept.json: pair {p} is not two concepts and one prompt file")
        names = [PurePosixPath(c["instance_data_dir"]).name for c in concepts]
        for name in names:
            if name not in classes:
                raise SystemExit(f"dataset_multiconcept.json: pair {p}: {name} not in dataset.json")
            subjects.setdefault(
                name,
                {"class": classes[name], "source": "customconcept101", "dir": name, "category": name.split("_")[0]},
            )
        nouns = [classes[n] for n in names]
        for i, template in enumerate(read_prompts(src, compose[0])):
            case_id = f"cc-{p:03d}-{i:02d}"
            prompt = template.replace("{0}", nouns[0]).replace("{1}", nouns[1])
            predicate = extract_predicate(prompt, nouns, backend="model")
            cases.append(
                {
                    "id": case_id,
                    "kind": "multi",
                    "subjects": names,
                    "prompt": prompt,
                    **({"predicate": predicate} if predicate else {}),
                    "boxes": PAIR_BOXES,
                    "seed": stable_seed(case_id),
                }
            )
    return {
        "suite": "customconcept101-multi",
        "version": 2,  # 2: multi-word predicates kept whole ("stepping out of")
        "description": (
            "CustomConcept101 multi-concept benchmark (Custom Diffusion, Kumari et al., CVPR 2023):"
            f" {len(pairs)} concept pairs x the 12 prompts of their composition file = {len(cases)} cases,"
            " {0}/{1} filled with the concepts' class nouns. Two side-by-side boxes per case."
            " Noncommercial research use only (Adobe Research License)."
        ),
        "predicates": model,
        "license": license_text,
        "subjects": dict(sorted(subjects.items())),
        "cases": cases,
    }


def license_notice(src: Path) -> str:
    text = (src / "LICENSE.md").read_text(encoding="utf-8")
    if "ADOBE RESEARCH LICENSE" not in text:
        raise SystemExit(f"{src / 'LICENSE.md'}: not the Adobe Research License")
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return (
        "Derived from CustomConcept101 (adobe-research/custom-diffusion, customconcept101/):"
        " noncommercial research use only. Concept images: Unsplash License / CC BY-SA 4.0 /"
        " per-image sources (upstream README).\n\n" + "\n".join(lines) + "\n"
    )


HEADER = """\
CustomConcept101 multi-concept suite, generated by prompts/build_customconcept101.py from
adobe-research/custom-diffusion customconcept101/ (dataset.json, dataset_multiconcept.json,
prompts/): do not edit by hand, re-run the script. Predicates: extracted by the script with
the spaCy model named in `predicates:`; a case without one has no relation.

NONCOMMERCIAL RESEARCH USE ONLY. This file is a derivative of material under the Adobe
Research License; the full notice (copyright, conditions, disclaimer) is in `license:` below
and must stay with every copy or derivative of this file.
Copyright 2022, Adobe Inc. and its licensors. All rights reserved.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="customconcept101/ folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="suite file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    for need in ("dataset.json", "dataset_multiconcept.json", "LICENSE.md", "prompts"):
        if not (args.src / need).exists():
            parser.error(f"{args.src / need}: missing (pass --src, custom-diffusion's customconcept101/ folder)")
    try:
        suite = build_suite(args.src, license_notice(args.src))
    except UserError as exc:
        parser.error(f"the predicates are extracted with spaCy's English model: {exc.render()}")
    write_validated(dump_suite(suite, HEADER), args.out)
    print(f"wrote {args.out}: {len(suite['cases'])} cases, {len(suite['subjects'])} subjects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
