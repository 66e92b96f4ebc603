"""Build prompts/relationbench.yaml, our reconstruction of the RelationBench suite.

The RelationBooth paper (Sec. 5, App. 6.2) describes RelationBench as 44 objects from DreamBench
and CustomConcept101 (pets, plushies, toys, people, cartoons), 25 predicate relations and 100
single-object plus 100 multi-object cases; the authors' file is not reachable from here. This
script rebuilds a suite with the same counts from curated data and a deterministic pairing:

* SUBJECTS: the 44 objects, each with a class noun that reads naturally in a prompt, and traits
  saying what it can physically do (has hands, is small enough to be carried or to ride a dog).
* RELATIONS: the 25 relations, each with how many single and multi cases it gets, which subjects
  may act (agents), which subjects may be acted on (multi) or which scene objects fit (single),
  and a box layout.
* The pairing fills the cases relation by relation in round-robin order. Each slot takes the
  eligible subject whose class noun is least used in that role of that relation (variety: not
  five times "a cat riding a dog"), then the least-used subject overall (an even spread), then
  the first in registry order; a multi pair is never repeated. Every pairing obeys the
  relation's rules, and nothing is random: the same tables give the same file.

Run from the repository root:  python prompts/build_relationbench.py [--out PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_OUT = Path(__file__).resolve().parent / "relationbench.yaml"

DESCRIPTION = (
    "RelationBench, reconstructed. The RelationBooth paper (Shi et al., Sec. 5 and App. 6.2) "
    "describes 44 objects from DreamBench and CustomConcept101 in five categories (pets, "
    "plushies, toys, people, cartoons), 25 predicate relations that need a pose change, and "
    "100 single-object and 100 multi-object cases written with GPT-4; the authors' file is not "
    "reachable, so this "
    "suite has the same counts but its own objects, relations, prompts and boxes. Built by "
    "prompts/build_relationbench.py from curated subject and relation tables with a "
    "deterministic least-used pairing (see prompts/README.md); do not edit by hand."
)

LICENSE = (
    "Subject images: DreamBench subjects (source: dreambench) are CC BY 4.0 (Ruiz et al., "
    "DreamBooth); CustomConcept101 subjects (source: customconcept101) are under the Adobe "
    "Research License, noncommercial research use only (Kumari et al., Custom Diffusion). The "
    "prompts, relations and boxes of this file are ours and follow the project's license."
)


@dataclass(frozen=True)
class SubjectSpec:
    name: str  # folder name, also the subject's name in the suite
    class_noun: str
    source: str
    category: str
    hands: bool  # can grasp, wave, shake hands
    small: bool  # can be carried or held by a person, can ride on a dog


def _s(name, class_noun, source, category, *, hands=False, small=True):
    return SubjectSpec(name, class_noun, source, category, hands, small)


DB, CC = "dreambench", "customconcept101"

# The 44 objects. Only subjects that can act: DreamBench's inanimate objects (sneakers, vases,
# rc_car, poop_emoji...) are left out. CustomConcept101's three people have the class "person"
# (their gender is not recorded in the dataset), the action figures keep the dataset's class.
SUBJECTS: tuple[SubjectSpec, ...] = (
    # pets: DreamBench's 9 live subjects and 9 CustomConcept101 pets
    _s("cat", "cat", DB, "pets"),
    _s("cat2", "cat", DB, "pets"),
    _s("dog", "dog", DB, "pets", small=False),
    _s("dog2", "dog", DB, "pets", small=False),
    _s("dog3", "dog", DB, "pets", small=False),
    _s("dog5", "dog", DB, "pets", small=False),
    _s("dog6", "dog", DB, "pets", small=False),
    _s("dog7", "dog", DB, "pets", small=False),
    _s("dog8", "dog", DB, "pets", small=False),
    _s("pet_cat1", "cat", CC, "pets"),
    _s("pet_cat2", "cat", CC, "pets"),
    _s("pet_cat3", "cat", CC, "pets"),
    _s("pet_cat4", "cat", CC, "pets"),
    _s("pet_cat5", "cat", CC, "pets"),
    _s("pet_dog1", "dog", CC, "pets", small=False),
    _s("pet_dog2", "dog", CC, "pets", small=False),
    _s("pet_dog3", "dog", CC, "pets", small=False),
    _s("pet_dog4", "dog", CC, "pets", small=False),
    # plushies
    _s("bear_plushie", "bear plushie", DB, "plushies", hands=True),
    _s("grey_sloth_plushie", "sloth plushie", DB, "plushies", hands=True),
    _s("wolf_plushie", "wolf plushie", DB, "plushies", hands=True),
    _s("plushie_panda", "panda plushie", CC, "plushies", hands=True),
    _s("plushie_teddybear", "teddy bear", CC, "plushies", hands=True),
    _s("plushie_bunny", "bunny plushie", CC, "plushies", hands=True),
    _s("plushie_cow", "cow plushie", CC, "plushies", hands=True),
    _s("plushie_penguin", "penguin plushie", CC, "plushies"),
    _s("plushie_tortoise", "tortoise plushie", CC, "plushies"),
    _s("plushie_lobster", "lobster plushie", CC, "plushies"),
    _s("plushie_unicorn", "unicorn plushie", CC, "plushies"),
    _s("plushie_2", "pokemon plushie", CC, "plushies", hands=True),
    # toys
    _s("duck_toy", "duck toy", DB, "toys"),
    _s("monster_toy", "monster toy", DB, "toys", hands=True),
    _s("robot_toy", "robot toy", DB, "toys", hands=True),
    _s("toy_bear", "toy bear", CC, "toys", hands=True),
    _s("toy_unicorn", "unicorn toy", CC, "toys"),
    _s("toy_gnome", "toy gnome", CC, "toys", hands=True),
    _s("actionfigure_1", "action figure", CC, "toys", hands=True),
    _s("actionfigure_2", "action figure", CC, "toys", hands=True),
    _s("actionfigure_3", "figurine", CC, "toys", hands=True),
    # people
    _s("person_1", "person", CC, "people", hands=True, small=False),
    _s("person_2", "person", CC, "people", hands=True, small=False),
    _s("person_3", "person", CC, "people", hands=True, small=False),
    # cartoons
    _s("red_cartoon", "cartoon character", DB, "cartoons", hands=True),
    _s("toy_pikachu1", "pikachu toy", CC, "cartoons", hands=True),
)


def _group(test) -> frozenset[str]:
    return frozenset(s.name for s in SUBJECTS if test(s))


CATS = _group(lambda s: s.class_noun == "cat")
DOGS = _group(lambda s: s.class_noun == "dog")
PETS = CATS | DOGS
PEOPLE = _group(lambda s: s.category == "people")
HANDS = _group(lambda s: s.hands)
FIGURES = _group(lambda s: s.hands and s.category in ("toys", "cartoons"))  # humanoid toys
TOYLIKE_HANDS = HANDS - PEOPLE  # toy-sized subjects with hands: plushies, figures, cartoons
PLUSHIES = _group(lambda s: s.category == "plushies")
SMALL = _group(lambda s: s.small)  # cats, plushies, toys, cartoons
SMALL_THINGS = SMALL - CATS  # plushies, toys, cartoons
ANY = _group(lambda s: True)


@dataclass(frozen=True)
class RelationSpec:
    """One relation: its forms, how many cases of each kind, who may do it to what.

    single: (agents, scene objects) rules; multi: (agents, patients) rules. A case takes the
    least-used agent allowed by any rule, then an object or patient from a rule that allows it.
    layout names the box rule (LAYOUTS).
    """

    verb: str
    ing: str
    n_single: int
    n_multi: int
    single: tuple[tuple[frozenset[str], tuple[str, ...]], ...]
    multi: tuple[tuple[frozenset[str], frozenset[str]], ...]
    layout: str


def _r(verb, ing, n_single, n_multi, layout, single=(), multi=()):
    return RelationSpec(verb, ing, n_single, n_multi, tuple(single), tuple(multi), layout)


# 25 relations that need a pose change and can be seen in one picture. 21 fit single cases
# (100 = 16 x 5 + 5 x 4), 20 fit multi cases (100 = 20 x 5).
RELATIONS: tuple[RelationSpec, ...] = (
    _r("hug", "hugging", 5, 5, "embrace",
       single=[(HANDS, ("a tree", "a big pillow", "a pumpkin", "a snowman")),
               (PETS, ("a big pillow", "a blanket"))],
       multi=[(PEOPLE, ANY), (TOYLIKE_HANDS | CATS, ANY - PEOPLE)]),
    _r("shake hands with", "shaking hands with", 0, 5, "touch",
       multi=[(PEOPLE, HANDS | DOGS), (TOYLIKE_HANDS, TOYLIKE_HANDS)]),
    _r("ride", "riding", 5, 5, "atop",
       single=[(PEOPLE | FIGURES, ("a bicycle", "a horse", "a motorcycle")),
               (PETS, ("a skateboard", "a surfboard")),
               (SMALL_THINGS, ("a toy train", "a rocking horse", "a skateboard"))],
       multi=[(SMALL, DOGS)]),
    _r("kiss", "kissing", 0, 5, "embrace",
       multi=[(PEOPLE | PETS | TOYLIKE_HANDS, PETS | SMALL_THINGS)]),
    _r("high-five", "high-fiving", 0, 5, "touch",
       multi=[(PEOPLE, HANDS | DOGS), (TOYLIKE_HANDS, TOYLIKE_HANDS), (DOGS, PEOPLE)]),
    _r("chase", "chasing", 5, 5, "apart",
       single=[(PETS, ("a red ball", "a butterfly", "a squirrel")),
               (PEOPLE | FIGURES, ("a butterfly", "a runaway balloon"))],
       multi=[(DOGS, CATS | SMALL_THINGS), (CATS, SMALL_THINGS), (PEOPLE, PETS)]),
    _r("carry", "carrying", 5, 5, "held",
       single=[(HANDS, ("a basket of apples", "a gift box", "a backpack")),
               (DOGS, ("a stick", "a newspaper"))],
       multi=[(PEOPLE, SMALL), (DOGS, SMALL_THINGS)]),
    _r("push", "pushing", 4, 5, "touch",
       single=[(HANDS, ("a shopping cart", "a wheelbarrow", "a toy car")),
               (PETS, ("a ball", "a toy car"))],
       multi=[(HANDS, SMALL_THINGS), (DOGS, SMALL_THINGS)]),
    _r("pull", "pulling", 4, 5, "touch",
       single=[(HANDS, ("a wagon", "a sled", "a rope")),
               (DOGS, ("a sled", "a wagon"))],
       multi=[(DOGS, PLUSHIES), (TOYLIKE_HANDS, SMALL_THINGS)]),
    _r("kick", "kicking", 5, 0, "center",
       single=[(PEOPLE | FIGURES | DOGS, ("a soccer ball", "a football", "a pile of leaves"))]),
    _r("throw", "throwing", 4, 0, "center",
       single=[(HANDS, ("a ball", "a frisbee", "a paper airplane", "a snowball"))]),
    _r("catch", "catching", 5, 0, "center",
       single=[(HANDS, ("a ball", "a frisbee")),
               (DOGS, ("a frisbee", "a tennis ball")),
               (CATS, ("a butterfly",))]),
    _r("climb", "climbing", 5, 0, "center",
       single=[(HANDS, ("a ladder", "a rock wall", "a tree")),
               (CATS, ("a tree", "a fence"))]),
    _r("lean on", "leaning on", 5, 5, "lean",
       single=[(ANY, ("a fence", "a tree", "a lamppost", "a wall"))],
       multi=[(ANY, ANY)]),
    _r("sit on", "sitting on", 5, 5, "atop",
       single=[(ANY, ("a bench", "a chair", "a sofa", "a swing"))],
       multi=[(SMALL, DOGS)]),
    _r("lie on", "lying on", 5, 5, "atop",
       single=[(PETS, ("a sofa", "a rug", "a bed")),
               (ANY - PETS, ("a hammock", "a beach towel", "a bed"))],
       multi=[(SMALL, DOGS)]),
    _r("feed", "feeding", 4, 5, "tend",
       single=[(PEOPLE, ("a horse", "a goat", "a lamb")), (FIGURES, ("a bird", "a rabbit"))],
       multi=[(PEOPLE, PETS), (TOYLIKE_HANDS, SMALL_THINGS)]),
    _r("pet", "petting", 4, 5, "tend",
       single=[(PEOPLE, ("a horse", "a goat", "a lamb", "a pony"))],
       multi=[(PEOPLE, PETS | PLUSHIES)]),
    _r("wave at", "waving at", 5, 5, "apart",
       single=[(HANDS, ("the camera", "a passing train", "a boat"))],
       multi=[(HANDS, ANY)]),
    _r("play with", "playing with", 5, 5, "touch",
       single=[(PETS, ("a ball of yarn", "a tennis ball", "a rope toy")),
               (HANDS, ("a kite", "a yo-yo", "building blocks"))],
       multi=[(ANY, ANY)]),
    _r("dance with", "dancing with", 0, 5, "embrace",
       multi=[(PEOPLE, HANDS | DOGS), (TOYLIKE_HANDS, TOYLIKE_HANDS)]),
    _r("hold", "holding", 5, 5, "held",
       single=[(HANDS, ("an umbrella", "a balloon", "a bouquet of flowers", "a lantern"))],
       multi=[(PEOPLE, SMALL), (TOYLIKE_HANDS, SMALL_THINGS)]),
    _r("jump over", "jumping over", 5, 5, "over",
       single=[(PETS, ("a fence", "a log", "a puddle")),
               (PEOPLE | FIGURES, ("a puddle", "a hurdle"))],
       multi=[(PETS, SMALL_THINGS)]),
    _r("read", "reading", 5, 0, "center",
       single=[(HANDS, ("a book", "a newspaper", "a map"))]),
    _r("lick", "licking", 5, 5, "embrace",
       single=[(PETS, ("an ice cream cone", "a spoon", "a bowl"))],
       multi=[(PETS, PEOPLE | PETS | SMALL_THINGS)]),
)

# Boxes, normalized xyxy. Single cases: one large central box, raised where the subject sits or
# rides on the scene object. Multi cases: (agent box, patient box) per layout.
SINGLE_BOXES = {
    "atop": (0.2, 0.05, 0.8, 0.7),
    "over": (0.2, 0.05, 0.8, 0.6),
}
SINGLE_DEFAULT = (0.15, 0.1, 0.85, 0.95)
MULTI_BOXES = {
    "embrace": ((0.1, 0.15, 0.6, 0.95), (0.4, 0.15, 0.9, 0.95)),  # hug, kiss, dance, lick: strong overlap
    "lean": ((0.08, 0.2, 0.55, 0.95), (0.45, 0.2, 0.92, 0.95)),  # leaning: clear overlap
    "touch": ((0.05, 0.2, 0.52, 0.95), (0.48, 0.2, 0.95, 0.95)),  # hands, paws meet: slight overlap
    "tend": ((0.05, 0.05, 0.55, 0.95), (0.45, 0.45, 0.95, 0.95)),  # petting, feeding: reach down
    "apart": ((0.02, 0.35, 0.42, 0.95), (0.58, 0.35, 0.98, 0.95)),  # chasing, waving: a gap
    "held": ((0.15, 0.05, 0.85, 0.95), (0.3, 0.3, 0.7, 0.7)),  # carried or held: inside the holder
    "atop": ((0.3, 0.05, 0.7, 0.55), (0.15, 0.4, 0.85, 0.95)),  # riding, sitting, lying on: above
    "over": ((0.2, 0.05, 0.8, 0.5), (0.3, 0.6, 0.7, 0.95)),  # jumping over: above, no contact
}

SPEC_BY_NAME = {s.name: s for s in SUBJECTS}


def article(phrase: str) -> str:
    """'a' or 'an' for a noun phrase ('an action figure', 'a unicorn toy')."""
    starts_vowel = phrase[0] in "aeiou" and not phrase.startswith(("uni", "use"))
    return "an" if starts_vowel else "a"


def case_seed(case_id: str) -> int:
    """A stable seed from the case id (first 4 bytes of its SHA-256), distinct per id."""
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "big")


def _ordered(names: frozenset[str]) -> list[str]:
    """The names in registry order (sets have none), so the build is deterministic."""
    return [s.name for s in SUBJECTS if s.name in names]


def _clash(a: str, b: str) -> bool:
    """True when two class nouns could not be told apart in one prompt."""
    na, nb = SPEC_BY_NAME[a].class_noun, SPEC_BY_NAME[b].class_noun
    return re.search(rf"\b{re.escape(na)}\b", nb) is not None or re.search(rf"\b{re.escape(nb)}\b", na) is not None


def build_cases() -> list[dict]:
    """The 200 cases: relations filled round-robin, each slot taking the best-ranked subjects.

    A subject's rank for a slot (lowest first): how often its class noun already fills this
    role in this relation and kind (so "a cat riding a dog" is not repeated), then how often
    the subject is used in the whole suite (even spread), then registry order.
    """
    usage = {s.name: 0 for s in SUBJECTS}
    role_use: Counter = Counter()  # (kind, verb, role, class noun) -> cases
    object_use: Counter = Counter()  # (verb, object) -> single cases
    pairs_seen: set[frozenset[str]] = set()
    made: dict[tuple[str, str], list[dict]] = {}

    def ranked(names, kind: str, verb: str, role: str) -> list[str]:
        """Best first; sorted() is stable, so ties keep registry order."""
        return sorted(names, key=lambda n: (role_use[kind, verb, role, SPEC_BY_NAME[n].class_noun], usage[n]))

    for kind in ("single", "multi"):
        count = {r.verb: (r.n_single if kind == "single" else r.n_multi) for r in RELATIONS}
        for round_ in range(max(count.values())):
            for rel in RELATIONS:
                if round_ >= count[rel.verb]:
                    continue
                rules = rel.single if kind == "single" else rel.multi
                agents = _ordered(frozenset().union(*(r[0] for r in rules)))
                if kind == "single":
                    agent = ranked(agents, kind, rel.verb, "agent")[0]
                    objects = dict.fromkeys(o for group, objs in rules if agent in group for o in objs)
                    obj = min(objects, key=lambda o: object_use[rel.verb, o])
                    object_use[rel.verb, obj] += 1
                    names, nouns = [agent], [SPEC_BY_NAME[agent].class_noun]
                    prompt = f"{article(nouns[0])} {nouns[0]} {rel.ing} {obj}"
                else:
                    for agent in ranked(agents, kind, rel.verb, "agent"):
                        patients = [
                            p
                            for p in _ordered(frozenset().union(*(g for a, g in rules if agent in a)))
                            if not _clash(agent, p) and frozenset((agent, p)) not in pairs_seen
                        ]
                        if patients:
                            break
                    else:
                        raise RuntimeError(f"no pairing left for {rel.verb!r}")
                    patient = ranked(patients, kind, rel.verb, "patient")[0]
                    pairs_seen.add(frozenset((agent, patient)))
                    names = [agent, patient]
                    nouns = [SPEC_BY_NAME[n].class_noun for n in names]
                    prompt = f"{article(nouns[0])} {nouns[0]} {rel.ing} {article(nouns[1])} {nouns[1]}"
                for role, name, noun in zip(("agent", "patient"), names, nouns):
                    usage[name] += 1
                    role_use[kind, rel.verb, role, noun] += 1
                boxes = (
                    [SINGLE_BOXES.get(rel.layout, SINGLE_DEFAULT)]
                    if kind == "single"
                    else list(MULTI_BOXES[rel.layout])
                )
                made.setdefault((kind, rel.verb), []).append(
                    {"kind": kind, "subjects": names, "prompt": prompt, "predicate": rel.ing,
                     "relation": rel.verb, "boxes": [[round(v, 3) for v in b] for b in boxes]}
                )

    cases = []
    for kind, prefix in (("single", "rb-s"), ("multi", "rb-m")):
        group = [c for rel in RELATIONS for c in made.get((kind, rel.verb), [])]
        for i, case in enumerate(group, 1):
            case_id = f"{prefix}-{i:03d}"
            cases.append({"id": case_id, **case, "seed": case_seed(case_id)})
    return cases


def _scalar(value) -> str:
    """A YAML scalar: plain where it reads back as the same string, else double-quoted."""
    if isinstance(value, str):
        plain = re.fullmatch(r"[a-z][a-z0-9 _.'-]*", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return json.dumps(value)


def _folded(key: str, text: str) -> str:
    body = textwrap.fill(text, width=96, initial_indent="  ", subsequent_indent="  ")
    return f"{key}: >-\n{body}\n"


def render(cases: list[dict]) -> str:
    """The suite file text: header, subject registry, relations, one block per case."""
    out = [
        "# Generated by prompts/build_relationbench.py; edit the script, not this file.\n",
        "suite: relationbench\n",
        "version: 1\n",
        _folded("description", DESCRIPTION),
        _folded("license", LICENSE),
        "subjects:\n",
    ]
    for s in SUBJECTS:
        out.append(
            f"  {s.name}: {{class: {_scalar(s.class_noun)}, source: {s.source}, "
            f"dir: {s.name}, category: {s.category}}}\n"
        )
    out.append("relations:\n")
    for r in RELATIONS:
        out.append(
            f"  - {{verb: {_scalar(r.verb)}, ing: {_scalar(r.ing)}, "
            f"single: {json.dumps(r.n_single > 0)}, multi: {json.dumps(r.n_multi > 0)}}}\n"
        )
    out.append("cases:\n")
    for c in cases:
        out.append(f"  - id: {c['id']}\n")
        for key in ("kind", "subjects", "prompt", "predicate", "relation", "boxes", "seed"):
            out.append(f"    {key}: {_scalar(c[key])}\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    text = render(build_cases())
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
