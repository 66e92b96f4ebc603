"""MS-Diffusion (Wang et al., 2024) reimplemented: grounding resampler, masked image
cross-attention, official checkpoint I/O, and the `msdiffusion` method."""

from .method import MSDiffusionMethod, MSDiffusionSettings

__all__ = ["MSDiffusionMethod", "MSDiffusionSettings"]
