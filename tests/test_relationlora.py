"""RelationLoRA's modules (paper section 3.4.1): exactly attn2.to_q / to_k / to_v / to_out.0 of
every cross-attention layer of the UNet with MS-Diffusion installed, nothing else (not its
to_k_ip / to_v_ip, not attn1): on the full SDXL architecture (meta device) 70 x 4 = 280 Linear
layers and 3,143,680 trainable parameters at rank 4 (the paper's "3.1M"); the same on tiny."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from relationbench.backbones.presets import SDXL_UNET_CONFIG
from relationbench.backbones.tiny import TINY
from relationbench.methods.lora.trainer import TrainerSettings
from relationbench.methods.msdiffusion.model import MSAdapter
from relationbench.methods.msdiffusion.resampler import ResamplerConfig
from relationbench.methods.relationbooth.lora import relationlora_targets

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 4  # paper section 4, Implementation Details


def relationlora_config(unet) -> LoraConfig:
    """The LoRA the trainer injects (methods/lora/trainer.py) with its default settings."""
    s = TrainerSettings()
    return LoraConfig(r=s.rank, lora_alpha=s.lora_alpha, init_lora_weights=s.init,
                      target_modules=relationlora_targets(unet))



def with_relationlora(config: dict, cfg: ResamplerConfig) -> UNet2DConditionModel:
    """A UNet with MS-Diffusion's adapter installed and RelationLoRA injected, on the meta device."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        MSAdapter(unet, cfg)
    inject_adapter_in_model(relationlora_config(unet), unet)
    return unet


def wrapped(unet) -> dict[str, LoraLayer]:
    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def check(unet) -> int:
    """What every UNet must show; returns the trainable parameter count."""
    layers = wrapped(unet)
    assert sorted(layers) == sorted(relationlora_targets(unet))
    assert all(".attn2." in n and n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in layers)
    assert not any("attn1" in n or "_ip" in n or "processor" in n for n in layers)
    # MS-Diffusion's image path is still there, unwrapped, in every attn2 processor
    ips = [m for n, m in unet.named_modules() if n.endswith(("to_k_ip", "to_v_ip"))]
    assert len(ips) == 2 * len(layers) // 4 and all(type(m) is torch.nn.Linear for m in ips)
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * len(layers)  # one A and one B per layer
    by_layers = sum(RANK * (m.in_features + m.out_features) for m in layers.values())
    assert sum(p.numel() for p in lora.values()) == by_layers
    return by_layers


def test_full_sdxl_unet_wraps_280_modules_with_3_14m_parameters():
    unet = with_relationlora(SDXL_UNET_CONFIG, ResamplerConfig())
    names = relationlora_targets(unet)
    assert len(names) == 280 and len({n.rsplit(".attn2.", 1)[0] for n in names}) == 70
    assert names[0] == "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q"
    total = check(unet)
    # by hand: per attn2 of width d, to_q d->d, to_k and to_v 2048->d, to_out d->d:
    # rank * (2d + 2(2048 + d) + 2d) = 4 (6d + 4096); 10 layers at 640 (down 2 x 2 + up 3 x 2),
    # 60 at 1280 (down 2 x 10, mid 10, up 3 x 10)
    assert total == 4 * (10 * (6 * 640 + 4096) + 60 * (6 * 1280 + 4096)) == 3_143_680


def test_tiny_unet_the_same_way():
    tiny = TINY.unet
    cfg = ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=16,
                          phrase_embeddings_dim=32)
    unet = with_relationlora(tiny, cfg)
    total = check(unet)
    # attn2 widths: down 1 (32: 1 attention x 1 layer), down 2 (64: 1 x 2), mid (64: 2 layers),
    # up 0 (64: 2 attentions x 2 layers), up 1 (32: 2 x 1)
    widths = [32] * (1 + 2) + [64] * (2 + 2 + 4)
    assert tiny["block_out_channels"] == (16, 32, 64) and tiny["transformer_layers_per_block"] == (1, 1, 2)
    cross = tiny["cross_attention_dim"]
    assert len(relationlora_targets(unet)) == 4 * len(widths)
    assert total == sum(RANK * (6 * d + 2 * cross) for d in widths) == 23_040


def test_targets_do_not_need_ms_diffusion_and_see_through_compile():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY.unet)
    plain = relationlora_targets(unet)
    MSAdapter(unet, ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=4, embedding_dim=16,
                                    phrase_embeddings_dim=32))
    assert relationlora_targets(unet) == plain

    class Compiled(torch.nn.Module):  # what torch.compile returns: the module as _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert relationlora_targets(Compiled(unet)) == plain


def test_the_trainer_defaults_are_the_paper_lora():
    s = TrainerSettings()
    assert (s.rank, s.lora_alpha, s.init) == (RANK, RANK, "gaussian")  # rank 4, alpha = rank, gaussian A
