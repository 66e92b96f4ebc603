"""RelationLoRA on plain SDXL (paper Fig. 15, "relation inversion"): SDXL sampled from the case
prompt alone, with the bank's RelationLoRA for the case's relation switched in; no subject
images. RelationLoRA only touches the text cross-attention of SDXL's UNet (paper 4), so a LoRA
trained on MS-Diffusion applies to any SDXL-based model.

Which LoRAs: those trained with the settings of the card `trained_with` (relationbooth by
default) on this backbone, else imported ones (selection.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..base import Request, Sample
from ..sdxl import SDXLMethod, SDXLSettings
from .selection import RelationLoRASampling


@dataclass(frozen=True)
class RelationLoRASDXLSettings(SDXLSettings):
    trained_with: str = "relationbooth"  # the card (or card file) whose `relbench train` made the LoRAs
    bank: str | None = None  # the LoRA bank; None: the default ($RELBENCH_CACHE/relationbooth/loras)
    allow_base_fallback: bool = False  # a relation without a LoRA samples plain SDXL (manifest says so)
    fuse_lora: bool = False  # merge the active LoRA into the UNet while its group samples (no per-step cost)


class RelationLoRASDXLMethod(RelationLoRASampling, SDXLMethod):
    Settings = RelationLoRASDXLSettings

    @property
    def training_card(self) -> str:
        return self.settings.trained_with

    def trainer(self):
        """The `trained_with` card's method on this backbone (built once; building loads nothing)."""
        if not hasattr(self, "_trainer"):
            from .. import default_registry

            self._trainer = default_registry().card(self.settings.trained_with).build(self.context)
        return self._trainer

    def lora_digest(self) -> str:
        """The settings digest of the LoRAs the `trained_with` card trains on this backbone."""
        return self.trainer().settings_digest()

    def train_lacking(self, relations: list[str]) -> None:
        """As the trainer card would: on the tiny backbone with no bank given, it trains the
        lacking LoRAs on example triplets (then puts the shared pipeline back)."""
        if not self.bank_given():
            trainer = self.trainer()
            try:
                trainer.train_lacking(relations)
            finally:
                trainer.close()

    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        """Plain SDXL's images with the batch's relation LoRA active (one relation per batch)."""
        return self.with_relation_lora(requests, super().generate)
