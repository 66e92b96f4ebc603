"""Image preprocessing of the metric encoders, as the conventions fix it (REFERENCE 3, 4).

    CLIP   resize the short side to 224 (bicubic), centre crop 224, CLIP mean/std
    DINO   resize the short side to 256 (bicubic), centre crop 224, ImageNet mean/std

Written on PIL and numpy so that decoding workers need no torch transforms; the result is
identical to open_clip's eval transform and torchvision's Resize + CenterCrop (tested).
Image files are decoded by relationbench.images.read_image, the project's one reader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..images import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Short side to `resize` (bicubic), centre crop `crop`, scale to [0,1], normalize."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> float32 array (3, crop, crop).

        Files come through images.read_image; an image of another mode made in memory gets the
        same conversion (alpha onto white, 16-bit scaled), never PIL's alpha-dropping one."""
        image = to_rgb(image)
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            new_long = int(self.resize * long / short)  # torchvision truncates
            size = (self.resize, new_long) if w <= h else (new_long, self.resize)
            image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = image.size
        top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(image, dtype=np.float32) / 255.0
        x = (x - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1))


CLIP_PREPROCESS = Preprocess(224, 224, CLIP_MEAN, CLIP_STD)
DINO_PREPROCESS = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD)
