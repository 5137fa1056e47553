"""Procedural scenes: coloured shapes on a 3x3 grid, drawn deterministically with PIL.

All randomness comes from a `random.Random` passed in, so a seed fixes every pixel. Objects are
jittered in position, radius and colour, and the background is noisy, so two scenes with the same
description are almost never pixel-identical.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
# The "shift" domain keeps the colour names but uses darker, desaturated shades, so a model that
# learned the default palette sees a real distribution shift.
SHIFT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (160, 75, 70),
    "green": (85, 140, 90),
    "blue": (85, 105, 170),
    "yellow": (180, 170, 95),
    "purple": (130, 90, 150),
    "orange": (185, 125, 75),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
LOCATIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
DOMAINS = ("default", "shift")
CELLS = tuple((row, col) for row in range(3) for col in range(3))

# Radius as a fraction of a cell; the gap between them survives the +-8% radius jitter.
SIZE_RADIUS = {"small": 0.22, "large": 0.42}
RADIUS_JITTER = 0.08
MAX_CENTRE_JITTER = 0.15  # fraction of a cell; also capped so a shape stays inside its cell
COLOUR_JITTER = 14  # per channel, out of 255
SUPERSAMPLE = 4  # draw shapes at 4x and downsample, so small shapes keep their edges


@dataclass(frozen=True)
class Obj:
    """One shape in one grid cell."""

    colour: str
    shape: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {list(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if not (0 <= self.row < 3 and 0 <= self.col < 3):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the 3x3 grid")

    @property
    def location(self) -> str:
        """The name of this object's cell, e.g. "top left"."""
        return location_name(self.row, self.col)

    @property
    def kind(self) -> str:
        """Colour and shape, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A set of objects in distinct cells, drawn in one domain."""

    objects: tuple[Obj, ...]
    domain: str = "default"

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {DOMAINS}")
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must be in distinct cells, got {cells}")


def location_name(row: int, col: int) -> str:
    """The name of grid cell (row, col)."""
    return LOCATIONS[3 * row + col]


def random_scene(
    rng: random.Random,
    n_objects: int,
    domain: str = "default",
    *,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    sizes: Sequence[str] = SIZES,
    cells: Sequence[tuple[int, int]] = CELLS,
    distinct_kinds: bool = False,
) -> Scene:
    """A scene of `n_objects` random objects in distinct cells, drawn from the allowed choices.

    With `distinct_kinds`, no two objects share both colour and shape, so "the red circle" names
    exactly one object.
    """
    if not 0 <= n_objects <= len(cells):
        raise ValueError(f"n_objects must be in [0, {len(cells)}], got {n_objects}")
    if distinct_kinds and n_objects > len(colours) * len(shapes):
        raise ValueError(f"cannot draw {n_objects} distinct colour+shape kinds")
    chosen_cells = rng.sample(list(cells), n_objects)
    objects: list[Obj] = []
    kinds: set[tuple[str, str]] = set()
    for row, col in chosen_cells:
        while True:
            colour, shape = rng.choice(list(colours)), rng.choice(list(shapes))
            if not distinct_kinds or (colour, shape) not in kinds:
                break
        kinds.add((colour, shape))
        objects.append(Obj(colour, shape, rng.choice(list(sizes)), row, col))
    return Scene(tuple(objects), domain)


def _background(rng: random.Random, size: int, domain: str) -> Image.Image:
    noise = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    if domain == "default":
        # Near-white with faint noise: 236..251 per channel.
        return noise.point([236 + v * 16 // 256 for v in range(256)] * 3)
    # Dark and textured: coarse blotches (upsampled low-res noise) under fine grain.
    coarse_n = max(2, size // 8)
    coarse = Image.frombytes("RGB", (coarse_n, coarse_n), rng.randbytes(coarse_n * coarse_n * 3))
    coarse = coarse.resize((size, size), Image.Resampling.BILINEAR)
    coarse = coarse.point([15 + v * 50 // 256 for v in range(256)] * 3)
    fine = noise.point([v * 30 // 256 for v in range(256)] * 3)
    return Image.blend(coarse, fine, 0.4)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85  # a square of the same "radius" looks bigger than a circle; shrink it
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    raise ValueError(f"no polygon for shape {shape!r}")


def _jitter_colour(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int, int]:
    r, g, b = (min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in rgb)
    return (r, g, b, 255)


def draw(scene: Scene, rng: random.Random, image_size: int = 48) -> Image.Image:
    """Render a scene as an RGB image of `image_size` x `image_size` pixels."""
    if image_size < 12:
        raise ValueError(f"image_size must be at least 12, got {image_size}")
    palette = COLOURS if scene.domain == "default" else SHIFT_COLOURS
    image = _background(rng, image_size, scene.domain).convert("RGBA")
    big = image_size * SUPERSAMPLE
    cell = big / 3
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    pen = ImageDraw.Draw(layer)
    for obj in scene.objects:
        r = SIZE_RADIUS[obj.size] * cell * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
        # Small shapes can wander further than large ones without leaving their cell.
        shift = min(MAX_CENTRE_JITTER * cell, max(0.0, cell / 2 - r))
        cx = (obj.col + 0.5) * cell + rng.uniform(-shift, shift)
        cy = (obj.row + 0.5) * cell + rng.uniform(-shift, shift)
        fill = _jitter_colour(rng, palette[obj.colour])
        if obj.shape == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            pen.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    # Box-downsampling the 4x layer gives anti-aliased edges (RGBA resize premultiplies alpha).
    layer = layer.resize((image_size, image_size), Image.Resampling.BOX)
    return Image.alpha_composite(image, layer).convert("RGB")


def _describe(obj: Obj) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape} at {obj.location}"


def caption(scene: Scene) -> str:
    """A general caption naming every object's size, colour, shape and location, row-major."""
    parts = [_describe(o) for o in sorted(scene.objects, key=lambda o: (o.row, o.col))]
    if not parts:
        return "an empty picture."
    if len(parts) == 1:
        return f"{parts[0]}."
    return f"{', '.join(parts[:-1])} and {parts[-1]}."


def png_bytes(img: Image.Image) -> bytes:
    """Encode an image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def near_misses(scene: Scene) -> list[tuple[str, str]]:
    """(colour, shape) kinds not drawn that share the colour or the shape of a drawn object: asking
    about one, "no" needs the two attributes bound to one object."""
    present = {(o.colour, o.shape) for o in scene.objects}
    near = {(c, s) for c0, s0 in present for c in COLOURS for s in SHAPES if c == c0 or s == s0}
    return sorted(near - present)
