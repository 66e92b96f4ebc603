"""Where weights come from: backbone presets mapping component keys to weight sources.

Architecture and weights are kept apart (like open_clip's pretrained table): a preset names,
for each component key, a `WeightSource` (a hub repo id, a local file or folder, or an
open_clip pretrained tag); a model's loader, next to its user, asks the `Backbone` for a
local path (`fetch(key)`) and never knows which it was. Nothing falls back from one preset
to the other.

    sources.py   WeightSource and `--weight KEY=VALUE` parsing
    presets.py   BackbonePreset and PRESETS (sdxl, tiny)
    hub.py       hub cache lookup, availability probing, download hints
    tiny.py      tiny SDXL configs and builders, offline tokenizers, `seeded`
    backbone.py  Backbone (sources -> local paths, the SDXL pipeline) and get_backbone

Importing this package does not import torch or diffusers; functions import them when called.
"""

from .backbone import Backbone, get_backbone
from .hub import loading_from
from .presets import PRESETS, BackbonePreset
from .sources import WeightSource
from .tiny import TINY, build_clip_tokenizers, build_tiny_components, seeded

__all__ = [
    "Backbone",
    "BackbonePreset",
    "PRESETS",
    "TINY",
    "WeightSource",
    "build_clip_tokenizers",
    "build_tiny_components",
    "get_backbone",
    "loading_from",
    "seeded",
]
