"""Patient anatomy of a synthetic film: sampling and the geometry helpers the signs and the renderer share.

All geometry is in normalised anatomy coordinates (x right, y down, both in [0, 1]); images are
displayed as PA films, so the patient's right (side index 0) is on the image's left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "SIDE_SIGN",
    "ZONES",
    "Anatomy",
    "centred_box",
    "heart_q",
    "lung_half_width",
    "lung_inside",
    "lung_point",
    "poly_box",
    "ra_x",
    "rib_curve",
    "sample_anatomy",
]

# Side index 0 is the patient's right (image left, x < 0.5), 1 the patient's left.
SIDE_SIGN = (-1.0, 1.0)
ZONES = ("upper", "mid", "lower")
_BASE_OVERSHOOT = 0.1
_ZONE_RANGE = {"upper": (0.12, 0.36), "mid": (0.38, 0.6), "lower": (0.62, 0.86)}  # fraction of lung height


@dataclass
class Anatomy:
    """Patient geometry in normalised coordinates; index [0] is the patient's right, [1] the left."""

    body_w: float
    neck_w: float
    shoulder_y: float
    lung_sep: tuple[float, float]
    lung_w: tuple[float, float]
    lung_top: tuple[float, float]
    lung_base: tuple[float, float]
    dome_h: tuple[float, float]
    heart_x: float
    heart_y: float
    heart_rx: float
    heart_ry: float
    heart_tilt: float
    heart_ra: float  # right atrium (right heart border) radius
    med_w: float
    med_bias: float
    carina_y: float
    hilum_y: float
    rib_y0: float
    rib_sp: float
    rib_curve: float
    n_ribs: int
    clav_y: float
    clav_len: float
    mark_n: float
    mark_phase: tuple[float, float]
    gastric: bool
    med_widen: float = 0.0  # Enlarged Cardiomediastinum
    fractures: list[dict] = field(default_factory=list)

    def mid(self, side: int) -> float:
        """Centre height of a lung."""
        return (self.lung_top[side] + self.lung_base[side]) / 2

    def half(self, side: int) -> float:
        """Half the height of a lung (apex to costophrenic angle)."""
        return (self.lung_base[side] - self.lung_top[side]) / 2

    def lung_cx(self, side: int) -> float:
        """Centre x of a lung."""
        return 0.5 + SIDE_SIGN[side] * self.lung_sep[side]

    # The lung outline is a superellipse reaching _BASE_OVERSHOOT below the costophrenic angle and
    # cut by the diaphragm dome, which gives wide bases and sharp costophrenic angles.
    def vmid(self, side: int) -> float:
        """Centre height of the lung outline (superellipse)."""
        return (self.lung_top[side] + self.lung_base[side] + _BASE_OVERSHOOT) / 2

    def vhalf(self, side: int) -> float:
        """Half height of the lung outline (superellipse)."""
        return (self.lung_base[side] + _BASE_OVERSHOOT - self.lung_top[side]) / 2


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random adult PA thorax (the right hemidiaphragm higher, the heart to the left)."""
    u = rng.uniform
    top = u(0.1, 0.14)
    base_r = u(0.7, 0.75)
    return Anatomy(
        body_w=u(0.41, 0.46),
        neck_w=u(0.08, 0.1),
        shoulder_y=u(0.1, 0.14),
        lung_sep=(u(0.18, 0.2), u(0.19, 0.21)),
        lung_w=(u(0.145, 0.16), u(0.135, 0.15)),
        lung_top=(top + u(-0.01, 0.01), top + u(-0.01, 0.01)),
        lung_base=(base_r, base_r + u(0.015, 0.035)),  # the right hemidiaphragm sits higher
        dome_h=(u(0.05, 0.075), u(0.04, 0.065)),
        heart_x=0.5 + u(0.04, 0.06),
        heart_y=u(0.61, 0.645),
        heart_rx=u(0.14, 0.155),
        heart_ry=u(0.105, 0.12),
        heart_tilt=u(-0.4, -0.2),
        heart_ra=u(0.06, 0.07),
        med_w=u(0.052, 0.062),
        med_bias=u(-0.008, 0.008),
        carina_y=u(0.33, 0.37),
        hilum_y=u(0.4, 0.44),
        rib_y0=u(0.05, 0.07),
        rib_sp=u(0.058, 0.066),
        rib_curve=u(1.2, 1.5),
        n_ribs=10,
        clav_y=u(0.13, 0.16),
        clav_len=u(0.24, 0.3),
        mark_n=float(rng.integers(13, 19)),
        mark_phase=(u(0, 6.28), u(0, 6.28)),
        gastric=bool(rng.random() < 0.6),
    )


def lung_inside(a: Anatomy, side: int, x: float, y: float) -> float:
    """The lung shape value q at a point (inside where q < 1 and above the dome)."""
    aa = (x - a.lung_cx(side)) / a.lung_w[side]
    b = (y - a.vmid(side)) / a.vhalf(side)
    q = aa * aa + (b * b if b < 0 else b**6)
    dome = a.lung_base[side] - a.dome_h[side] * max(0.0, 1 - aa * aa)
    return q if y < dome - 0.015 else 9.0


def heart_q(a: Anatomy, x: float, y: float) -> float:
    """The heart shape value at a point: < 1 inside the tilted ellipse or the right atrium."""
    c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    dx, dy = x - a.heart_x, y - a.heart_y
    u, v = c * dx + s * dy, -s * dx + c * dy
    ra = ((x - ra_x(a)) ** 2 + (y - a.heart_y - 0.01) ** 2) / a.heart_ra**2
    return min((u / a.heart_rx) ** 2 + (v / a.heart_ry) ** 2, ra)


def ra_x(a: Anatomy) -> float:
    """x of the right atrium's centre (it makes the right heart border)."""
    return 0.5 - 0.6 * a.heart_ra


def lung_point(
    rng: np.random.Generator, a: Anatomy, sides: Sequence[int], zones: Sequence[str], margin: float
) -> tuple[int, str, float, float]:
    """A random point well inside a lung, off the heart and mediastinum, in one of the given zones."""
    side, zone, x, y = int(sides[0]), zones[0], a.lung_cx(sides[0]), a.mid(sides[0])
    for _ in range(60):
        side = int(sides[int(rng.integers(len(sides)))])
        zone = zones[int(rng.integers(len(zones)))]
        lo, hi = _ZONE_RANGE[zone]
        y = a.lung_top[side] + 2 * a.half(side) * rng.uniform(lo, hi)
        x = a.lung_cx(side) + SIDE_SIGN[side] * a.lung_w[side] * rng.uniform(-0.55, 0.7)
        clear_of_heart = heart_q(a, x, y) > (1 + margin / a.heart_rx) ** 2
        clear_of_med = abs(x - 0.5) > a.med_w + a.med_widen + margin
        if lung_inside(a, side, x, y) < 0.8 and clear_of_heart and clear_of_med:
            break
    return side, zone, x, y


def centred_box(cx: float, cy: float, hx: float, hy: float) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` around a centre with half-sizes ``hx``, ``hy``."""
    return (cx - hx, cy - hy, cx + hx, cy + hy)


def poly_box(pts: Sequence[tuple[float, float]], pad: float) -> tuple[float, float, float, float]:
    """The bounding box of points, grown by ``pad`` on every side."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad)


def lung_half_width(a: Anatomy, side: int, y: float) -> float:
    """Half-width of the lung at height y in units of lung_w (0 outside the lung's vertical range)."""
    b = (y - a.vmid(side)) / a.vhalf(side)
    rest = 1 - (b * b if b < 0 else b**6)
    return math.sqrt(rest) if rest > 0 else 0.0


def rib_curve(a: Anatomy, d: np.ndarray | float) -> np.ndarray | float:
    """Height offset of a posterior rib at distance d from the midline (ribs droop laterally)."""
    return a.rib_curve * (d - 0.08) ** 2
