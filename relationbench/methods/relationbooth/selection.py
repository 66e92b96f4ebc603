"""Which RelationLoRA of a bank each relation uses, and the one message when some are missing.

Shared by the methods that sample with RelationLoRAs (`relationbooth` on MS-Diffusion and
`relationlora-sdxl` on plain SDXL). A relation's LoRA is the newest bank entry for it on the
backbone that was trained with the given settings (their digest), else the newest imported
one (released LoRAs carry no training settings) where the settings accept those. A LoRA trained
with other settings is never used in their place: an ablation row without the keypoint loss
must not sample with a LoRA trained with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Hashable, Iterable, Sequence

from ...errors import UserError
from ..lora.bank import BankAdapters, BankEntry, LoraBank
from .lora import default_bank


@dataclass(frozen=True)
class RelationLoRAs:
    bank: LoraBank
    backbone: str  # the backbone's name, as recorded in each entry's base
    digest: str  # the settings digest of the LoRAs these settings train (RelationBoothMethod.settings_digest)
    card: str = "relationbooth"  # the card whose `relbench train` makes them (for the hint)
    default_bank: bool = True  # the hint names --out only for another bank
    imported: bool = True  # imported LoRAs (no settings digest) stand in when none of the digest is there

    @cached_property
    def _entries(self) -> list[BankEntry]:
        """The bank's entries on this backbone, its index read once (a snapshot: build another
        RelationLoRAs after training into the bank)."""
        return [e for e in self.bank.entries() if e.base.get("name") == self.backbone]

    def candidates(self, relation: str) -> list[BankEntry]:
        return [e for e in self._entries if e.info.get("relation") == relation]

    def find(self, relation: str) -> str | None:
        """The name of the LoRA `relation` uses, or None when the bank has none usable."""
        found = self.candidates(relation)
        usable = ([e for e in found if e.info.get("settings_digest") == self.digest]
                  or [e for e in found if self.imported and "settings_digest" not in e.info])
        return max(usable, key=lambda e: (e.created, e.name)).name if usable else None

    def resolve(self, relations: Iterable[str], *, fallback: bool = False) -> dict[str, str | None]:
        """relation -> its LoRA's name (None: none, allowed only with `fallback`, the base model).

        Raises one UserError listing every relation without a LoRA and the command that trains them."""
        found = {r: self.find(r) for r in dict.fromkeys(relations)}
        missing = [r for r, name in found.items() if name is None]
        if missing and not fallback:
            raise self.missing_error(missing)
        return found

    def missing_error(self, missing: list[str]) -> UserError:
        other = [r for r in missing if self.candidates(r)]
        note = (f"; it holds LoRAs trained with other settings for {', '.join(other)}, which these settings "
                f"do not use" if other else "")
        base, _, inner = self.card.partition("[")  # a variant: its card and --set values
        sets = [f"--set {pair}" for pair in inner.rstrip("]").split(",") if pair and not pair.startswith("bank=")]
        train = " ".join(["relbench train", f"--method {base}", *sets, "--data DIR",
                          *(f"--relation {r}" for r in missing), f"--backbone {self.backbone}",
                          *([] if self.default_bank else [f"--out {self.bank.root}"])])
        return UserError(
            f"the LoRA bank {self.bank.root} has no RelationLoRA on the {self.backbone} backbone trained with "
            f"these settings for {len(missing)} relation(s): {', '.join(missing)}{note}",
            hint=f"train them with `{train}` (DIR: relation triplets, e.g. from `relbench data example-triplets` "
                 f"or `relbench data synthesize`), import released ones with `relbench lora import`, or sample "
                 f"those cases with the base model: --set allow_base_fallback=true")


class RelationLoRASampling:
    """The LoRA half of a method that samples each relation with its RelationLoRA, mixed in
    before a PipelineMethod (RelationBoothMethod on MS-Diffusion, RelationLoRASDXLMethod on
    plain SDXL): the bank, one group per relation, each relation's LoRA switched in once per
    group with diffusers' adapter API, the manifest told which LoRA made each image.

    The host's settings have `bank`, `allow_base_fallback` and `fuse_lora`; it gives lora_digest() (the
    settings digest its LoRAs are trained with), may train what is lacking (train_lacking), may
    refuse imported LoRAs (accepts_imported) and is handed the extra modules trained with each
    LoRA it switches to (use_lora_modules)."""

    def __init__(self, settings, context):
        super().__init__(settings, context)
        self._bank: LoraBank | None = None
        self._adapters: BankAdapters | None = None
        self._loras: dict[str, str | None] = {}  # relation -> its LoRA's name in the bank (None: base model)
        self._bank_given = False  # use_bank() was called (`relbench train --out`)

    @property
    def bank(self) -> LoraBank:
        if self._bank is None:
            self._bank = LoraBank(Path(self.settings.bank).expanduser() if self.settings.bank else default_bank())
        return self._bank

    def use_bank(self, bank: LoraBank) -> None:
        """Train into (and generate from) `bank` instead of the settings' (`relbench train --out`)."""
        self._bank, self._bank_given = bank, True
        self._loras = {}

    def lora_digest(self) -> str:
        raise NotImplementedError

    def accepts_imported(self) -> bool:
        """Imported LoRAs (released ones: no training settings) may stand in for trained ones."""
        return True

    def use_lora_modules(self, name: str | None, modules: dict) -> None:
        """Hook: LoRA `name` (None: the base model) is now active; `modules` holds the weights of
        the extra modules trained with it (BankAdapters.modules). Default: nothing."""

    def selection(self) -> RelationLoRAs:
        return RelationLoRAs(self.bank, self.context.backbone.name, self.lora_digest(),
                             card=getattr(self, "training_card", None) or self.context.card or "relationbooth",
                             default_bank=self.bank.root == default_bank(), imported=self.accepts_imported())

    def lora_for(self, relation: str) -> str | None:
        """The name of the LoRA `relation` samples with (None: the base model, only with
        allow_base_fallback); raises the missing-relation UserError otherwise."""
        if relation not in self._loras:
            self._loras.update(self.selection().resolve([relation], fallback=self.settings.allow_base_fallback))
        return self._loras[relation]

    def group(self, case) -> Hashable:
        """The case's relation as its LoRA is named (relation_key)."""
        return relation_key(case.relation)

    def check(self, cases) -> None:
        """The host's checks, then: every case has a relation, and each relation a LoRA (or the
        fallback is allowed); train_lacking() may train the lacking ones first. One error
        lists every relation still lacking."""
        super().check(cases)
        missing = sorted({c.id for c in cases if not c.relation})
        if missing:
            raise UserError(f"this method generates relation cases; {len(missing)} case(s) have no relation "
                            f"(e.g. {missing[0]})", hint="choose a suite with relations, e.g. relationbench")
        relations = sorted({self.group(c) for c in cases})
        selection = self.selection()
        lacking = [r for r in relations if selection.find(r) is None]
        if lacking:
            self.train_lacking(lacking)
            selection = self.selection()  # the bank as training left it
        self._loras.update(selection.resolve(relations, fallback=self.settings.allow_base_fallback))

    def bank_given(self) -> bool:
        """A bank was named (the `bank` setting, or use_bank()): nothing is trained into it unasked."""
        return self.settings.bank is not None or self._bank_given

    def train_lacking(self, relations: list[str]) -> None:
        """Hook: train the LoRAs of `relations` before the check (default: nothing)."""

    def load(self) -> None:
        super().load()
        if self._adapters is None:
            self._adapters = BankAdapters(self._pipe, self.bank, fuse=self.settings.fuse_lora)

    def with_relation_lora(self, requests: Sequence, sample) -> list:
        """sample(requests) with the batch's relation LoRA active (one relation per batch);
        each Sample's meta gets `lora` (None and a `fallback` note for the base model)."""
        relations = {self.group(r.case) for r in requests}
        if len(relations) != 1:
            raise ValueError(f"a batch must hold the cases of one relation, got {len(relations)}")
        relation = relations.pop()
        name = self.lora_for(relation)
        self.load()
        self._adapters.activate(name)  # type: ignore[union-attr]
        self.use_lora_modules(name, self._adapters.modules(name))  # type: ignore[union-attr]
        samples = sample(requests)
        for s in samples:
            s.meta["lora"] = name
            if name is None:
                s.meta["fallback"] = f"base model: no RelationLoRA for {relation!r}"
        return samples

    def close(self) -> None:
        """Remove the LoRAs from the shared pipeline, then the host's own undoing."""
        if self._adapters is not None:
            self._adapters.close()
            self._adapters = None
        super().close()


def relation_key(relation: str) -> str:
    """The relation-triplet folder (and LoRA) name of a suite's relation: its words joined by
    "_" ("shake hands with" -> "shake_hands_with"), since a folder name has no spaces."""
    return "_".join(relation.split())

