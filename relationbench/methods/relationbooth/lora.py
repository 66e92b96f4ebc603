"""RelationLoRA (paper section 3.4.1): which modules it wraps (rank 4, alpha = rank, gaussian
init: the trainer's defaults), its bank, and the import of released RelationLoRA files (the
authors', or any in the same format).

RelationLoRA adapts only the text path of every cross-attention layer (attn2) of the SDXL
UNet: W_q, W_k_t, W_v_t and W_out of eq. 4, i.e. attn2.to_q, .to_k, .to_v, .to_out.0.
MS-Diffusion's image path (to_k_ip / to_v_ip, held by its attn2 processors), self-attention
(attn1) and everything else stay frozen. On SDXL that is 70 attn2 layers x 4 = 280 Linear
layers, 3,143,680 parameters at rank 4 (the paper: "3.1M").

A RelationLoRA file is diffusers' LoRA format, `pytorch_lora_weights.safetensors`, with keys
`unet.<module>.lora_A.weight` / `.lora_B.weight` (peft naming) or `unet.<module>.lora.down.weight`
/ `.lora.up.weight` (diffusers naming, what our trainer writes); `load_lora_weights` reads both
(it converts the second when a file's first key is not peft-named, so one file uses one naming).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...paths import cache_root
from ..lora.bank import BankEntry, LoraBank
from ..lora.files import WEIGHT_NAME
from ..msdiffusion.model import attn2_modules, some

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # eq. 4: W_q, W_k_t, W_v_t, W_out

# The base recorded for a released LoRA (BankEntry.base_model reads "sdxl (authors' release)").
RELEASE_BASE = {"name": "sdxl", "weights": {"sdxl": {"location": "authors' release"}},
                "release": "hub QingyuShi/DreamRelation"}

_KEY = re.compile(
    r"unet\.(?P<module>(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"
    r"\.attn2\.(?:to_q|to_k|to_v|to_out\.0))\.(?P<part>lora_A|lora_B|lora\.down|lora\.up)\.weight")
_DOWN = {"lora_A": True, "lora_B": False, "lora.down": True, "lora.up": False}
_NAMING = {"lora_A": "peft", "lora_B": "peft", "lora.down": "diffusers", "lora.up": "diffusers"}
# the authors' training output folders, e.g. lora-trained-xl-hugging-0.1kp-0.001cal-0.6
_AUTHORS_FOLDER = re.compile(r"lora-trained-xl-(?P<relation>.+?)(?:-[\d.e-]+kp)?(?:-[\d.e-]+cal)?(?:-[\d.]+)?")


def relationlora_targets(unet) -> list[str]:
    """Full module names of attn2.to_q / to_k / to_v / to_out.0 of every cross-attention layer
    of `unet` (a UNet2DConditionModel, with or without MS-Diffusion installed), in the UNet's
    processor order: full names, so peft wraps these and nothing else (not MS-Diffusion's
    to_k_ip / to_v_ip, not attn1)."""
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper
    return [f"{module}.{proj}" for module in attn2_modules(unet).values() for proj in PROJECTIONS]


def default_bank() -> Path:
    """RelationBooth's LoRA bank: $RELBENCH_CACHE/relationbooth/loras (default cache
    ~/.cache/relationbench)."""
    return cache_root() / "relationbooth" / "loras"


# -- released LoRA files ----------------------------------------------------------------------
@dataclass(frozen=True)
class LoraFile:
    """What check_lora_file found in a RelationLoRA file."""

    path: Path
    sha256: str
    rank: int
    alpha: float  # from the file's diffusers metadata when present, else = rank (loaders assume so)
    naming: str  # "peft" (lora_A / lora_B) or "diffusers" (lora.down / lora.up)
    modules: tuple[str, ...]  # the wrapped modules, sorted


def check_lora_file(path: Path, unet=None) -> LoraFile:
    """Check a RelationLoRA file: safetensors, every key `unet.` + an attn2 to_q / to_k / to_v /
    to_out.0 LoRA weight in one naming, a down and an up matrix per module, one rank throughout
    (down [r, in], up [out, r]). Given `unet`, also that every module is one of its RelationLoRA
    targets with matching in/out features. Raises UserError naming the file and the first
    offending keys."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    hint = ("use a RelationLoRA in diffusers' format (pytorch_lora_weights.safetensors, keys "
            "unet.<...>.attn2.to_q.lora_A.weight / .lora.down.weight, ...)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the LoRA file ({exc.strerror or exc})", path=path, hint=hint) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"not a readable safetensors file ({exc})", path=path, hint=hint) from None
    if not shapes:
        raise UserError("the LoRA file holds no tensors", path=path, hint=hint)
    matches = {k: _KEY.fullmatch(k) for k in shapes}
    unexpected = sorted(k for k, m in matches.items() if m is None)
    if unexpected:
        what = "not UNet keys (prefix unet.)" if any(not k.startswith("unet.") for k in unexpected) else \
            "not LoRA weights of attn2.to_q / to_k / to_v / to_out.0"
        raise UserError(f"{len(unexpected)} unexpected key(s), {what}: {some(unexpected)}", path=path,
                        hint="RelationLoRA wraps only the text path of the UNet's cross-attention layers; " + hint)
    namings = {_NAMING[m["part"]] for m in matches.values() if m}
    if len(namings) > 1:
        raise UserError("the file mixes peft (lora_A/lora_B) and diffusers (lora.down/lora.up) key names",
                        path=path, hint="diffusers' loader reads one naming per file: convert it to one")
    pairs: dict[str, dict[bool, tuple[int, ...]]] = {}  # module -> {down?: shape}
    for key, m in matches.items():
        pairs.setdefault(m["module"], {})[_DOWN[m["part"]]] = shapes[key]
    problems, ranks = [], {}
    for module, pair in sorted(pairs.items()):
        if len(pair) < 2:
            problems.append(f"{module}: only its {'down' if True in pair else 'up'} matrix")
            continue
        down, up = pair[True], pair[False]
        if len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            problems.append(f"{module}: down {list(down)} and up {list(up)} do not make a LoRA")
            continue
        ranks[module] = down[0]
    if problems:
        raise UserError(f"{len(problems)} module(s) without a complete LoRA: {some(problems)}", path=path, hint=hint)
    counts = Counter(ranks.values())
    rank = counts.most_common(1)[0][0]
    if len(counts) > 1:
        odd = [f"{m} (rank {r})" for m, r in ranks.items() if r != rank]
        raise UserError(f"the modules have different ranks: {len(ranks) - len(odd)} have rank {rank}, "
                        f"{len(odd)} another: {some(odd)}", path=path, hint="a RelationLoRA has one rank throughout")
    if unet is not None:
        _check_against(path, pairs, unet)
    return LoraFile(path=path, sha256=hashlib.sha256(data).hexdigest(), rank=rank,
                    alpha=_alpha(path, metadata, rank), naming=namings.pop(), modules=tuple(sorted(pairs)))


def _check_against(path: Path, pairs: dict, unet) -> None:
    targets = set(relationlora_targets(unet))
    problems = []
    for module, pair in sorted(pairs.items()):
        if module not in targets:
            problems.append(f"{module} (not in this UNet)")
            continue
        layer = unet.get_submodule(module)
        down, up = pair[True], pair[False]
        if (down[1], up[0]) != (layer.in_features, layer.out_features):
            problems.append(f"{module} ({down[1]} -> {up[0]}, the UNet's layer {layer.in_features} -> "
                            f"{layer.out_features})")
    if problems:
        raise UserError(f"{len(problems)} module(s) do not fit the UNet: {some(problems)}", path=path,
                        hint="the LoRA was made for another UNet (e.g. tiny vs sdxl)")


def _alpha(path: Path, metadata: dict[str, str], rank: int) -> float:
    """lora_alpha from diffusers' adapter metadata in the file (its loader applies alpha / r),
    else rank (what loaders assume for a file without it)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return float(rank)
    try:
        return float(json.loads(raw).get("unet.lora_alpha", rank))
    except (ValueError, TypeError, AttributeError) as exc:
        raise UserError(f"the file's lora_adapter_metadata is damaged ({exc})", path=path,
                        hint="diffusers' loader would fail on it too: save the LoRA again") from None


def import_loras(source: Path, bank: LoraBank, relation: str | None = None) -> list[tuple[BankEntry, bool]]:
    """`relbench lora import`: one LoRA (a weights file, or a folder holding WEIGHT_NAME) as
    `relation`, or without a relation every LoRA folder under `source` (named by relation_name).

    Each is recorded with its source, sha256 and rank and RELEASE_BASE as base. Returns
    (entry, added) per LoRA: a LoRA whose file is already in the bank under its name is not
    added again. Every file, name and clash is checked before anything is added (UserError).
    """
    source = Path(source)
    single = source.is_file() or (source / WEIGHT_NAME).is_file()
    if relation is None:
        if single:
            raise UserError("one LoRA needs the relation it is for", path=source, hint="pass --relation NAME")
        found = find_loras(source)
    else:
        found = {relation: source / WEIGHT_NAME if source.is_dir() else source}
    plan = []
    for name, file in found.items():
        try:
            bank.folder(name)
        except ValueError as exc:
            raise UserError(str(exc), path=file, hint="name the relation with letters, digits and _ . + = -") from None
        info = check_lora_file(file)
        old = bank.get(name) if name in bank else None
        if old is not None and old.info.get("sha256") != info.sha256:
            raise UserError(f"the bank already holds a different LoRA for {name!r}", path=bank.weights(name),
                            hint="import it under another --relation name, or delete that folder and its index entry")
        if old is None and bank.folder(name).exists():
            raise UserError(f"the bank has a folder for {name!r} but no index entry (an unfinished training?)",
                            path=bank.folder(name), hint="delete that folder, or import under another --relation name")
        plan.append((name, info, old))
    return [(old, False) if old is not None else (_add(bank, name, info), True) for name, info, old in plan]


def _add(bank: LoraBank, relation: str, lora: LoraFile) -> BankEntry:
    settings = {"settings": {"rank": lora.rank, "alpha": lora.alpha}, "targets": {"unet": list(lora.modules)},
                "info": {"imported": True}}
    return bank.add_file(relation, lora.path, base=RELEASE_BASE, settings=settings,
                         info={"relation": relation, "source": str(lora.path.resolve()), "sha256": lora.sha256,
                               "rank": lora.rank, "naming": lora.naming})


def relation_name(folder: Path) -> str:
    """The relation a LoRA folder is for: its name, or for the authors' training output
    (lora-trained-xl-<relation>-<w>kp-<w>cal-<scale>, as in their example config) the
    <relation> part."""
    m = _AUTHORS_FOLDER.fullmatch(folder.name)
    return m["relation"] if m else folder.name


def find_loras(root: Path) -> dict[str, Path]:
    """relation -> weights file for every folder under `root` (at any depth) that holds a
    WEIGHT_NAME; a UserError when two folders give the same relation or none is found."""
    found: dict[str, Path] = {}
    for file in sorted(Path(root).rglob(WEIGHT_NAME)):
        name = relation_name(file.parent)
        if name in found:
            raise UserError(f"two LoRAs for the relation {name!r}: {found[name].parent} and {file.parent}", path=root,
                            hint="import them one at a time with --relation NAME")
        found[name] = file
    if not found:
        raise UserError(f"no subfolder holds a {WEIGHT_NAME}", path=root,
                        hint="give a folder of LoRA folders (one per relation), or one LoRA with --relation NAME")
    return found
