"""Does an image show what its caption asks for?  A measurable check of the trained tiny model's pictures.

Each pixel is labelled with the nearest of the grammar's six colours.  A picture passes when

- colour: the asked background is the most common label, and the pixels not labelled background are mostly
  (>= 70%) the asked colour, covering at least 1.5% of the picture;
- shape: the asked colour's pixels fill their bounding box like the asked shape (a square ~1, a circle
  pi/4 ~0.79, a triangle ~0.5), the box is roughly square (sides within 1.6x), and a triangle is wider in its
  lower half than in its upper half.  The square/circle boundary, a fill of 0.87, lies between the two classes
  as the trained VAE reconstructs the rendered scenes at 64x64 (circles at most 0.86 for 95% of them, squares
  at least 0.89): an 8x smaller latent rounds a small square's corners;
- position: the asked colour's centroid lies in the asked quadrant, or within a fifth of the side from the
  centre when the caption names none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fluxrt.train.shapes import COLOURS, Scene

PALETTE = np.array(list(COLOURS.values()), np.float32)  # [6, 3]
NAMES = list(COLOURS)


@dataclass(frozen=True)
class Verdict:
    colour: bool
    shape: bool
    position: bool
    fill: float  # the asked colour's area over its bounding box's
    seen_shape: str | None

    @property
    def ok(self) -> bool:
        return self.colour and self.shape and self.position


def labels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> index of the nearest palette colour, [H, W]."""
    d = ((image.astype(np.float32)[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def shape_of(mask: np.ndarray) -> tuple[str | None, float]:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None, 0.0
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = float(len(ys) / (h * w))
    if max(h, w) > 1.6 * min(h, w):
        return None, fill
    if fill >= 0.87:
        return "square", fill
    if fill >= 0.65:
        return "circle", fill
    mid = ys.min() + h / 2
    upper, lower = (ys < mid).sum(), (ys >= mid).sum()
    return ("triangle" if lower > 1.3 * upper else None), fill


def judge(image: np.ndarray, scene: Scene) -> Verdict:
    """``image``: uint8 [H, W, 3]."""
    lab = labels(image)
    counts = np.bincount(lab.ravel(), minlength=len(NAMES))
    fg, bg = NAMES.index(scene.colour), NAMES.index(scene.background)
    mask = lab == fg
    region = lab != bg
    colour = (int(counts.argmax()) == bg and mask.sum() >= 0.015 * lab.size
              and mask.sum() >= 0.7 * max(region.sum(), 1))
    seen, fill = shape_of(mask)
    position = False
    if mask.any():
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / lab.shape[1], ys.mean() / lab.shape[0]
        if scene.position is None:
            position = abs(cx - 0.5) < 0.2 and abs(cy - 0.5) < 0.2
        else:
            want_y, want_x = scene.position.split()
            position = (cx < 0.5) == (want_x == "left") and (cy < 0.5) == (want_y == "top")
    return Verdict(bool(colour), seen == scene.shape, bool(position), fill, seen)


def rate(images, scenes) -> float:
    """The fraction of ``images`` (uint8 [H, W, 3] each) that pass for their scenes."""
    verdicts = [judge(np.asarray(im), s) for im, s in zip(images, scenes, strict=True)]
    return sum(v.ok for v in verdicts) / len(verdicts)
