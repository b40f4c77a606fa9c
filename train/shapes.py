"""The trained tiny model's data: plain-coloured shapes on plain backgrounds, rendered from a seed, with their
captions from a small grammar ("a red circle on a blue background", optionally ", top left").

Everything is numpy and deterministic from the seed; nothing is downloaded.  The scene of a caption:

- ``shape``: circle, square or triangle (pointing up), filled with ``colour``;
- ``background``: another of the colours, filling the rest;
- ``position``: absent (the shape near the centre, larger) or one of the four quadrants (the shape inside it).

Edges are anti-aliased by 4x4 supersampling, so every scene has one exact rendering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
CENTRES = {None: (0.5, 0.5), "top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
           "bottom right": (0.73, 0.73)}  # (x, y) as fractions of the side, y down
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    position: str | None = None  # None: near the centre

    def __post_init__(self) -> None:
        for name, value, allowed in (("colour", self.colour, tuple(COLOURS)), ("shape", self.shape, SHAPES),
                                     ("background", self.background, tuple(COLOURS)),
                                     ("position", self.position, (None,) + POSITIONS)):
            if value not in allowed:
                raise ValueError(f"scene {name} {value!r} is not one of {allowed}")
        if self.colour == self.background:
            raise ValueError(f"scene colour and background are both {self.colour!r}")

    @property
    def caption(self) -> str:
        text = f"a {self.colour} {self.shape} on a {self.background} background"
        return text if self.position is None else f"{text}, {self.position}"


def all_scenes() -> list[Scene]:
    """Every scene the grammar can say: 6 colours x 3 shapes x 5 backgrounds x 5 positions = 450."""
    return [Scene(c, s, b, p) for c in COLOURS for s in SHAPES for b in COLOURS if b != c
            for p in (None,) + POSITIONS]


def shape_mask(shape: str, cx, cy, r, side: int) -> np.ndarray:
    """Coverage in [0, 1], float32 [K, side, side], of K shapes centred at (cx, cy) with half-size r (arrays of
    K, in pixels)."""
    n = side * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE  # sample centres, pixels
    x, y = c[None, None, :], c[None, :, None]
    cx, cy, r = (np.asarray(v, np.float32)[:, None, None] for v in (cx, cy, r))
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    elif shape == "square":
        inside = (np.abs(x - cx) <= r * 0.886) & (np.abs(y - cy) <= r * 0.886)  # the circle's area
    elif shape == "triangle":  # pointing up, base 2r' at the bottom, height 2r'
        h = r * 1.15
        top = cy - h
        inside = (y >= top) & (y <= cy + h) & (np.abs(x - cx) <= (y - top) / 2)
    else:
        raise ValueError(f"shape {shape!r} is not one of {SHAPES}")
    k = inside.shape[0]
    return inside.reshape(k, side, SUPERSAMPLE, side, SUPERSAMPLE).mean(axis=(2, 4), dtype=np.float32)


def render(scenes: list[Scene], side: int, rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    """Images float32 [K, side, side, 3] in [0, 1]; each scene's size and placement jittered from ``rng``."""
    k = len(scenes)
    out = np.empty((k, side, side, 3), np.float32)
    centred = np.array([s.position is None for s in scenes])
    r = np.where(centred, rng.uniform(0.20, 0.30, k), rng.uniform(0.12, 0.17, k)) * side
    jitter = np.where(centred, 0.06, 0.03)[:, None] * rng.uniform(-1, 1, (k, 2))
    centre = np.array([CENTRES[s.position] for s in scenes]).reshape(k, 2) + jitter
    for shape in SHAPES:
        every = [i for i, s in enumerate(scenes) if s.shape == shape]
        for start in range(0, len(every), chunk):  # the supersampled masks of a chunk at a time
            idx = every[start:start + chunk]
            cover = shape_mask(shape, centre[idx, 0] * side, centre[idx, 1] * side, r[idx], side)[..., None]
            fg = np.array([COLOURS[scenes[i].colour] for i in idx], np.float32)[:, None, None] / 255
            bg = np.array([COLOURS[scenes[i].background] for i in idx], np.float32)[:, None, None] / 255
            out[idx] = cover * fg + (1 - cover) * bg
    return out


def sample_scenes(n: int, rng: np.random.Generator, positioned: float = 0.5) -> list[Scene]:
    """``n`` scenes drawn uniformly over colours, shapes and backgrounds; a fraction ``positioned`` of them in a
    quadrant."""
    names = list(COLOURS)
    scenes = []
    for _ in range(n):
        colour = names[rng.integers(len(names))]
        background = [c for c in names if c != colour][rng.integers(len(names) - 1)]
        position = POSITIONS[rng.integers(len(POSITIONS))] if rng.random() < positioned else None
        scenes.append(Scene(colour, SHAPES[rng.integers(len(SHAPES))], background, position))
    return scenes


def dataset(n: int, side: int, seed: int) -> tuple[list[Scene], np.ndarray]:
    """``n`` scenes and their images [n, side, side, 3], the same for the same arguments."""
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    return scenes, render(scenes, side, rng)
