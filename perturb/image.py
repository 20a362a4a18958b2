"""Image degradations.

Every op has the signature ``op(sample, rng, *, args) -> sample`` and receives a sample already
validated and copied by `perturb.apply`. Perturbed images are returned in RGB, same size as the
input (``random_resized_crop`` included: it resizes back). Input modes are converted first by
`to_rgb` (16-bit scaled, not clipped). A sample without images is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from perturb._sample import remove_placeholders

# DDPM schedule (Ho et al. 2020): T = 1000 steps, beta linear from 1e-4 to 0.02.
DIFFUSION_STEPS = 1000
_BETAS = np.linspace(1e-4, 0.02, DIFFUSION_STEPS)
ALPHAS_CUMPROD = np.cumprod(1.0 - _BETAS)  # alpha_bar_t = prod_{s<=t} (1 - beta_s), index t in [0, 999]


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    16-bit and 32-bit integer modes (``I;16*``, ``I``) are read as 16-bit data — what PIL gives
    for 16-bit PNGs — and scaled by 255/65535; PIL's own ``convert`` would clip them at 255 and
    turn most real 16-bit images white. Alpha is dropped (colour under transparent pixels kept).
    """
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        levels = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.round(levels).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def _each_image(sample: dict, fn: Callable[[Image.Image], Image.Image]) -> dict:
    """Apply `fn` to every image (converted to RGB first); no images -> sample unchanged."""
    if not sample.get("images"):
        return sample
    return {**sample, "images": [fn(to_rgb(img)) for img in sample["images"]]}


def _to_unit(img: Image.Image) -> np.ndarray:
    """RGB image -> float64 array in [0, 1], shape (H, W, 3)."""
    return np.asarray(img, dtype=np.float64) / 255.0


def _from_unit(x: np.ndarray) -> Image.Image:
    """Float array in [0, 1] (values outside are clipped), shape (H, W, 3) -> RGB image."""
    return Image.fromarray(np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def drop(sample: dict, rng: np.random.Generator) -> dict:
    """Remove every image: ``images`` becomes ``[]`` and ``{"type": "image"}`` parts leave the prompt.

    The language-bias negative: the model must answer from the question alone. Removing the
    placeholders keeps the prompt consistent with the (now empty) image list, which processors
    check. A sample without an ``images`` key is returned unchanged.
    """
    if sample.get("images") is None:
        return sample
    out = {**sample, "images": []}
    if sample.get("prompt") is not None:
        out["prompt"] = remove_placeholders(sample["prompt"], "image")
    return out


def diffusion(sample: dict, rng: np.random.Generator, *, t: int = 500) -> dict:
    """DDPM forward diffusion to step `t`: ``x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps``.

    ``x_0`` is the image scaled to [-1, 1], ``eps ~ N(0, I)`` per pixel and channel,
    ``a_t = prod_{s<=t} (1 - beta_s)`` with T = 1000 and beta linear in [1e-4, 0.02]. ``x_t`` is
    mapped back to uint8 RGB with clipping. `t` in [0, 999]: 0 is nearly the original (noise
    std 0.01), ~500 keeps coarse shapes (the VCD default), 999 is pure noise (a_t = 4e-5).
    """
    alpha_bar = ALPHAS_CUMPROD[t]

    def noise(img: Image.Image) -> Image.Image:
        x0 = _to_unit(img) * 2.0 - 1.0
        xt = np.sqrt(alpha_bar) * x0 + np.sqrt(1.0 - alpha_bar) * rng.standard_normal(x0.shape)
        return _from_unit((xt + 1.0) / 2.0)

    return _each_image(sample, noise)


def gaussian(sample: dict, rng: np.random.Generator, *, sigma: float = 0.1) -> dict:
    """Add i.i.d. Gaussian pixel noise of std `sigma` in image-range units ([0, 1] = black..white).

    ``y = clip(x + sigma * eps, 0, 1)``. `sigma` in [0, 1]: 0.05 is mild, 0.25 makes small
    objects hard to read, 1 leaves little but noise.
    """
    return _each_image(sample, lambda img: _from_unit(_to_unit(img) + sigma * rng.standard_normal((img.height, img.width, 3))))


def blur(sample: dict, rng: np.random.Generator, *, radius: float = 2.0) -> dict:
    """Gaussian blur (PIL ``GaussianBlur``) with standard deviation `radius` in pixels.

    Typical: 1-2 softens, 4-8 removes textures and small text of a 224-px image; 0 is identity.
    """
    return _each_image(sample, lambda img: img.filter(ImageFilter.GaussianBlur(radius)))


def patch_mask(sample: dict, rng: np.random.Generator, *, ratio: float = 0.5, patch: int = 16) -> dict:
    """Zero (black out) ``round(ratio * n)`` of the ``n`` cells of a `patch` x `patch` pixel grid.

    The grid is ``ceil(H / patch) x ceil(W / patch)``, edge cells may be partial; cells are drawn
    without replacement. `ratio` in [0, 1] (fraction of cells, not of pixels); 16 px matches
    the patch size of common ViT encoders.
    """

    def mask(img: Image.Image) -> Image.Image:
        rows, cols = -(-img.height // patch), -(-img.width // patch)
        chosen = rng.choice(rows * cols, size=round(ratio * rows * cols), replace=False)
        cells = np.zeros(rows * cols, dtype=bool)
        cells[chosen] = True
        # Each pixel looks up its cell: (row // patch, col // patch).
        masked = cells.reshape(rows, cols)[np.arange(img.height)[:, None] // patch, np.arange(img.width) // patch]
        pixels = np.array(img)
        pixels[masked] = 0
        return Image.fromarray(pixels, "RGB")

    return _each_image(sample, mask)


def random_resized_crop(sample: dict, rng: np.random.Generator, *, scale: float = 0.5) -> dict:
    """Crop a random window covering `scale` of the image area, then resize it back (bicubic).

    mDPO-style image-conditional negative: the image is still plausible but details are lost or cut
    off. The window keeps the image's aspect ratio (side ``round(sqrt(scale) * side)``, at least
    1 px) and its position is uniform. `scale` in (0, 1]: 1 is identity, mDPO-like values are
    0.01-0.2 for a strong negative, 0.5 for a mild one.
    """

    def crop(img: Image.Image) -> Image.Image:
        width = max(1, round(np.sqrt(scale) * img.width))
        height = max(1, round(np.sqrt(scale) * img.height))
        left = int(rng.integers(0, img.width - width + 1))
        top = int(rng.integers(0, img.height - height + 1))
        return img.resize(img.size, Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))

    return _each_image(sample, crop)


def grayscale(sample: dict, rng: np.random.Generator) -> dict:
    """Remove colour: ITU-R 601 luma (PIL ``L``), returned as 3-channel RGB so processors still accept it."""
    return _each_image(sample, lambda img: img.convert("L").convert("RGB"))
