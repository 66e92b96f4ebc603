"""Plain text-to-image SDXL: the leaderboard's no-personalization row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from .base import Request, Sample
from .sampling import PipelineMethod, sample_sdxl


@dataclass(frozen=True)
class SDXLSettings:
    steps: int = 30
    guidance_scale: float = 5.0  # diffusers' SDXL default
    negative_prompt: str = ""  # empty: SDXL base zeroes the negative embedding
    prompt_prefix: str = ""
    height: int | None = None  # None: the backbone's resolution
    width: int | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for side in (self.height, self.width):
            if side is not None and side % 8:
                raise ValueError(f"height and width must be multiples of 8, got {side}")


class SDXLMethod(PipelineMethod):
    """SDXL with the case prompt only; subject images are not used. It changes nothing on
    the shared pipeline, so close() has nothing to undo."""

    Settings = SDXLSettings
    weights: ClassVar[tuple[str, ...]] = ("sdxl",)
    needs_references: ClassVar[bool] = False

    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        s = self.settings
        height, width = self.size()
        prompts = [s.prompt_prefix + r.case.prompt for r in requests]
        images = sample_sdxl(self.pipe, requests, prompts, steps=s.steps, guidance_scale=s.guidance_scale,
                             negative_prompt=s.negative_prompt, height=height, width=width, device=self.context.device)
        extra = {"prompt_prefix": s.prompt_prefix} if s.prompt_prefix else {}
        return [Sample(img, {"prompt": p, **extra}) for img, p in zip(images, prompts)]
