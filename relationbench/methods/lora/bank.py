"""A LoRA bank: a folder of trained LoRAs with an index, and the loader that switches them.

    BANK/index.json                               {"version": 1, "loras": {name: entry}}
    BANK/<name>/pytorch_lora_weights.safetensors  the trainer's output folder, as written
    BANK/<name>/lora_settings.json, loss.jsonl
    BANK/<name>/modules.safetensors               extra modules trained with the LoRA, if any (trainer.py)
                                                  (an imported LoRA: the file and what is known of it)

An entry records the file, the trainer settings, the base model (the backbone description)
and when it was added, plus what its method wants to remember (subjects, a relation, ...).
DreamBooth keys its bank by subject set; RelationBooth will key one by relation.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ...errors import UserError
from ...runs import atomic_write_text
from .files import SETTINGS_NAME, WEIGHT_NAME

if TYPE_CHECKING:
    from filelock import FileLock

INDEX_NAME = "index.json"
INDEX_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*")  # a folder name and an adapter name


@dataclass(frozen=True)
class BankEntry:
    name: str
    file: str  # the weights, relative to the bank folder
    settings: dict[str, Any]  # the trainer's settings file (settings, targets, info)
    base: dict[str, Any]  # the base model: the backbone description
    created: str  # ISO 8601, UTC
    info: dict[str, Any] = field(default_factory=dict)  # the adding method's notes

    @property
    def rank(self) -> int | None:
        return self.settings.get("settings", {}).get("rank")

    @property
    def steps(self) -> int | None:
        return self.settings.get("settings", {}).get("train_steps")

    @property
    def base_model(self) -> str:
        """The backbone's name and where its SDXL weights came from, e.g. "sdxl (stabilityai/...)"."""
        sdxl = self.base.get("weights", {}).get("sdxl", {}).get("location")
        name = str(self.base.get("name", "?"))
        return f"{name} ({sdxl})" if sdxl else name


class LoraBank:
    """LoRAs by name in one folder. Processes may share a bank: index updates hold a file lock
    and replace the index atomically."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def folder(self, name: str) -> Path:
        """Where the LoRA `name` lives (the trainer's out_dir)."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"a LoRA name is letters, digits and _ . + = - (not first), got {name!r}")
        return self.root / name

    def lock(self, name: str) -> "FileLock":
        """A lock for training `name` once when processes share the bank."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder(name)) + ".lock")

    def _read(self) -> dict[str, BankEntry]:
        if not self.index_path.is_file():
            return {}
        try:
            data = json.loads(self.index_path.read_text())
            return {name: BankEntry(**entry) for name, entry in data["loras"].items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"the LoRA bank index is damaged ({exc})", path=self.index_path,
                            hint="restore it, or delete it and add the LoRAs again") from None

    def entries(self) -> list[BankEntry]:
        return sorted(self._read().values(), key=lambda e: e.name)

    def __contains__(self, name: str) -> bool:
        entry = self._read().get(name)
        return entry is not None and (self.root / entry.file).is_file()

    def get(self, name: str) -> BankEntry:
        entries = self._read()
        if name not in entries:
            raise KeyError(f"no LoRA {name!r} in {self.root} (it holds: {', '.join(sorted(entries)) or 'none'})")
        return entries[name]

    def weights(self, name: str) -> Path:
        return self.root / self.get(name).file

    def add(self, name: str, *, base: Mapping[str, Any], info: Mapping[str, Any] | None = None,
            source: Path | None = None) -> BankEntry:
        """Record the trained LoRA in folder(name) (copied there first from `source`, a trainer
        output folder, when given) in the index."""
        from filelock import FileLock

        folder = self.folder(name)
        if source is not None and Path(source).resolve() != folder.resolve():
            if folder.exists():
                raise FileExistsError(f"{folder} exists: a LoRA in a bank is never overwritten")
            tmp = folder.with_name(f".{name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            os.replace(tmp, folder)
        if not (folder / WEIGHT_NAME).is_file():
            raise FileNotFoundError(f"no {WEIGHT_NAME} in {folder}")
        settings_file = folder / SETTINGS_NAME
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        entry = BankEntry(name=name, file=f"{name}/{WEIGHT_NAME}", settings=settings, base=dict(base),
                          created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                          info=dict(info or {}))
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.index_path) + ".lock"):
            entries = self._read()
            entries[name] = entry
            atomic_write_text(self.index_path, json.dumps(
                {"version": INDEX_VERSION, "loras": {k: asdict(e) for k, e in sorted(entries.items())}}, indent=2) + "\n")
        return entry

    def add_file(self, name: str, weights: Path, *, base: Mapping[str, Any], settings: Mapping[str, Any],
                 info: Mapping[str, Any] | None = None) -> BankEntry:
        """Record a LoRA file made elsewhere (e.g. a released one) as `name`: folder(name) gets a
        copy of it as WEIGHT_NAME and `settings` (what is known of how it was made: rank, ...)
        as its settings file, complete or not at all, then the index entry."""
        folder = self.folder(name)
        if folder.exists():
            raise FileExistsError(f"{folder} exists: a LoRA in a bank is never overwritten")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        shutil.copyfile(weights, tmp / WEIGHT_NAME)
        (tmp / SETTINGS_NAME).write_text(json.dumps(dict(settings), indent=2) + "\n")
        os.replace(tmp, folder)
        return self.add(name, base=base, info=info)


class BankAdapters:
    """The LoRAs of a run in one pipeline: each loaded once, under its own adapter name, then
    switched with diffusers' adapter API; the UNet is never reloaded and no file read twice.

    With `hotswap=True` (for a torch.compile'd UNet, where changing the set of active adapters
    recompiles) every LoRA is read into memory once and swapped into one adapter slot in place
    (load_lora_weights(..., hotswap=True)); call `prepare(names)` before compiling, so the slot
    is sized for the largest rank (pipe.enable_lora_hotswap).

    With `fuse=True` the active LoRA is merged into the UNet's weights (pipe.fuse_lora): no
    extra work per step. The merged layers' base weights are kept and put back bit for bit
    when the LoRA is switched or closed (unfusing subtracts, which rounds: the shared pipeline
    must sample as before afterwards).

    `modules(name)`: the weights of the extra modules trained with a LoRA (the trainer's
    MODULES_NAME beside it), read once, for the caller to switch with the LoRA.
    """

    SLOT = "bank"  # the hotswap adapter name

    def __init__(self, pipe, bank: LoraBank, hotswap: bool = False, fuse: bool = False):
        if hotswap and fuse:
            raise ValueError("fuse merges one adapter's weights; hotswap swaps them in a slot: choose one")
        self.pipe, self.bank, self.hotswap, self.fuse = pipe, bank, hotswap, fuse
        self.loaded: list[str] = []  # adapter names this object added (hotswap: [SLOT])
        self.active: str | None = None
        self._states: dict[str, dict] = {}  # hotswap: each LoRA's tensors, read once
        self._disabled = False
        # fused: id(base layer weight) -> (the weight, its copy), each copied once (kept to close):
        # unfusing puts the same bits back, so the copy stays right across switches
        self._base: dict[int, tuple[Any, Any]] = {}
        self._fused = False
        self._modules: dict[str, dict] = {}  # LoRA name -> its extra modules' tensors, read once

    def prepare(self, names: list[str]) -> None:
        """Load every LoRA a run needs before the first image (and before any compile)."""
        if self.hotswap:
            from safetensors.torch import load_file

            for name in names:
                if name not in self._states:
                    self._states[name] = load_file(str(self.bank.weights(name)))
            if not self.loaded and self._states:
                ranks = [v.shape[0] for state in self._states.values() for k, v in state.items()
                         if ".down." in k or "lora_A" in k]  # down / A: [rank, in]
                self.pipe.enable_lora_hotswap(target_rank=max(ranks))
        else:
            for name in names:
                self._load(name)

    def activate(self, name: str | None) -> None:
        """Make LoRA `name` the only active adapter; None: no LoRA (the base model)."""
        if name != self.active:
            self._unfuse()
        if name is None:
            if self.loaded and not self._disabled:
                self.pipe.disable_lora()
                self._disabled = True
            self.active = None
            return
        if name == self.active:
            return
        if self._disabled:
            self.pipe.enable_lora()
            self._disabled = False
        if self.hotswap:
            self.prepare([name])
            with _quiet_diffusers():
                self.pipe.load_lora_weights(self._states[name], adapter_name=self.SLOT, hotswap=bool(self.loaded))
            self.loaded = [self.SLOT]
            self.pipe.set_adapters([self.SLOT])
        else:
            self._load(name)
            self.pipe.set_adapters([name])
        self.active = name
        if self.fuse:
            self._fuse(name)

    def _fuse(self, name: str) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for layer in (m.get_base_layer() for m in self.pipe.unet.modules() if isinstance(m, BaseTunerLayer)):
            if id(layer.weight) not in self._base:  # a layer a newly loaded adapter wraps
                self._base[id(layer.weight)] = (layer.weight, layer.weight.detach().clone())
        with _quiet_diffusers():
            self.pipe.fuse_lora(components=["unet"], adapter_names=[name])
        self._fused = True

    def _unfuse(self) -> None:
        """Undo _fuse: unmerge (peft's bookkeeping), then the kept base weights, exactly."""
        if not self._fused:
            return
        import torch

        with _quiet_diffusers():
            self.pipe.unfuse_lora(components=["unet"])
        with torch.no_grad():
            for weight, copy in self._base.values():
                weight.copy_(copy)
        self._fused = False

    def _load(self, name: str) -> None:
        if name in self.loaded:
            return
        path = self.bank.weights(name)
        with _quiet_diffusers():
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        self.loaded.append(name)

    def modules(self, name: str | None) -> dict:
        """{"<module>.<parameter>": tensor (CPU)} of the extra modules trained with LoRA `name`;
        {} for None (the base model) or a LoRA trained without any."""
        if name is None:
            return {}
        if name not in self._modules:
            from safetensors.torch import load_file

            from .trainer import MODULES_NAME

            path = self.bank.weights(name).parent / MODULES_NAME
            self._modules[name] = load_file(str(path)) if path.is_file() else {}
        return self._modules[name]

    def close(self) -> None:
        """Remove every adapter this object added; with none left, the LoRA layers go too."""
        self._unfuse()
        if self._disabled:
            self.pipe.enable_lora()
        if self.loaded:
            self.pipe.delete_adapters(self.loaded)
            if not any(self.pipe.get_list_adapters().values()):
                self.pipe.unload_lora_weights()
        self.loaded, self.active, self._disabled = [], None, False
        self._states.clear()
        self._modules.clear()
        self._base.clear()


class _quiet_diffusers:
    """diffusers at error level: not "no text-encoder keys" for every UNet-only LoRA; and not
    peft's warning that a second adapter joins the first, which is what a bank does."""

    def __enter__(self):
        import warnings

        from diffusers.utils import logging

        self.level = logging.get_verbosity()
        logging.set_verbosity_error()
        self.warnings = warnings.catch_warnings()
        self.warnings.__enter__()
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")

    def __exit__(self, *exc):
        from diffusers.utils import logging

        self.warnings.__exit__(*exc)
        logging.set_verbosity(self.level)
        return False
