"""Relation triplets -> the method's LoRA trainer -> a LoRA bank: what `relbench train` does.

Reads top to bottom: check everything first (the card and its settings, the backbone's
weights, every triplet of the relations to train, leftover checkpoints), then load the
model, then per relation either skip it (the bank holds a LoRA with its key) or train one
into the bank. A LoRA's key is its relation and a digest of what it learns (the learned
settings), from what (the relation's data hash) and on what (backbone, dtype): change any
and the next run trains a new entry beside the old one.

An interrupted training leaves its checkpoints beside its bank folder (the trainer's
`.<name>.checkpoints`); a rerun continues from them only with `resume`, else it refuses
and names the folder. Under `accelerate launch` every process trains the same LoRA on its
own batches (data-parallel) and only the main process writes the bank.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import UserError
from .methods.cards import parse_set


@dataclass
class TrainOptions:
    data: str | Path  # a relation-triplet folder (data/triplets.py)
    method: str = "relationbooth"  # a card (or variant card) whose adapter trains relation LoRAs
    relations: Sequence[str] = ()  # () : every relation in data
    out: str | Path | None = None  # the LoRA bank; None: the method's (`bank` setting or its default)
    backbone: str = "sdxl"
    weights: dict[str, str] = field(default_factory=dict)  # backbone weight overrides
    set_values: Sequence[str] = ()  # --set KEY=VALUE
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False  # continue interrupted trainings from their checkpoints
    quiet: bool = False


@dataclass(frozen=True)
class RelationResult:
    relation: str
    name: str  # the LoRA's name in the bank
    trained: bool  # False: the bank held it already
    first_loss: float | None  # of the loss log (None when the entry has none, e.g. imported)
    last_loss: float | None
    steps: int
    seconds: float  # this run's (0 when skipped)


@dataclass
class TrainSummary:
    bank: Path
    results: list[RelationResult]
    main: bool = True  # this process writes and reports (False on the other processes of a launch)

    @property
    def trained(self) -> list[RelationResult]:
        return [r for r in self.results if r.trained]

    @property
    def skipped(self) -> list[RelationResult]:
        return [r for r in self.results if not r.trained]


def train(opts: TrainOptions) -> TrainSummary:
    from .methods.lora.trainer import checkpoint_folder

    from .backbones import get_backbone
    from .data import data_root
    from .data.triplets import load_triplets
    from .devices import resolve_device, resolve_dtype
    from .generate import Shard, cpu_reproducible_env
    from .methods import Context, default_registry
    from .methods.lora.bank import LoraBank

    # 1. check everything before any training
    card = default_registry().card(opts.method, parse_set(opts.set_values))
    adapter = card.adapter_class()
    if not hasattr(adapter, "train_relation"):
        raise UserError(f"method {card.name!r} does not train relation LoRAs",
                        hint="relbench train trains relationbooth (or a variant card of it)")
    backbone = get_backbone(opts.backbone, opts.weights)
    backbone.check_available(adapter.weights)
    shard = Shard()
    device = resolve_device(shard.device(opts.device))
    if device == "cpu":
        cpu_reproducible_env()
    method = card.build(Context(backbone=backbone, device=device, dtype=resolve_dtype(opts.dtype, device),
                                data_root=data_root(None), quiet=opts.quiet or not shard.main))  # settings checked
    triplets = load_triplets(opts.data, list(opts.relations) or None, quiet=opts.quiet or not shard.main)
    if opts.out is not None:
        method.use_bank(LoraBank(Path(opts.out).expanduser()))
    bank = method.bank
    hashes = {r: triplets.content_hash(r) for r in triplets.relations}
    names = {r: method.lora_name(r, hashes[r], shard.world) for r in triplets.relations}
    todo = [r for r in names if names[r] not in bank]
    leftover = [c for r in todo if (c := checkpoint_folder(bank.folder(names[r]))).is_dir() and any(c.iterdir())]
    if leftover and not opts.resume:
        raise UserError(f"an interrupted training left checkpoints: {', '.join(map(str, leftover))}",
                        hint="continue it with --resume, or delete the folder(s) to start over")

    # 2. train what the bank lacks, relation by relation
    with contextlib.closing(method):
        if todo:
            method.load()
        results = train_into_bank(method, triplets, opts.data, names, todo, shard, card.name, hashes=hashes,
                                  quiet=opts.quiet or not shard.main)
    return TrainSummary(bank.root, results, main=shard.main)


def train_into_bank(method, triplets, data: str | Path, names: dict[str, str], todo: Sequence[str], shard,
                    card: str, *, hashes: dict[str, str], quiet: bool = False) -> list[RelationResult]:
    """Train each relation of `todo` (its samples in `triplets`, read from `data`, their
    content hash hashes[relation], which names[relation] was made from) as names[relation]
    into the method's bank, loaded; the others are reported as already there. Shared by
    `relbench train` and the tiny bank relationbooth trains for itself."""
    from tqdm.auto import tqdm

    bank, results = method.bank, []
    for relation in tqdm(names, desc="relations", unit="relation", disable=quiet):
        name, samples = names[relation], triplets.relations[relation]
        start = time.perf_counter()
        trained = False
        # one process alone: a lock, so two runs sharing the bank never train one LoRA twice;
        # a launch is one run whose processes train each LoRA together
        with bank.lock(name) if shard.world == 1 else contextlib.nullcontext():
            if relation in todo and (shard.world > 1 or name not in bank):
                info = {"relation": relation, "samples": [s.id for s in samples],
                        "entities": sorted({", ".join(s.entities) for s in samples}),
                        "data_sha256": hashes[relation], "method": card,
                        "settings_digest": method.settings_digest()}
                folder = bank.folder(name)
                if not folder.is_dir():  # else trained, but the index update was cut short
                    method.train_relation(samples, folder, info=info)
                if shard.main:  # where the data was: in the index only (a moved folder still resumes)
                    bank.add(name, base=method.context.backbone.describe(),
                             info={**info, "data": str(Path(data).resolve() / relation)})
                trained = True
        shard.barrier()
        results.append(_result(bank, relation, name, trained, time.perf_counter() - start if trained else 0.0))
    return results


def _result(bank, relation: str, name: str, trained: bool, seconds: float) -> RelationResult:
    from .methods.lora.files import LOSS_LOG_NAME, read_loss_log

    folder = bank.folder(name)
    log = read_loss_log(folder) if (folder / LOSS_LOG_NAME).is_file() else []
    return RelationResult(relation, name, trained, log[0]["loss"] if log else None, log[-1]["loss"] if log else None,
                          len(log), round(seconds, 2))
