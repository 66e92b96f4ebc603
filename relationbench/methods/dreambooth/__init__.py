"""DreamBooth (Ruiz et al., 2023) with LoRA on SDXL: the tuning-based baseline."""

from .method import DreamBoothMethod, DreamBoothSettings

__all__ = ["DreamBoothMethod", "DreamBoothSettings"]
