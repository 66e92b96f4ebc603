"""A test adapter that reads subject images, to exercise the reference-image path without
model weights: its image is the first reference of each subject, pasted into its box."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from PIL import Image

from relationbench.data import reference_images
from relationbench.images import read_image
from relationbench.methods import MethodBase, Sample
from relationbench.methods.sdxl import SDXLMethod


@dataclass(frozen=True)
class Settings:
    size: int = 64


class PasteReferences(MethodBase):
    Settings = Settings
    needs_references: ClassVar[bool] = True

    def __init__(self, settings: Settings, context):
        self.settings, self.context = settings, context
        self.prepared: list[str] = []

    def prepare(self, cases) -> None:
        self.prepared = [c.id for c in cases]

    def generate(self, requests):
        out = []
        n = self.settings.size
        for r in requests:
            canvas = Image.new("RGB", (n, n), (r.seed % 256, 0, 0))
            refs = []
            for subject, (x0, y0, x1, y1) in zip(r.case.subjects, r.case.boxes):
                ref = reference_images(subject, self.context.data_root)[0]
                refs.append(str(ref))
                w, h = max(1, int((x1 - x0) * n)), max(1, int((y1 - y0) * n))
                canvas.paste(read_image(ref).resize((w, h)), (int(x0 * n), int(y0 * n)))
            out.append(Sample(canvas, {"prompt": r.case.prompt, "references": refs}))
        return out


GROUP_SETUPS: list[str] = []  # every group GroupedSDXL set up, in order (tests reset it)


class GroupedSDXL(SDXLMethod):
    """Plain SDXL whose cases are grouped by kind; it logs each group set-up (a switch of
    group between calls) and refuses a batch that mixes groups."""

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self.current = None

    def group(self, case):
        return case.kind

    def generate(self, requests):
        kinds = {r.case.kind for r in requests}
        if len(kinds) != 1:
            raise AssertionError(f"a batch mixes groups: {kinds}")
        if self.current not in kinds:
            self.current = kinds.pop()
            GROUP_SETUPS.append(self.current)
        return super().generate(requests)
