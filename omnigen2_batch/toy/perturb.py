"""What a small generative model does to a toy image: blur, noise, lost detail and dull colours.
The judge must read through these (its tests and evaluation/toy_judge_accuracy.py apply them)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def blurred(image: Image.Image, radius: float = 1.2) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def noisy(image: Image.Image, sigma: float = 25.0, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def soft(image: Image.Image) -> Image.Image:
    """What a small VAE does: detail lost (down 4x and back), colours a bit dull, some noise."""
    small = image.resize((image.width // 4, image.height // 4), Image.BILINEAR).resize(image.size, Image.BICUBIC)
    pixels = np.asarray(small, dtype=np.float32) * 0.85 + 20
    return noisy(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), sigma=8)
