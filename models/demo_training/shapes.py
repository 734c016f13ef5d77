"""The procedural ``shapes`` data set the built-in ``demo`` model is trained on.

A scene is one to three flat-coloured shapes on a plain or vertically graded neutral background,
each shape in its own cell of a 3 x 3 grid (``top left`` ... ``bottom right``), with a caption
in a small vocabulary::

    "a red circle at the top left and a blue square at the bottom"

Shapes are large (a circle's radius is up to 26 % of the image side) and their centres are
jittered inside their cell, so they often cross the horizontal strip boundaries a patch-parallel
run cuts the latent at: that is where missing neighbour context shows. Stripes run across the
whole image (vertical ones cross every strip).

Everything is drawn from a ``numpy`` generator seeded per scene, so scene ``i`` of seed ``s``
is the same on every machine. Images are ``float32`` arrays ``(3, size, size)`` in ``[-1, 1]``
(the VAE's range).

:func:`region_colour_shares` is the measuring half: which shape colours a region of a generated
image holds, so prompt fidelity is checked by a script, not by eye.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "Scene",
    "Shape",
    "caption_words",
    "placed_shape",
    "region_colour_shares",
    "region_slices",
    "render",
    "sample_scene",
    "shape_phrase",
]

#: shape colours, RGB in 0..255 (far apart from each other and from the neutral backgrounds)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}

#: background tones (neutral, so a shape colour is never mistaken for the background)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "light": (190, 190, 190),
    "grey": (120, 120, 120),
    "dark": (40, 40, 40),
}

SHAPES = ("circle", "square", "triangle", "stripe")

#: grid cell name -> (row, column) in the 3 x 3 grid, and the caption phrase
POSITIONS: dict[str, tuple[tuple[int, int], str]] = {
    "top left": ((0, 0), "at the top left"),
    "top": ((0, 1), "at the top"),
    "top right": ((0, 2), "at the top right"),
    "left": ((1, 0), "on the left"),
    "center": ((1, 1), "in the center"),
    "right": ((1, 2), "on the right"),
    "bottom left": ((2, 0), "at the bottom left"),
    "bottom": ((2, 1), "at the bottom"),
    "bottom right": ((2, 2), "at the bottom right"),
}

#: stripes are horizontal at the top/bottom and vertical on the left, center and right
STRIPE_POSITIONS = ("top", "bottom", "left", "center", "right")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    position: str  # a key of POSITIONS
    centre: tuple[float, float]  # (y, x) as fractions of the side
    size: float  # half-extent as a fraction of the side

    @property
    def phrase(self) -> str:
        return shape_phrase(self.colour, self.kind, self.position)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[str, str]  # top and bottom tone (equal: plain)

    @property
    def caption(self) -> str:
        return " and ".join(shape.phrase for shape in self.shapes)


def shape_phrase(colour: str, kind: str, position: str) -> str:
    """The caption of one shape: ``"an orange circle on the left"``."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {kind} {POSITIONS[position][1]}"


def caption_words() -> list[str]:
    """Every word a caption can use (the demo tokenizer's vocabulary)."""
    words = {"a", "an", "and"} | set(COLOURS) | set(SHAPES)
    for _, phrase in POSITIONS.values():
        words.update(phrase.split())
    return sorted(words)


def sample_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    """One random scene: 1..max_shapes shapes in distinct cells, distinct colours."""
    count = int(rng.integers(1, max_shapes + 1))
    colours = rng.permutation(list(COLOURS))[:count]
    cells = list(POSITIONS)
    shapes = []
    for colour in colours:
        kind = str(rng.choice(SHAPES))
        free = [c for c in cells if kind != "stripe" or c in STRIPE_POSITIONS]
        if not free:
            kind = "circle"
            free = cells
        position = str(rng.choice(free))
        cells.remove(position)
        shapes.append(placed_shape(rng, kind, str(colour), position))
    tones = list(BACKGROUNDS)
    top = str(rng.choice(tones))
    bottom = top if rng.random() < 0.5 else str(rng.choice(tones))
    return Scene(tuple(shapes), (top, bottom))


def placed_shape(rng: np.random.Generator, kind: str, colour: str, position: str) -> Shape:
    """A ``kind`` shape of ``colour`` in grid cell ``position``: centre jittered inside the cell
    (stripes sit on the cell's centre line), size drawn for its kind."""
    (row, col), _ = POSITIONS[position]
    jitter = rng.uniform(-0.08, 0.08, size=2)  # drawn for stripes too, so every shape takes the same draws
    centre = ((row + 0.5) / 3 + jitter[0], (col + 0.5) / 3 + jitter[1])
    if kind == "stripe":
        centre = ((row + 0.5) / 3, (col + 0.5) / 3)
        size = float(rng.uniform(0.06, 0.12))
    else:
        size = float(rng.uniform(0.12, 0.26))
    return Shape(kind, colour, position, (float(centre[0]), float(centre[1])), size)


def _mask(shape: Shape, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` on the pixel-centre grids ``yy``, ``xx`` (fractions of the side)."""
    cy, cx = shape.centre
    s = shape.size
    if shape.kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= s**2
    if shape.kind == "square":
        return (np.abs(yy - cy) <= s) & (np.abs(xx - cx) <= s)
    if shape.kind == "triangle":  # apex up, base 2s wide at cy + s
        inside_y = (yy >= cy - s) & (yy <= cy + s)
        half_width = (yy - (cy - s)) / 2.0
        return inside_y & (np.abs(xx - cx) <= half_width)
    if shape.kind == "stripe":
        if shape.position in ("top", "bottom"):
            return np.abs(yy - cy) <= s
        return np.abs(xx - cx) <= s
    raise ValueError(f"unknown shape kind {shape.kind!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, size: int = 256) -> np.ndarray:
    """The scene as a ``float32`` image ``(3, size, size)`` in ``[-1, 1]``; later shapes on top."""
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    top = np.asarray(BACKGROUNDS[scene.background[0]], np.float32)
    bottom = np.asarray(BACKGROUNDS[scene.background[1]], np.float32)
    image = top[:, None, None] * (1 - yy)[None] + bottom[:, None, None] * yy[None]
    for shape in scene.shapes:
        mask = _mask(shape, yy, xx)
        image[:, mask] = np.asarray(COLOURS[shape.colour], np.float32)[:, None]
    return image / 127.5 - 1.0


def region_slices(position: str, size: int) -> tuple[slice, slice]:
    """Rows and columns of the grid cell ``position`` in an image of side ``size``."""
    (row, col), _ = POSITIONS[position]
    edges = [round(i * size / 3) for i in range(4)]
    return slice(edges[row], edges[row + 1]), slice(edges[col], edges[col + 1])


def region_colour_shares(image: np.ndarray, position: str, max_distance: float = 80.0) -> dict[str, float]:
    """Share of the pixels of cell ``position`` nearest to each shape colour.

    ``image``: ``(3, H, W)`` in ``[-1, 1]`` or ``(H, W, 3)`` ``uint8``. A pixel counts for the
    colour of :data:`COLOURS` nearest to it (Euclidean RGB) when that is nearer than every
    background tone and within ``max_distance``; returns colour -> share of the cell's pixels.
    """
    if image.dtype == np.uint8:
        rgb = image.astype(np.float32)
    else:
        rgb = (np.transpose(image, (1, 2, 0)) + 1.0) * 127.5
    rows, cols = region_slices(position, rgb.shape[0])
    cell = rgb[rows, cols].reshape(-1, 3)
    names = list(COLOURS)
    palette = np.asarray([COLOURS[n] for n in names], np.float32)
    neutral = np.asarray(list(BACKGROUNDS.values()), np.float32)
    d_colour = np.linalg.norm(cell[:, None, :] - palette[None], axis=2)
    d_neutral = np.linalg.norm(cell[:, None, :] - neutral[None], axis=2).min(axis=1)
    nearest = d_colour.argmin(axis=1)
    best = d_colour.min(axis=1)
    counted = (best < d_neutral) & (best <= max_distance)
    total = max(1, cell.shape[0])
    return {name: float(np.sum(counted & (nearest == i)) / total) for i, name in enumerate(names)}
