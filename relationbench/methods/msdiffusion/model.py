"""The MS-Diffusion adapter on an SDXL UNet: resampler, dummy tokens, attention processors.

Dimensions come from the components (UNet cross-attention width, text encoder width, image
encoder width) and the resampler's own widths, so the tiny backbone builds a tiny
MS-Diffusion and sdxl the real one.

The adapter also owns what keeps its processors honest on a shared or sped-up UNet:
`fuse_projections` (diffusers' `unet.fuse_qkv_projections()` would replace them with its stock
processor, which drops the image conditioning) and `check_installed`, which generate runs at
the first denoising step.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ...errors import UserError
from .attention import ImageConditioning, MSCrossAttnProcessor, SelfAttnProcessor, level_grid
from .resampler import GroundingResampler, ResamplerConfig

NUM_DUMMY_TOKENS = 4


def attn2_modules(unet) -> dict[int, str]:
    """Index in unet.attn_processors order -> attention module name, for every attn2.

    The official checkpoint numbers its processors in this order (attn1 at even, attn2 at odd
    indices on SDXL); the map is read from the UNet, never assumed.
    """
    out = {}
    for k, name in enumerate(unet.attn_processors):
        module = name.removesuffix(".processor")
        if module.endswith("attn2"):
            out[k] = module
    return out


def attn2_levels(unet) -> dict[int, int]:
    """Index (as in attn2_modules) -> the UNet level each attn2 runs at (0: the latent's size).

    UNet2DConditionModel downsamples at the end of every down block but the last and
    upsamples at the end of every up block but the last, so down_blocks.i runs at level i,
    the mid block at the deepest level and up_blocks.j at the deepest level minus j.
    """
    deepest = len(unet.down_blocks) - 1
    out = {}
    for k, module in attn2_modules(unet).items():
        block, _, rest = module.partition(".")
        if block == "down_blocks":
            out[k] = int(rest.split(".")[0])
        elif block == "up_blocks":
            out[k] = deepest - int(rest.split(".")[0])
        elif block == "mid_block":
            out[k] = deepest
        else:
            raise ValueError(f"cannot tell the resolution of {module}: MS-Diffusion expects a UNet2DConditionModel")
    return out


def _module(unet):
    """The UNet itself when given torch.compile's wrapper of it."""
    return getattr(unet, "_orig_mod", unet)


def _fused_away(attn, fusing: bool) -> list[str]:
    """The projections of `attn` whose live LoRA (a peft layer with active, unmerged adapters)
    a fused projection bypasses, once fused (or, fusing=True, when it will be)."""
    if not (fusing or attn.fused_projections):
        return []
    names = ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")
    return [n for n in names if _live_lora(getattr(attn, n))]


def _live_lora(layer) -> bool:
    """A peft LoRA layer with active adapters not merged into its weight."""
    return (hasattr(layer, "base_layer") and not layer.disable_adapters
            and bool(set(layer.active_adapters) - set(layer.merged_adapters)))


def some(names: list[str], shown: int = 3) -> str:
    """The first `shown` names, and how many more (for error messages)."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class MSAdapter(nn.Module):
    """Installs MS-Diffusion's processors on `unet` and holds the trainable/loaded parts."""

    def __init__(self, unet, cfg: ResamplerConfig, num_dummy: int = NUM_DUMMY_TOKENS):
        super().__init__()
        cross = unet.config.cross_attention_dim
        if cfg.output_dim != cross:
            cfg = replace(cfg, output_dim=cross)
        self.cfg = cfg
        self.resampler = GroundingResampler(cfg)
        self.dummy_image_tokens = nn.Parameter(torch.randn(1, num_dummy, cross))
        self.index = attn2_modules(unet)
        self.levels = attn2_levels(unet)
        self.cross = nn.ModuleDict()  # attn2 processors by checkpoint index
        for k, module in self.index.items():
            attn = unet.get_submodule(module)
            self.cross[str(k)] = MSCrossAttnProcessor(attn.to_k.out_features, attn.to_k.in_features)
        self.install(unet)

    def install(self, unet) -> None:
        """Put this adapter's processors on every attn2 and the parameter-free one on the rest."""
        unet = _module(unet)
        attn1 = SelfAttnProcessor()
        unet.set_attn_processor({name: self.cross[str(k)] if k in self.index else attn1
                                 for k, name in enumerate(unet.attn_processors)})

    def fuse_projections(self, unet) -> None:
        """What diffusers' `unet.fuse_qkv_projections()` fuses (q/k/v of self-attention, k/v of
        the text path), with MS-Diffusion's processors (re)installed: diffusers' call puts its
        stock processor everywhere, which drops the image conditioning. The image path's k/v
        stay apart: they run once per sampling call, before the loop (attention.py).

        The fused weights are copies: fuse after loading the checkpoint and after fusing any
        LoRA (pipe.fuse_lora()); a LoRA still live on a fused projection is refused.
        """
        from diffusers.models.attention_processor import Attention

        unet = _module(unet)
        modules = {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}
        live = [f"{name}.{proj}" for name, m in modules.items() for proj in _fused_away(m, fusing=True)]
        if live:
            raise UserError(f"fusing projections would bypass the LoRA on {some(live)}",
                            hint="fuse the LoRA into the weights first (pipe.fuse_lora()), or sample unfused")
        for m in modules.values():
            m.fuse_projections()
        self.install(unet)

    def unfuse_projections(self, unet) -> None:
        """Undo fuse_projections on the UNet's attention modules: drop the fused copies (the
        separate projections were never changed), so a shared UNet is as it was."""
        from diffusers.models.attention_processor import Attention

        for m in _module(unet).modules():
            if isinstance(m, Attention) and m.fused_projections:
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(m, name):
                        delattr(m, name)
                m.fused_projections = False

    def check_installed(self, unet, ms: ImageConditioning | None = None) -> None:
        """Raise a UserError unless every attn2 of `unet` runs this adapter's processor, no fused
        projection bypasses a live LoRA, and (given the conditioning of a call under way, after
        its first UNet call) every attn2 consumed it. Without this a replaced processor or a
        dropped `ms` argument samples plain SDXL under MS-Diffusion's name."""
        unet = _module(unet)
        modules = attn2_modules(unet)
        mine = {name: self.cross[str(k)] for k, name in self.index.items()}
        wrong = {name: type(proc).__name__ for name in modules.values()
                 if (proc := unet.get_submodule(name).processor) is not mine.get(name)}
        if wrong:
            kinds = sorted(set(wrong.values()))
            raise UserError(
                f"MS-Diffusion's attention processors are not in place: {len(wrong)} of {len(modules)} attn2 layers "
                f"run {', '.join(kinds)} (e.g. {next(iter(wrong))}), so the subject images would be ignored",
                hint="unet.fuse_qkv_projections() replaces every processor: use MSAdapter.fuse_projections(unet), "
                     "which fuses the same projections and keeps MS-Diffusion's" if "FusedAttnProcessor2_0" in kinds
                else "something replaced them (set_attn_processor, another adapter or method on the shared "
                     "pipeline): close it, or load the method again")
        from diffusers.models.attention_processor import Attention

        live = [f"{name}.{proj}" for name, m in unet.named_modules() if isinstance(m, Attention)
                for proj in _fused_away(m, fusing=False)]
        if live:
            raise UserError(f"the fused projections bypass the LoRA on {some(live)}, added after fusing",
                            hint="load LoRAs before MSAdapter.fuse_projections and fuse them (pipe.fuse_lora())")
        if ms is not None:
            unused = {id(p) for p in ms.unused()}
            names = [name for name, proc in mine.items() if id(proc) in unused]
            if names:
                raise UserError(f"{len(names)} of {len(modules)} attn2 layers did not receive the image conditioning "
                                f"(e.g. {names[0]}): the `ms` cross-attention argument was dropped on the way",
                                hint="pass it to the pipeline as cross_attention_kwargs={'ms': conditioning}")

    @property
    def num_dummy(self) -> int:
        return self.dummy_image_tokens.shape[1]

    def subject_tokens(self, image_embeds: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """[N, 257, E] encoder tokens, [N, P] phrase embeddings, [N, 4] boxes -> [N, 16, D]."""
        return self.resampler(image_embeds, phrase_embeds, boxes)

    def conditioning(self, tokens: list[torch.Tensor], boxes: list[torch.Tensor], scales: list[torch.Tensor],
                     latent_hw: tuple[int, int], guidance: bool, phrase_masks: list[torch.Tensor] | None = None,
                     mask_threshold: float | None = None, start_step: int = 5) -> ImageConditioning:
        """Pack rows with different subject counts into one batch (zero padding, scale 0) and,
        with guidance, put the unconditional half (zero tokens, zero boxes) first, as the
        diffusers pipeline orders its batch; masks and image keys/values for every attn2 are
        prepared here, once per sampling call.

        tokens[i]: [S_i, 16, D]; boxes[i]: [S_i, 4]; scales[i]: [S_i]; phrase_masks[i]:
        [S_i, text tokens] (auto layout only).
        """
        s_max = max(t.shape[0] for t in tokens)
        q, d = tokens[0].shape[1], tokens[0].shape[2]
        dev, dtype = tokens[0].device, tokens[0].dtype
        b = len(tokens)
        tok = torch.zeros(b, s_max, q, d, device=dev, dtype=dtype)
        box = torch.zeros(b, s_max, 4, device=dev, dtype=torch.float32)
        sc = torch.zeros(b, s_max, device=dev, dtype=torch.float32)
        for i, (t, bx, s) in enumerate(zip(tokens, boxes, scales)):
            tok[i, : t.shape[0]], box[i, : t.shape[0]], sc[i, : t.shape[0]] = t, bx, s
        seq = torch.cat([self.dummy_image_tokens.to(dtype).expand(b, -1, -1), tok.flatten(1, 2)], dim=1)
        phrase = None
        if phrase_masks is not None:
            phrase = torch.zeros(b, s_max, phrase_masks[0].shape[-1], device=dev)
            for i, m in enumerate(phrase_masks):
                phrase[i, : m.shape[0]] = m
        packed = [seq, box, sc] + ([phrase] if phrase is not None else [])
        if guidance:
            packed = [torch.cat([torch.zeros_like(x), x]) for x in packed]
        grids = {proc: level_grid(latent_hw, self.levels[int(k)]) for k, proc in self.cross.items()}
        return ImageConditioning(*packed[:3], grids, self.num_dummy,
                                 phrase_mask=packed[3] if phrase is not None else None,
                                 mask_threshold=mask_threshold, start_step=start_step)
