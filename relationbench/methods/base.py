"""The method interface: requests in, samples out, and the lifecycle around them.

A method turns a batch of (case, sample index, seed) requests into images; the run loop in
generate.py owns batching, grouping, seeds, storage and resume. Cards (cards.py) say which
adapter class to build and with which settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Hashable, Protocol, Sequence

if TYPE_CHECKING:
    from PIL import Image

    from ..backbones import Backbone
    from ..suites import Case


@dataclass(frozen=True)
class Request:
    """One image to make: the case, its sample index and the seed derived from both."""

    case: "Case"
    index: int
    seed: int


@dataclass
class Sample:
    """A generated image and what the manifest should record about how it was made.

    The scorer reads three keys of `meta`: `prompt` (the text the model was given),
    `prompt_prefix` (quality words put before the case prompt) and `identifiers` (tokens such
    as DreamBooth's "sks"); CLIP-T scores `prompt` without the prefix and the identifiers.
    """

    image: "Image.Image"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a method may use: the backbone, the device and dtype, the subject image root, and
    the name of the card it was built from (for messages that give a command to run)."""

    backbone: "Backbone"
    device: str
    dtype: Any  # a torch dtype
    data_root: Path
    quiet: bool = False
    card: str = ""


class Method(Protocol):
    """The adapter interface, and the lifecycle the run loop drives (DESIGN "Method lifecycle"):

        __init__(settings, context)  cheap: no weights loaded, nothing written
        check(cases)                 refuse cases the method cannot serve (e.g. a reference
                                     index past a subject's images), with a UserError
        load()                       every weight the method needs, checked and loaded; runs
                                     among generate's input checks, before the run folder is
                                     written, so a bad weight leaves nothing behind (UserError)
        prepare(cases)               per-run work: encode subjects, train missing LoRAs
        group(case)                  a hashable key: cases of one group share set-up (e.g. the
                                     LoRA they need); the run loop orders work by group and
                                     never mixes groups in one batch, so each group is set up
                                     once per run. None: one group.
        generate(requests)           one image per request, in order; all requests share a
                                     group; each image depends only on its own request
        close()                      undo what the method did to shared objects (attention
                                     processors, adapters on the backbone's cached pipeline)
        run_info()                   after load(): what run.json records beyond the card's
                                     settings, decided at load time (e.g. which local encoder
                                     was found), and `label`, a variant label for tables

    `Settings` is the dataclass a card's settings fill; `weights` the backbone weight keys
    the method loads (checked for availability before load()); `needs_references`: the
    method reads subject images (checked before any work).
    """

    Settings: ClassVar[type]
    weights: ClassVar[tuple[str, ...]]
    needs_references: ClassVar[bool]

    def check(self, cases: Sequence["Case"]) -> None: ...

    def load(self) -> None: ...

    def prepare(self, cases: Sequence["Case"]) -> None: ...

    def group(self, case: "Case") -> Hashable: ...

    def generate(self, requests: Sequence[Request]) -> list[Sample]: ...

    def close(self) -> None: ...

    def run_info(self) -> dict[str, Any]: ...


class MethodBase:
    """Defaults of the optional lifecycle steps, for adapters to inherit: no weights beyond
    SDXL, nothing to prepare, one group, nothing to undo."""

    weights: ClassVar[tuple[str, ...]] = ("sdxl",)
    needs_references: ClassVar[bool] = False

    def check(self, cases: Sequence["Case"]) -> None:
        pass

    def load(self) -> None:
        pass

    def prepare(self, cases: Sequence["Case"]) -> None:
        pass

    def group(self, case: "Case") -> Hashable:
        return None

    def run_info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass
