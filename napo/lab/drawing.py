"""Placement and rendering of the bias lab's scenes (`napo.lab.scenes`): shapes at random sizes and positions,
drawn in jittered colours under Gaussian pixel noise. Pure functions of the recipe and the row's random generator."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

_GAP = 2  # pixels kept free between objects so that no two shapes touch


def place(
    rec: dict[str, Any], entries: list[tuple[str, str, int]], rng: np.random.Generator, disjoint_x: bool
) -> list[dict[str, Any]]:
    """Place every instance at a random size and position, _GAP px apart, sorted left to right.

    Each instance: {"name", "colour", "box": (x0, y0, x1, y1) inclusive pixel coordinates}. With
    disjoint_x the horizontal extents never overlap, so "left of" is unambiguous.
    """
    size = rec["image"]["size"]
    lo, hi = rec["image"]["object_size"]
    placed: list[dict[str, Any]] = []
    for name, colour, count in entries:
        for _ in range(count):
            for _attempt in range(1000):
                s = int(rng.integers(lo, hi + 1))
                x0, y0 = (int(v) for v in rng.integers(0, size - s + 1, size=2))
                box = (x0, y0, x0 + s - 1, y0 + s - 1)
                if all(_apart(box, p["box"], disjoint_x) for p in placed):
                    placed.append({"name": name, "colour": colour, "box": box})
                    break
            else:
                raise RuntimeError(
                    f"could not place {count} x {name} in a {size}px image; "
                    "lower image.object_size or scene.max_objects"
                )
    return sorted(placed, key=lambda p: p["box"][0])


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], disjoint_x: bool) -> bool:
    x_apart = a[2] + _GAP < b[0] or b[2] + _GAP < a[0]
    y_apart = a[3] + _GAP < b[1] or b[3] + _GAP < a[1]
    return x_apart if disjoint_x else (x_apart or y_apart)


def render(rec: dict[str, Any], instances: list[dict[str, Any]], rng: np.random.Generator) -> tuple[Image.Image, float]:
    """Draw the shapes in jittered colours on the background, then add Gaussian pixel noise of a std drawn from
    `image.noise` (one level, or one of a list). Returns (image, the std used)."""
    img_cfg = rec["image"]
    levels = img_cfg["noise"] if isinstance(img_cfg["noise"], list) else [img_cfg["noise"]]
    noise = float(levels[int(rng.integers(len(levels)))]) if len(levels) > 1 else float(levels[0])
    image = Image.new("RGB", (img_cfg["size"],) * 2, tuple(img_cfg["background"]))
    draw = ImageDraw.Draw(image)
    jitter = img_cfg["colour_jitter"]
    for inst in instances:
        rgb = np.asarray(rec["colours"][inst["colour"]]) + rng.integers(-jitter, jitter + 1, size=3)
        draw_shape(
            draw, rec["objects"][inst["name"]]["shape"], inst["box"], tuple(int(v) for v in np.clip(rgb, 0, 255))
        )
    if noise == 0:
        return image, noise
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(noise * 255)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)), noise


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]
) -> None:
    """Draw one filled shape inside box (inclusive pixel coordinates), in a single colour."""
    x0, y0, x1, y1 = box
    s = x1 - x0 + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    stroke = max(1, s // 4)
    band = max(2, s // 3)  # thickness of bars and of the arms of the cross
    b0 = (s - band) // 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=stroke)
    elif shape == "frame":
        draw.rectangle(box, outline=fill, width=stroke)
    elif shape == "cross":
        draw.rectangle((x0, y0 + b0, x1, y0 + b0 + band - 1), fill=fill)
        draw.rectangle((x0 + b0, y0, x0 + b0 + band - 1, y1), fill=fill)
    elif shape == "x":
        draw.line((x0, y0, x1, y1), fill=fill, width=stroke)
        draw.line((x0, y1, x1, y0), fill=fill, width=stroke)
    elif shape == "bar":
        draw.rectangle((x0, y0 + b0, x1, y0 + b0 + band - 1), fill=fill)
    elif shape == "column":
        draw.rectangle((x0 + b0, y0, x0 + b0 + band - 1, y1), fill=fill)
    else:  # half_disc: the upper half of a disc
        draw.pieslice(box, 180, 360, fill=fill)
