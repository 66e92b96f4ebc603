"""The one LoRA trainer: peft LoRA on the modules a caller names, trained on the caller's batches
with the caller's loss; accelerate provides mixed precision, gradient accumulation and processes.

A caller (DreamBooth's prior preservation, RelationBooth's keypoint matching) gives

    batches(generator) -> batch          one micro-batch, drawn only from `generator`
    loss_fn(model, batch) -> loss        a scalar tensor

and gets a folder in the diffusers LoRA format:

    out_dir/pytorch_lora_weights.safetensors   keys prefixed unet. (text_encoder., text_encoder_2.)
    out_dir/lora_settings.json                 trainer settings, targets and the caller's info
    out_dir/loss.jsonl                         one line per optimizer step: step, loss, lr, seconds
    out_dir/modules.safetensors                only with `modules`: the caller's extra modules trained
                                               with the LoRA, keys "<module>.<parameter>"

Under `accelerate launch` every process trains the same LoRA on its own batches (its own
generator); gradients are averaged across processes at each optimizer step, so all processes
hold identical weights and only the main one writes. With data_parallel=False each process
trains a LoRA of its own, alone (a sharded `relbench generate`: each trains its cases' LoRAs).
The generator is the batches' only randomness, so checkpointing its state makes a resumed run
draw the same batches.
The output folder appears only when complete (written beside it, then renamed); checkpoints
live beside it too (.<name>.checkpoints/step-N) and are removed once the LoRA is saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ...errors import UserError
from .files import LOSS_LOG_NAME, SETTINGS_NAME, WEIGHT_NAME, read_loss_log, write_loss_log

ADAPTER = "relbench-train"  # the adapter name while training; never saved
MODULES_NAME = "modules.safetensors"  # the extra modules' weights beside the LoRA's (train_lora `modules`)
PREFIXES = ("unet", "text_encoder", "text_encoder_2")  # the diffusers SDXL LoRA file's model prefixes
NOT_LEARNED = ("checkpoint_every",)  # settings that change how a LoRA trains, not what it learns

BatchSource = Callable[[torch.Generator], Any]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class TrainerSettings:
    """Defaults: RelationBooth's RelationLoRA (REFERENCE 2), which match diffusers' DreamBooth
    LoRA SDXL recipe: rank 4, lora_alpha = rank, gaussian init; the authors' code's AdamW
    (lr 1e-4, weight decay 1e-4), batch 1 x 4 accumulation, clip-norm 1.0; the paper's 500
    steps. The paper's own optimizer: optimizer="adam", weight_decay=0."""

    rank: int = 4
    alpha: float | None = None  # lora_alpha; None: = rank (scale 1)
    init: bool | str = "gaussian"  # peft init_lora_weights (the A matrix; B starts at zero)
    optimizer: str = "adamw"  # "adamw" (code) or "adam" (paper)
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    max_grad_norm: float | None = 1.0  # None: no clipping
    train_steps: int = 500  # optimizer steps
    gradient_accumulation: int = 4  # micro-batches per optimizer step (per process)
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate autocast; LoRA weights stay fp32)
    gradient_checkpointing: bool = False  # on the first model (a diffusers model)
    seed: int = 0  # LoRA init and the batch generator (process r > 0: a seed derived from it)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: none

    def __post_init__(self):
        if min(self.train_steps, self.gradient_accumulation, self.rank) < 1 or self.checkpoint_every < 0:
            raise ValueError("train_steps, gradient_accumulation and rank must be at least 1, "
                             "checkpoint_every at least 0")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw, got {self.optimizer!r}")

    @property
    def lora_alpha(self) -> float:
        return self.rank if self.alpha is None else self.alpha

    @classmethod
    def of(cls, settings: Any):
        """This class's fields of `settings` (e.g. a method's settings, a subclass with more)."""
        return cls(**{k: getattr(settings, k) for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class LoraTarget:
    """LoRA on some modules of one model, saved under `prefix` in the diffusers file."""

    model: torch.nn.Module
    modules: tuple[str, ...]  # peft target_modules: module names or name suffixes, e.g. "attn2.to_q"
    prefix: str = "unet"

    def __post_init__(self):
        if self.prefix not in PREFIXES:
            raise ValueError(f"prefix must be one of {', '.join(PREFIXES)}, got {self.prefix!r}")
        object.__setattr__(self, "modules", tuple(self.modules))


def checkpoint_folder(out_dir: Path) -> Path:
    """Where train_lora keeps the checkpoints of the LoRA it writes to out_dir (beside it)."""
    return out_dir.with_name(f".{out_dir.name}.checkpoints")


def rank_seed(seed: int, rank: int) -> int:
    """The batch generator's seed of process `rank`: `seed` itself on the main process (a
    single-process run draws what it always drew), a hash of both elsewhere."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}".encode()).digest()[:8], "little") >> 1


def train_lora(
    model: torch.nn.Module,
    target_modules: Sequence[str],
    batches: BatchSource,
    loss_fn: LossFn,
    settings: TrainerSettings,
    out_dir: Path,
    *,
    also: Sequence[LoraTarget] = (),
    modules: Mapping[str, torch.nn.Module] | None = None,
    info: Mapping[str, Any] | None = None,
    data_parallel: bool = True,
    progress: bool = True,
    desc: str = "LoRA",
) -> Path:
    """Train one LoRA on `model` (saved as unet.*) and the models in `also`; returns out_dir.

    `modules` (name -> module, e.g. a projection the loss applies to its inputs): trained with
    the LoRA, every parameter, in fp32, by the same optimizer (averaged, clipped and
    checkpointed with it), the caller's initial values kept; saved as MODULES_NAME and named
    with their shapes in the settings file. Resumes from the last checkpoint beside out_dir
    when one exists (same settings and number of processes, or a UserError). `info` (JSON) is
    recorded in the settings file. The models are left as they were: adapter removed,
    requires_grad and train/eval mode restored, gradient checkpointing off again (the modules
    keep their trained weights).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    s = TrainerSettings.of(settings)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: a trained LoRA is never overwritten")
    targets = [LoraTarget(model, tuple(target_modules), "unet"), *also]
    modules = dict(modules or {})
    # accelerate keeps one global state per process; this LoRA may ask for another precision,
    # so start from a fresh one (the process group of a launch, PartialState, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    device = next(model.parameters()).device
    accelerator = Accelerator(mixed_precision=s.mixed_precision, gradient_accumulation_steps=s.gradient_accumulation,
                              cpu=device.type == "cpu")
    record = {"settings": asdict(s), "targets": {t.prefix: list(t.modules) for t in targets}, "info": dict(info or {})}
    if modules:
        record["modules"] = {name: {k: list(p.shape) for k, p in m.named_parameters()} for name, m in modules.items()}
    record = json.loads(json.dumps(record))  # as read back from disk (tuples -> lists)
    group = Processes(accelerator, data_parallel)
    checkpoints = Checkpoints(checkpoint_folder(out_dir), record, group)
    generator = torch.Generator().manual_seed(rank_seed(s.seed, group.rank))

    with _lora_attached(targets, s) as params, _modules_trained(modules) as extra:
        params.update(extra)
        optimizer = accelerator.prepare_optimizer(_optimizer(s, list(params.values())))
        start, log = checkpoints.resume(params, optimizer, generator)
        bar = tqdm(total=s.train_steps, initial=start, desc=desc, unit="step",
                   disable=not progress or not group.main, leave=False)
        with bar:
            for step in range(start + 1, s.train_steps + 1):
                t0 = time.perf_counter()
                total = torch.zeros((), device=device)
                for _ in range(s.gradient_accumulation):
                    batch = batches(generator)
                    with accelerator.accumulate(model), accelerator.autocast():
                        loss = loss_fn(model, batch)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            average_gradients(group, list(params.values()))
                            if s.max_grad_norm is not None:
                                accelerator.clip_grad_norm_(list(params.values()), s.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad()
                    total += loss.detach().float()
                mean = group.mean(total / s.gradient_accumulation).item()
                log.append({"step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                            "seconds": round(time.perf_counter() - t0, 4)})
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4f}")
                if s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.train_steps:
                    checkpoints.save(step, params, optimizer, generator, log)
        if group.main:
            _save_final(out_dir, targets, s, record, log, modules)
            checkpoints.remove()
        group.wait()
    return out_dir


def _optimizer(s: TrainerSettings, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if s.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=s.learning_rate, weight_decay=s.weight_decay)


@dataclass
class Processes:
    """The processes training one LoRA: every process of the launch (data-parallel), or this
    one alone; the collectives below are no-ops for one."""

    accelerator: Any
    data_parallel: bool

    @property
    def count(self) -> int:
        return self.accelerator.num_processes if self.data_parallel else 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.data_parallel else 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction="mean") if self.count > 1 else tensor

    def gather(self, obj: Any) -> list[Any]:
        """obj of every process, in rank order."""
        from accelerate.utils import gather_object

        return gather_object([obj]) if self.count > 1 else [obj]

    def wait(self) -> None:
        if self.count > 1:
            self.accelerator.wait_for_everyone()


def average_gradients(group: Processes, params: list[torch.nn.Parameter]) -> None:
    """Average the LoRA gradients over processes, in one collective (the models are not
    wrapped in DDP: a caller's loss may call them any way it likes)."""
    if group.count == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = group.mean(torch.cat([g.flatten() for g in grads]))
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).clone()


@contextlib.contextmanager
def _lora_attached(targets: Sequence[LoraTarget], s: TrainerSettings) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Inject the LoRA (seeded init), make only it trainable (fp32), train mode, checkpointing;
    yields the trainable parameters by "<prefix>.<name>"; afterwards every model is as before."""
    from peft import LoraConfig, inject_adapter_in_model

    for t in targets:
        if getattr(t.model, "peft_config", None):
            raise ValueError(f"the {t.prefix} carries adapters ({', '.join(t.model.peft_config)}): unload them "
                             "before training a LoRA")
    saved = [(t.model, t.model.training, {n: p.requires_grad for n, p in t.model.named_parameters()})
             for t in targets]
    main = targets[0].model
    checkpointing = s.gradient_checkpointing and not getattr(main, "is_gradient_checkpointing", False)
    try:
        with torch.random.fork_rng(devices=[]):  # peft draws the init from the global CPU generator
            torch.manual_seed(s.seed)
            for t in targets:
                t.model.requires_grad_(False)
                config = LoraConfig(r=s.rank, lora_alpha=s.lora_alpha, init_lora_weights=s.init,
                                    target_modules=list(t.modules))
                inject_adapter_in_model(config, t.model, adapter_name=ADAPTER)
        params = {}
        for t in targets:
            for name, p in t.model.named_parameters():
                if f".{ADAPTER}." in name:
                    p.data = p.data.float()  # LoRA weights train in fp32 under any precision
                    p.requires_grad_(True)
                    params[f"{t.prefix}.{name}"] = p
            t.model.train()
        if checkpointing:
            main.enable_gradient_checkpointing()
        yield params
    finally:
        if checkpointing:
            main.disable_gradient_checkpointing()
        for model, training, grads in saved:
            _remove_lora_layers(model)
            model.train(training)
            for name, p in model.named_parameters():
                p.requires_grad_(grads[name])


@contextlib.contextmanager
def _modules_trained(modules: Mapping[str, torch.nn.Module]) -> Iterator[dict[str, torch.nn.Parameter]]:
    """Every parameter of the modules trainable in fp32, train mode; yields them by
    "modules.<name>.<parameter>"; afterwards requires_grad and train/eval mode as before."""
    saved = [(m, m.training, {n: p.requires_grad for n, p in m.named_parameters()}) for m in modules.values()]
    try:
        params = {}
        for name, module in modules.items():
            for key, p in module.named_parameters():
                p.data = p.data.float()
                p.requires_grad_(True)
                params[f"modules.{name}.{key}"] = p
            module.train()
        yield params
    finally:
        for module, training, grads in saved:
            module.train(training)
            for key, p in module.named_parameters():
                p.requires_grad_(grads[key])


def _remove_lora_layers(model: torch.nn.Module) -> None:
    """Put back the original layers wherever peft injected LoRA wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def lora_layers(target: LoraTarget, s: TrainerSettings) -> dict[str, torch.Tensor]:
    """The target's trained LoRA in diffusers' naming (no prefix), with the alpha / rank scale
    folded into the up matrices, so loaders that assume alpha = rank (a state dict passed in
    memory carries no metadata) apply exactly the trained update."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(target.model, adapter_name=ADAPTER)
    scale = s.lora_alpha / s.rank
    state = {k: (v * scale if ".lora_B." in k else v).detach().float().contiguous() for k, v in state.items()}
    return convert_state_dict_to_diffusers(state)


def _save_final(out_dir: Path, targets: Sequence[LoraTarget], s: TrainerSettings, record: dict,
                log: list[dict], modules: Mapping[str, torch.nn.Module]) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    layers = {f"{t.prefix}_lora_layers": lora_layers(t, s) for t in targets}
    StableDiffusionXLPipeline.save_lora_weights(tmp, weight_name=WEIGHT_NAME, **layers)
    if modules:
        save_file({f"{name}.{k}": p.detach().float().cpu().contiguous()
                   for name, m in modules.items() for k, p in m.named_parameters()}, str(tmp / MODULES_NAME))
    (tmp / SETTINGS_NAME).write_text(json.dumps(record, indent=2) + "\n")
    write_loss_log(tmp / LOSS_LOG_NAME, log)
    os.replace(tmp, out_dir)  # complete or absent: never a half-written LoRA


class Checkpoints:
    """step-N folders (LoRA weights by parameter name, optimizer, every process's generator and
    torch RNG state, step, loss log) in one folder beside the output; only the last one is kept."""

    def __init__(self, root: Path, record: dict, group: Processes):
        self.root, self.record, self.group = root, record, group
        self.acc = group.accelerator

    def last(self) -> Path | None:
        steps = sorted(self.root.glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
        return steps[-1] if steps else None

    def save(self, step: int, params: dict[str, torch.nn.Parameter], optimizer, generator: torch.Generator,
             log: list[dict]) -> None:
        from safetensors.torch import save_file

        rng = self.group.gather(_rng_state(generator))
        if self.group.main:
            folder = self.root / f"step-{step:06d}"
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "lora.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
            torch.save({"processes": rng, "scaler": scaler}, tmp / "rng.pt")
            write_loss_log(tmp / LOSS_LOG_NAME, log)
            (tmp / "state.json").write_text(json.dumps({"step": step, "processes": self.group.count,
                                                        **self.record}, indent=2) + "\n")
            os.replace(tmp, folder)
            for old in self.root.iterdir():
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        self.group.wait()

    def resume(self, params: dict[str, torch.nn.Parameter], optimizer,
               generator: torch.Generator) -> tuple[int, list[dict]]:
        """(step to continue after, loss log so far): 0 and [] without a checkpoint."""
        from safetensors.torch import load_file

        folder = self.last()
        if folder is None:
            return 0, []
        state = json.loads((folder / "state.json").read_text())
        saved = {k: v for k, v in state.items() if k not in ("step", "processes")}
        if _what_it_learns(saved) != _what_it_learns(self.record) or state["processes"] != self.group.count:
            raise UserError(f"the checkpoint in {folder} was written by a training with other settings or "
                            f"another number of processes ({state['processes']})",
                            path=folder, hint="train with the same settings to resume, or delete the folder")
        weights = load_file(str(folder / "lora.safetensors"))
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        rng = torch.load(folder / "rng.pt", weights_only=True)
        if rng["scaler"] is not None:
            self.acc.scaler.load_state_dict(rng["scaler"])
        _set_rng_state(generator, rng["processes"][self.group.rank])
        return state["step"], read_loss_log(folder)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _what_it_learns(record: dict) -> dict:
    """A settings record less NOT_LEARNED: a training may resume under another checkpoint interval."""
    return {**record, "settings": {k: v for k, v in record["settings"].items() if k not in NOT_LEARNED}}


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
