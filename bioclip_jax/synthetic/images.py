"""Draws one synthetic organism image from the visual traits its taxonomy fixed.

Traits follow the tree: the kingdom fixes the background colours and the body plan
(animal, plant, fungus, cell, rod), phylum and class the body shape, order and family
the body colour, the genus a surface pattern, and the species epithet one named
trait (a red patch for "rubra", stripes for "striata", ...). Every image then gets
its own position, scale, rotation, mirror, lighting, clutter and noise, so a model
has to learn the traits rather than memorise pixels.

Shapes are signed distance functions in the organism's own frame (u along the body
axis, v across it, "up" is -v, body radius about 1), turned into anti-aliased
coverage per pixel; the whole image is a few dozen numpy operations.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

BODY_PLANS = ("animal", "plant", "fungus", "cell", "rod")
PATTERNS = ("plain", "rings", "rays", "mottled", "reticulate", "two_tone", "speckled", "gradient")

_RED = np.array([215.0, 25.0, 30.0])
_WHITE = np.array([240.0, 240.0, 234.0])
_BLACK = np.array([22.0, 22.0, 26.0])
_YELLOW = np.array([238.0, 205.0, 35.0])
_CREAM = np.array([245.0, 232.0, 195.0])
_HORN = np.array([70.0, 50.0, 38.0])
_WING = np.array([205.0, 225.0, 240.0])
_BODY_RADIUS = 0.32  # of the half image width, before per-image and trait scaling


@dataclasses.dataclass(frozen=True)
class Looks:
    """Everything the taxonomy fixes about how a species looks; colours are RGB in 0..255."""

    background: tuple[tuple[float, float, float], tuple[float, float, float]]  # top, bottom
    body_plan: str
    aspect: float  # body length / body height
    lobes: int  # bumps around the body outline (petals for plants)
    lobe_depth: float
    limbs: int  # legs, leaves or flagella, by body plan
    body_rgb: tuple[float, float, float]
    pattern: str
    pattern_rgb: tuple[float, float, float]
    pattern_scale: float
    trait: str  # the epithet's trait, see names.EPITHET_TRAITS


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes with fixed encoder settings (4:4:4, no optimisation, no metadata), so bytes repeat."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buffer.getvalue()


def render(looks: Looks, rng: np.random.Generator, size: int) -> np.ndarray:
    """An HxWx3 uint8 image of one individual of the species described by `looks`."""
    canvas = _Canvas(size, rng)
    canvas.background(looks)
    scale = rng.uniform(0.85, 1.15) * {"giant": 1.4, "tiny": 0.6}.get(looks.trait, 1.0)
    canvas.set_frame(
        centre=rng.uniform(-0.15, 0.15, size=2),
        radius=_BODY_RADIUS * scale,
        angle=rng.uniform(-0.55, 0.55),
        mirror=bool(rng.integers(0, 2)),
    )
    body_rgb = np.array({"white": _WHITE, "black": _BLACK, "yellow": _YELLOW}.get(looks.trait, looks.body_rgb))
    body_rgb = body_rgb * rng.uniform(0.93, 1.07, size=3)  # individual colour variation
    _Organism(canvas, looks, body_rgb).draw()
    return canvas.finish()


class _Canvas:
    """A float image plus the pixel coordinates in the organism frame."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.rng = rng
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
        self.x, self.y = np.meshgrid(axis, axis)  # image coordinates in [-1, 1], y down
        self.rgb = np.zeros((size, size, 3), np.float32)

    def background(self, looks: Looks) -> None:
        top, bottom = (np.array(c, np.float32) for c in looks.background)
        blend = ((self.y + 1.0) / 2.0)[..., None]
        self.rgb[:] = top * (1.0 - blend) + bottom * blend
        for _ in range(int(self.rng.integers(1, 4))):  # faint clutter in the background's colours
            centre = self.rng.uniform(-1.0, 1.0, size=2)
            radius = self.rng.uniform(0.1, 0.35)
            tint = (top if self.rng.integers(0, 2) else bottom) * self.rng.uniform(0.8, 1.15)
            sdf = np.hypot(self.x - centre[0], self.y - centre[1]) - radius
            self.paint(self.coverage(sdf * self.size / 2.0), tint, alpha=0.5)

    def set_frame(self, centre, radius: float, angle: float, mirror: bool) -> None:
        cos, sin = np.cos(angle), np.sin(angle)
        dx, dy = self.x - centre[0], self.y - centre[1]
        self.u = (dx * cos + dy * sin) / radius * (-1.0 if mirror else 1.0)
        self.v = (-dx * sin + dy * cos) / radius
        self.pixel = 2.0 / (self.size * radius)  # one pixel in frame units

    def coverage(self, sdf_in_pixels: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf_in_pixels, 0.0, 1.0)

    def cover(self, sdf: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage of a frame-unit signed distance."""
        return self.coverage(sdf / self.pixel)

    def paint(self, coverage: np.ndarray, rgb, alpha: float = 1.0) -> None:
        """Blends `rgb` in by coverage; only the rows and columns it touches are computed."""
        rows, cols = np.flatnonzero(coverage.any(axis=1)), np.flatnonzero(coverage.any(axis=0))
        if rows.size == 0:
            return
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        target = self.rgb[window]
        target += (coverage[window] * alpha)[..., None] * (np.asarray(rgb, np.float32) - target)

    def finish(self) -> np.ndarray:
        """Lighting (brightness, a light direction, a colour cast) and sensor noise."""
        direction = self.rng.uniform(-1.0, 1.0, size=2)
        light = self.rng.uniform(0.82, 1.15) + 0.12 * (direction[0] * self.x + direction[1] * self.y)
        cast = self.rng.uniform(0.95, 1.05, size=3)
        noise = self.rng.standard_normal(self.rgb.shape, dtype=np.float32) * self.rng.uniform(2.0, 7.0)
        pixels = self.rgb * light[..., None] * cast.astype(np.float32) + noise
        return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)

    # Signed distances in the organism frame.
    def circle(self, cu: float, cv: float, r: float) -> np.ndarray:
        return np.hypot(self.u - cu, self.v - cv) - r

    def capsule(self, a, b, r: float) -> np.ndarray:
        """Distance to the segment a-b minus r: limbs, stems, tails, horns."""
        (au, av), (bu, bv) = a, b
        du, dv = bu - au, bv - av
        t = np.clip(((self.u - au) * du + (self.v - av) * dv) / (du * du + dv * dv + 1e-9), 0.0, 1.0)
        return np.hypot(self.u - au - t * du, self.v - av - t * dv) - r


class _Organism:
    """Draws the body plan, pattern and epithet trait of one species onto a canvas."""

    def __init__(self, canvas: _Canvas, looks: Looks, body_rgb: np.ndarray):
        self.c = canvas
        self.looks = looks
        self.body_rgb = body_rgb
        self.dark = body_rgb * 0.55
        self.rng = canvas.rng

    def draw(self) -> None:
        plan = self.looks.body_plan
        self._behind_body()
        getattr(self, f"_appendages_{plan}")()
        body = self._body_sdf()
        body_cover = self.c.cover(body)
        self.c.paint(body_cover, self.body_rgb)
        self._pattern(body_cover)
        if plan == "animal":
            self._head()
        elif plan == "cell":
            self.c.paint(self.c.cover(np.abs(body) - 0.06), self.dark)  # membrane
            self.c.paint(self.c.cover(self.c.circle(0.15, -0.1, 0.25)), self.looks.pattern_rgb)  # nucleus
        elif plan == "plant":
            self.c.paint(self.c.cover(self.c.circle(0.0, 0.0, 0.3)), self.looks.pattern_rgb)  # flower disc
        self._trait_on_body(body, body_cover)

    # The body: a lobed ellipse; fungi cut it into a cap.
    def _body_sdf(self) -> np.ndarray:
        looks = self.looks
        su = self.c.u / looks.aspect
        rho = np.hypot(su, self.c.v)
        theta = np.arctan2(self.c.v, su)
        radius = 1.0 + looks.lobe_depth * np.cos(looks.lobes * theta)
        sdf = (rho - radius) * min(looks.aspect, 1.0)
        if looks.body_plan == "fungus":
            sdf = np.maximum(sdf, self.c.v - 0.25)  # flat underside of the cap
        return sdf

    def _half_length(self) -> float:
        return self.looks.aspect * (1.0 - 0.3 * self.looks.lobe_depth)

    def _appendages_animal(self) -> None:
        length = self._half_length()
        for i in range(self.looks.limbs):
            u = length * (-0.6 + 1.2 * (i + 0.5) / self.looks.limbs)
            self.c.paint(self.c.cover(self.c.capsule((u, 0.5), (u + 0.2, 1.45), 0.09)), self.dark)

    def _appendages_plant(self) -> None:
        self.c.paint(self.c.cover(self.c.capsule((0.0, 0.0), (0.0, 3.0), 0.1)), self.dark)  # stem
        for i in range(self.looks.limbs):  # leaves
            side = 1.0 if i % 2 == 0 else -1.0
            v = 1.5 + 0.6 * (i // 2)
            leaf = np.hypot((self.c.u - side * 0.55) / 0.55, (self.c.v - v) / 0.22) - 1.0
            self.c.paint(self.c.cover(leaf * 0.22), self.dark * 1.2)

    def _appendages_fungus(self) -> None:
        stalk_length = 0.9 + 0.35 * self.looks.limbs
        stalk = self.c.capsule((0.0, 0.2), (0.0, stalk_length), 0.28)
        self.c.paint(self.c.cover(stalk), _CREAM * 0.9)

    def _appendages_cell(self) -> None:
        self._flagella(start_u=-self.looks.aspect * 0.95)

    def _appendages_rod(self) -> None:
        self._flagella(start_u=-self.looks.aspect * 0.95)

    def _flagella(self, start_u: float) -> None:
        for i in range(self.looks.limbs):
            spread = (i - (self.looks.limbs - 1) / 2) * 0.5
            wave = self.c.capsule((start_u, spread * 0.4), (start_u - 1.1, spread * 1.2), 0.05)
            self.c.paint(self.c.cover(wave), self.dark)

    def _head(self) -> None:
        front = self._half_length() + 0.25
        self.c.paint(self.c.cover(self.c.circle(front, -0.15, 0.45)), self.body_rgb)
        self.c.paint(self.c.cover(self.c.circle(front + 0.15, -0.28, 0.1)), _BLACK)  # eye

    # The genus pattern, painted inside the body.
    def _pattern(self, body_cover: np.ndarray) -> None:
        looks, c = self.looks, self.c
        f = looks.pattern_scale
        if looks.pattern == "plain":
            return
        if looks.pattern == "rings":
            mask = c.cover((np.sin(np.hypot(c.u / looks.aspect, c.v) * 3.5 * f * np.pi) - 0.35) * -0.1)
        elif looks.pattern == "rays":
            mask = c.cover((np.sin(np.arctan2(c.v, c.u) * round(5 * f)) - 0.4) * -0.15)
        elif looks.pattern == "reticulate":
            lines = np.minimum(np.abs(np.sin(c.u * 3.0 * f)), np.abs(np.sin(c.v * 3.0 * f)))
            mask = c.cover((lines - 0.25) * 0.25)
        elif looks.pattern == "two_tone":
            mask = c.cover(-c.v - 0.05)
        elif looks.pattern == "gradient":
            mask = np.clip((c.u / looks.aspect + 1.0) / 2.0, 0.0, 1.0) ** 1.5
        elif looks.pattern in ("mottled", "speckled"):
            count, radius = (5, 0.35) if looks.pattern == "mottled" else (14, 0.1)
            sdf = np.full_like(c.u, np.inf)
            for _ in range(count):
                cu, cv = self.rng.uniform(-looks.aspect, looks.aspect), self.rng.uniform(-0.9, 0.9)
                sdf = np.minimum(sdf, c.circle(cu, cv, radius * self.rng.uniform(0.7, 1.3)))
            mask = c.cover(sdf)
        else:
            raise ValueError(f"unknown pattern {looks.pattern!r}; valid: {', '.join(PATTERNS)}")
        c.paint(mask * body_cover, looks.pattern_rgb, alpha=0.85)

    # The epithet's trait.
    def _behind_body(self) -> None:
        trait, c = self.looks.trait, self.c
        back = -self._half_length()
        if trait == "tail":
            sdf = np.minimum(c.capsule((back + 0.3, 0.0), (back - 0.9, 0.35), 0.14),
                             c.capsule((back - 0.9, 0.35), (back - 1.6, -0.2), 0.1))
            c.paint(c.cover(sdf), self.dark)
        elif trait == "horns":
            top = -0.85
            for side in (-0.35, 0.35):
                c.paint(c.cover(c.capsule((side, top), (side * 2.2, top - 0.85), 0.09)), _HORN)
        elif trait == "wings":
            for side in (-0.45, 0.45):
                wing = np.hypot((c.u - side) / 0.5, (c.v + 1.05) / 0.8) - 1.0
                c.paint(c.cover(wing * 0.5), _WING, alpha=0.85)
        elif trait == "bristles":
            for angle in np.linspace(0.0, 2.0 * np.pi, 14, endpoint=False):
                du, dv = np.cos(angle) * self.looks.aspect, np.sin(angle)
                c.paint(c.cover(c.capsule((0.0, 0.0), (du * 1.45, dv * 1.45), 0.045)), _BLACK)
        elif trait == "crest":
            for i in range(5):
                u = -0.5 + 0.25 * i
                tip = -1.55 - 0.25 * (1 - abs(i - 2) / 2)
                c.paint(c.cover(c.capsule((u, -0.6), (u * 1.2, tip), 0.07)), self.dark)

    def _trait_on_body(self, body: np.ndarray, body_cover: np.ndarray) -> None:
        trait, c, aspect = self.looks.trait, self.c, self.looks.aspect
        if trait == "red_patch":
            patch = np.hypot((c.u - 0.15 * aspect) / 0.65, (c.v + 0.1) / 0.55) - 1.0
            c.paint(c.cover(patch * 0.55) * body_cover, _RED)
        elif trait == "stripes":
            stripes = np.abs(np.sin(c.u * 3.2 * np.pi / aspect)) - 0.45
            c.paint(c.cover(stripes * 0.12) * body_cover, _BLACK, alpha=0.9)
        elif trait == "spots":
            sdf = np.full_like(c.u, np.inf)
            for _ in range(6):
                cu, cv = self.rng.uniform(-0.75, 0.75) * aspect, self.rng.uniform(-0.6, 0.6)
                sdf = np.minimum(sdf, c.circle(cu, cv, 0.2))
            c.paint(c.cover(sdf) * body_cover, _BLACK, alpha=0.9)
        elif trait == "eyespots":
            for cu in (-0.45 * aspect, 0.45 * aspect):
                for radius, rgb in ((0.34, _BLACK), (0.22, _WHITE), (0.09, _BLACK)):
                    c.paint(c.cover(c.circle(cu, 0.0, radius)), rgb)
        elif trait == "border":
            c.paint(c.cover(np.abs(body + 0.1) - 0.1), _WHITE)
        elif trait == "band":
            band = np.abs(c.u) - 0.3 * aspect
            c.paint(c.cover(band) * body_cover, _CREAM)
