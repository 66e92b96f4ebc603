"""A LoRA applied by hand: the independent computation the trainer and the bank are checked against."""

from __future__ import annotations

import copy

import torch


def merged(unet, state: dict[str, torch.Tensor]):
    """An independent copy of the UNet with W + up @ down written into its weights."""
    out = copy.deepcopy(unet)
    with torch.no_grad():
        for key, down in state.items():
            if key.endswith("lora.down.weight"):
                module = out.get_submodule(key[len("unet."):].rsplit(".lora", 1)[0])
                module.weight += state[key.removesuffix("down.weight") + "up.weight"] @ down
    return out
