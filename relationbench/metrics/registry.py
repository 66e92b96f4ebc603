"""The named metrics: what each measures, its columns and their directions, and the models it needs.

A metric belongs to a family, the unit that is computed together and written to one file:
"paper" (CLIP-T, CLIP-R, CLIP-I, DINO: scores.csv, one pass of the CLIP and DINO encoders),
"vqa" (scores-vqa.csv) and "grounded" (scores-grounded.csv). `relbench score --metrics` names
metrics; a family runs when any of its metrics is named, so naming clip_t alone still writes
all four paper columns. A family other than "paper" is computed by a FamilyScorer (below),
which score.py feeds decoded images in batches and whose rows it caches by image content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, Sequence

from ..errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from ..suites import Case

PAPER = "paper"
ALL = "all"
Direction = Literal["higher", "lower"]


@dataclass(frozen=True)
class ColumnSpec:
    """One per-image column a metric writes."""

    name: str
    title: str  # as the tables print it, e.g. "CLIP-T"
    direction: Direction  # which way is better: the leaderboard marks best and second by it
    description: str
    summary: bool = True  # a leaderboard column (False: per-subject detail, kept in the file only)
    digits: int | None = None  # decimals the tables show; None: the protocol's (its scale is the protocol's)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    title: str
    family: str  # the file it is written to and the unit computed together
    columns: tuple[ColumnSpec, ...]
    models: tuple[str, ...]  # backbone weight keys it loads
    description: str  # one line: what it measures


def _higher(name: str, title: str, description: str, **kw) -> ColumnSpec:
    return ColumnSpec(name, title, "higher", description, **kw)


def _per_subject(name: str, title: str, what: str, **kw) -> tuple[ColumnSpec, ...]:
    return tuple(_higher(f"{name}_{k}", f"{title} {k}", f"{what} of subject {k}", summary=False, **kw) for k in (1, 2))


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("clip_t", "CLIP-T", PAPER, (_higher("clip_t", "CLIP-T", "CLIP cosine of image and prompt"),),
               ("clip",), "image-text agreement: CLIP cosine of the image and the prompt (identifiers removed)"),
    MetricSpec("clip_r", "CLIP-R", PAPER, (_higher("clip_r", "CLIP-R", "CLIP cosine of image and predicate"),),
               ("clip",), "relation: CLIP cosine of the image and the case's predicate alone"),
    MetricSpec("clip_i", "CLIP-I", PAPER, (_higher("clip_i", "CLIP-I", "CLIP cosine to the references"),),
               ("clip",), "identity: mean CLIP cosine of the whole image to each subject's references"),
    MetricSpec("dino", "DINO", PAPER, (_higher("dino", "DINO", "DINO cosine to the references"),),
               ("dino",), "identity: mean DINO cosine of the whole image to each subject's references"),
    MetricSpec(
        "vqa", "VQAScore", "vqa",
        (_higher("vqa_t", "VQA-T", "P(yes) that the image shows the prompt", digits=3),
         _higher("vqa_r", "VQA-R", "P(yes) that the image shows the relation question", digits=3)),
        ("vqa",),
        "VQAScore: a local VLM's P(yes) to 'Does this figure show \"{text}\"?' for the prompt and the relation",
    ),
    MetricSpec(
        "grounded", "Grounded identity", "grounded",
        (_higher("clip_i_g", "CLIP-I-G", "CLIP cosine of each subject's detected crop to its references (mean)"),
         _higher("dino_g", "DINO-G", "DINO cosine of each subject's detected crop to its references (mean)"),
         _higher("found", "Found", "share of the subjects the detector found", digits=3),
         ColumnSpec("confused", "Confused", "lower",
                    "1 when a subject's crop is closer to another subject's references (multi-object)", digits=3),
         _higher("layout_iou", "Layout IoU", "IoU of each detection and its case box (layout methods)", digits=3),
         *_per_subject("clip_i_g", "CLIP-I-G", "CLIP cosine of the crop to the references"),
         *_per_subject("dino_g", "DINO-G", "DINO cosine of the crop to the references"),
         *_per_subject("found", "Found", "1 when the detector found", digits=0)),
        ("detector", "clip", "dino"),
        "identity per subject: detect each subject by its class noun, crop, CLIP-I and DINO of the crop",
    ),
)}


def family_columns(family: str) -> tuple[ColumnSpec, ...]:
    """Every column of a family's metrics, in registry order."""
    return tuple(c for m in METRICS.values() if m.family == family for c in m.columns)


def column_spec(name: str) -> ColumnSpec:
    """The spec of a column by name (KeyError if no metric writes it)."""
    return column_metric(name)[1]


def column_metric(name: str) -> tuple[MetricSpec, ColumnSpec]:
    """(the metric that writes a column, the column's spec); KeyError if none does."""
    for m in METRICS.values():
        for c in m.columns:
            if c.name == name:
                return m, c
    raise KeyError(name)


FAMILIES: tuple[str, ...] = tuple(dict.fromkeys(m.family for m in METRICS.values()))


def parse_metrics(text: str) -> list[MetricSpec]:
    """"all" or a comma-separated list of metric names -> their specs, in registry order.

    Raises UserError for an unknown or empty name, listing the known ones.
    """
    if text.strip() == ALL:
        return list(METRICS.values())
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s): {', '.join(repr(n) for n in unknown)}",
                        hint=f"choose from {', '.join(METRICS)}, or `all` (see `relbench metrics`)")
    return [m for m in METRICS.values() if m.name in names]


# --------------------------------------------------------------------------- family scorers


@dataclass
class ImageItem:
    """One generated image to score, given to a family scorer."""

    image: "Image.Image"  # decoded by relationbench.images.read_image (RGB, 8-bit)
    sha256: str  # of the file's bytes (the cache key)
    case: "Case"  # subjects, prompt, predicate, boxes, kind
    text: str  # CLIP-T's scoring text (the prompt minus prefix and identifiers)
    predicate: str | None  # CLIP-R's predicate (None: no relation)
    uses_layout: bool  # the method takes the case boxes (msdiffusion, relationbooth)


class FamilyScorer(Protocol):
    """What computes a family's columns (metrics/vqa.py, metrics/grounded.py)."""

    family: str  # "vqa" | "grounded"
    id: str  # model id written next to every row (includes the dtype when not fp32)
    columns: tuple[str, ...]  # its per-image columns

    def score(self, items: Sequence[ImageItem]) -> list[dict[str, float]]:
        """One dict per item (keys: columns); NaN for a missing value."""
        ...
