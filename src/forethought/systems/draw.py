"""A tiny anti-aliased rasterizer in NumPy, for `System.render` (no OpenGL, no display).

Shapes are given in world coordinates; `Canvas` maps its `extent` onto a square image. Each shape's
coverage comes from a signed distance in pixels, which gives smooth edges at any size (64x64 pixel
observations as well as 256x256 GIF frames).
"""

from __future__ import annotations

import numpy as np

Color = tuple[int, int, int]

BACKGROUND: Color = (245, 245, 240)
INK: Color = (40, 40, 48)
ACCENT: Color = (214, 90, 49)
BLUE: Color = (52, 101, 164)
GREEN: Color = (78, 154, 6)
GREY: Color = (160, 160, 160)


class Canvas:
    """A square RGB image with world coordinates `extent = (xmin, xmax, ymin, ymax)`, y up."""

    def __init__(self, size: int, extent: tuple[float, float, float, float],
                 background: Color = BACKGROUND):
        if not isinstance(size, (int, np.integer)) or size < 8:
            raise ValueError(f"render size must be an integer >= 8, got {size!r}")
        xmin, xmax, ymin, ymax = extent
        self.size = int(size)
        self.scale = self.size / max(xmax - xmin, ymax - ymin)  # pixels per world unit
        centres = (np.arange(self.size) + 0.5) / self.scale
        self.x = (xmin + centres)[None, :]
        self.y = (ymax - centres)[:, None]
        self.image = np.empty((self.size, self.size, 3), np.float32)
        self.image[:] = background

    def _paint(self, distance_px: np.ndarray, color: Color) -> None:
        """Blend `color` where the signed distance (pixels, negative inside) is below 0.5."""
        alpha = np.clip(0.5 - distance_px, 0.0, 1.0)[..., None]
        self.image = self.image * (1.0 - alpha) + np.asarray(color, np.float32) * alpha

    def line(self, p0, p1, width: float, color: Color = INK) -> None:
        """A segment with round caps, `width` in world units."""
        (x0, y0), (x1, y1) = p0, p1
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        s = 0.0 if length2 == 0 else np.clip(((self.x - x0) * dx + (self.y - y0) * dy) / length2, 0, 1)
        d = np.hypot(self.x - (x0 + s * dx), self.y - (y0 + s * dy))
        self._paint((d - width / 2) * self.scale, color)

    def circle(self, centre, radius: float, color: Color = INK) -> None:
        d = np.hypot(self.x - centre[0], self.y - centre[1])
        self._paint((d - radius) * self.scale, color)

    def rectangle(self, centre, width: float, height: float, color: Color = INK) -> None:
        """An axis-aligned box."""
        qx = np.abs(self.x - centre[0]) - width / 2
        qy = np.abs(self.y - centre[1]) - height / 2
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        inside = np.minimum(np.maximum(qx, qy), 0)
        self._paint((outside + inside) * self.scale, color)

    def polyline(self, points, width: float, color: Color = INK) -> None:
        for p0, p1 in zip(points[:-1], points[1:]):
            self.line(p0, p1, width, color)

    def to_uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.image), 0, 255).astype(np.uint8)
