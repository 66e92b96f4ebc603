"""RelationBooth (Shi et al., 2024) on MS-Diffusion: RelationLoRA per relation (lora.py),
the keypoint matching loss (kml.py), relation-triplet training (training.py) and the
`relationbooth` method (method.py; exported here for its card). Import the rest from the
submodules."""

from .method import RelationBoothMethod, RelationBoothSettings

__all__ = ["RelationBoothMethod", "RelationBoothSettings"]
