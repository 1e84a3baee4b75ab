"""Synthetic chest radiographs with known findings, sign boxes and matching reports.

Each study is a procedural PA chest film (body outline, two lungs with vascular markings, heart and
mediastinum, trachea, spine, posterior and anterior ribs, clavicles, diaphragm domes, film exposure,
blur and noise) with the signs of its positive findings drawn at random, anatomically plausible
places, a pixel box for every sign, and a radiology report written from phrase templates whose
labels are, by construction, exactly the 14 CheXpert codes stored for the study.

Conventions: images are displayed as PA films, so the patient's right is on the image's left. All
geometry is sampled in normalised anatomy coordinates (x right, y down, both in [0, 1]) and scaled to
pixels at render time, so signs keep their size relative to the thorax at 64 px and at 512 px.
A second view is the same patient and findings with another exposure, a small rotation/shift/zoom and
fresh noise; its boxes are mapped through that transform.

No Finding follows the CheXpert labeler: it is positive when no other label except Support Devices
is positive or uncertain, and is otherwise left unmentioned (null).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from tqdm import tqdm

from amrg.labels import LABELS, NUM_LABELS

__all__ = ["SyntheticStudy", "render_study", "synthesize"]

logger = logging.getLogger(__name__)

# Label indices (CheXbert order, amrg.labels.LABELS).
(
    _EC,
    _CARDIO,
    _OPACITY,
    _LESION,
    _EDEMA,
    _CONSOL,
    _PNEUMONIA,
    _ATELEC,
    _PTX,
    _EFFUSION,
    _PLEURAL_OTHER,
    _FRACTURE,
    _DEVICES,
    _NO_FINDING,
) = range(14)
_FINDINGS = tuple(range(_NO_FINDING))  # the 13 labels that can carry a sign

# Side index 0 is the patient's right (image left, x < 0.5), 1 the patient's left.
_SIGN = (-1.0, 1.0)
_SIDE_WORD = ("right", "left")
_ZONES = ("upper", "mid", "lower")
_BASE_OVERSHOOT = 0.1
# zlib level 3 encodes ~2x faster than PIL's default 6 for ~15% larger files (film noise barely compresses).
_PNG_LEVEL = 3
_RIB_DENSITY = 0.07
_ZONE_RANGE = {"upper": (0.12, 0.36), "mid": (0.38, 0.6), "lower": (0.62, 0.86)}  # fraction of lung height

# Label sampling (per study). Marginals come out at ~0.2 per finding; see tests/data/test_synthetic.py.
_P_NORMAL = 0.22
_P_FINDING = (0.22, 0.26, 0.26, 0.22, 0.2, 0.22, 0.22, 0.24, 0.18, 0.26, 0.18, 0.2, 0.26)
_P_UNCERTAIN = 0.07
_P_NEGATED = 0.5
_P_NEGATED_DEVICES = 0.08  # real reports rarely say "no support devices"


@dataclass
class SyntheticStudy:
    """One rendered study, without disk I/O.

    Attributes:
        images: one grayscale uint8 array [H, W] per view.
        labels: 14 CheXpert codes in CheXbert order: 1, 0, -1 (uncertain) or None (not mentioned).
        boxes: ``{"label": name, "view": int, "box": [x0, y0, x1, y1]}`` in pixel edges of that view
            (0 <= x0 < x1 <= W), one or more per positive or uncertain finding; none for No Finding.
        report: the radiology report; its sentences state exactly ``labels``.
    """

    images: list[np.ndarray]
    labels: list[int | None]
    boxes: list[dict]
    report: str


@dataclass
class _Anatomy:
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
        return (self.lung_top[side] + self.lung_base[side]) / 2

    def half(self, side: int) -> float:
        return (self.lung_base[side] - self.lung_top[side]) / 2

    def lung_cx(self, side: int) -> float:
        return 0.5 + _SIGN[side] * self.lung_sep[side]

    # The lung outline is a superellipse reaching _BASE_OVERSHOOT below the costophrenic angle and
    # cut by the diaphragm dome, which gives wide bases and sharp costophrenic angles.
    def vmid(self, side: int) -> float:
        return (self.lung_top[side] + self.lung_base[side] + _BASE_OVERSHOOT) / 2

    def vhalf(self, side: int) -> float:
        return (self.lung_base[side] + _BASE_OVERSHOOT - self.lung_top[side]) / 2


@dataclass
class _Sign:
    """A finding's drawing parameters, its boxes (anatomy coordinates) and report descriptors."""

    label: int
    params: dict
    boxes: list[tuple[float, float, float, float]]
    desc: dict


# ----------------------------------------------------------------------------------------------------
# sampling


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    top = u(0.1, 0.14)
    base_r = u(0.7, 0.75)
    return _Anatomy(
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


def _sample_codes(rng: np.random.Generator) -> list[int | None]:
    """Codes for the 13 findings (No Finding is derived later)."""
    pos = np.zeros(len(_FINDINGS), dtype=bool)
    draws = rng.random(len(_FINDINGS))
    extra = rng.random(6)
    if rng.random() >= _P_NORMAL:
        pos = draws < np.asarray(_P_FINDING)
        # Clinical correlations: pneumonia with consolidation/opacity, edema with a big heart and effusions.
        pos[_CONSOL] |= pos[_PNEUMONIA] and extra[0] < 0.4
        pos[_OPACITY] |= pos[_PNEUMONIA] and extra[1] < 0.3
        pos[_CARDIO] |= pos[_EDEMA] and extra[2] < 0.35
        pos[_EFFUSION] |= pos[_EDEMA] and extra[3] < 0.35
        pos[_ATELEC] |= pos[_EFFUSION] and extra[4] < 0.25
        if not pos.any():
            pos[int(extra[5] * len(_FINDINGS))] = True
    unc = rng.random(len(_FINDINGS)) < _P_UNCERTAIN
    neg = rng.random(len(_FINDINGS))
    codes: list[int | None] = []
    for j in _FINDINGS:
        if pos[j]:
            codes.append(-1 if unc[j] and j != _DEVICES else 1)
        else:
            p_neg = _P_NEGATED_DEVICES if j == _DEVICES else _P_NEGATED
            codes.append(0 if neg[j] < p_neg else None)
    return codes


def _lung_inside(a: _Anatomy, side: int, x: float, y: float) -> float:
    """The lung shape value q at a point (inside where q < 1 and above the dome)."""
    aa = (x - a.lung_cx(side)) / a.lung_w[side]
    b = (y - a.vmid(side)) / a.vhalf(side)
    q = aa * aa + (b * b if b < 0 else b**6)
    dome = a.lung_base[side] - a.dome_h[side] * max(0.0, 1 - aa * aa)
    return q if y < dome - 0.015 else 9.0


def _heart_q(a: _Anatomy, x: float, y: float) -> float:
    c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    dx, dy = x - a.heart_x, y - a.heart_y
    u, v = c * dx + s * dy, -s * dx + c * dy
    ra = ((x - _ra_x(a)) ** 2 + (y - a.heart_y - 0.01) ** 2) / a.heart_ra**2
    return min((u / a.heart_rx) ** 2 + (v / a.heart_ry) ** 2, ra)


def _ra_x(a: _Anatomy) -> float:
    return 0.5 - 0.6 * a.heart_ra


def _lung_point(
    rng: np.random.Generator, a: _Anatomy, sides: Sequence[int], zones: Sequence[str], margin: float
) -> tuple[int, str, float, float]:
    """A random point well inside a lung, off the heart and mediastinum, in one of the given zones."""
    side, zone, x, y = int(sides[0]), zones[0], a.lung_cx(sides[0]), a.mid(sides[0])
    for _ in range(60):
        side = int(sides[int(rng.integers(len(sides)))])
        zone = zones[int(rng.integers(len(zones)))]
        lo, hi = _ZONE_RANGE[zone]
        y = a.lung_top[side] + 2 * a.half(side) * rng.uniform(lo, hi)
        x = a.lung_cx(side) + _SIGN[side] * a.lung_w[side] * rng.uniform(-0.55, 0.7)
        clear_of_heart = _heart_q(a, x, y) > (1 + margin / a.heart_rx) ** 2
        clear_of_med = abs(x - 0.5) > a.med_w + a.med_widen + margin
        if _lung_inside(a, side, x, y) < 0.8 and clear_of_heart and clear_of_med:
            break
    return side, zone, x, y


def _location(side: int, zone: str, rng: np.random.Generator) -> str:
    """Where a sign is, in report words ("the right lower lobe", "the left mid lung")."""
    lobe = {"upper": "upper lobe", "mid": ("middle lobe", "lingula")[side], "lower": "lower lobe"}[zone]
    options = [f"the {_SIDE_WORD[side]} {zone} lung", f"the {_SIDE_WORD[side]} {zone} lung zone"]
    options.append("the lingula" if lobe == "lingula" else f"the {_SIDE_WORD[side]} {lobe}")
    return options[int(rng.integers(len(options)))]


def _box(cx: float, cy: float, hx: float, hy: float) -> tuple[float, float, float, float]:
    return (cx - hx, cy - hy, cx + hx, cy + hy)


def _sample_sign(label: int, rng: np.random.Generator, a: _Anatomy) -> _Sign:
    """Draw a finding's parameters; Enlarged Cardiomediastinum, Cardiomegaly and Fracture edit ``a``."""
    u = rng.uniform
    if label == _EC:
        a.med_widen = a.med_w * u(0.75, 1.05)
        hw = a.med_w + a.med_widen + 0.015
        return _Sign(label, {}, [(0.5 + a.med_bias - hw, 0.12, 0.5 + a.med_bias + hw, 0.47)], {})
    if label == _CARDIO:
        f = u(1.3, 1.45)
        a.heart_rx *= f
        a.heart_ry *= u(1.08, 1.16)
        a.heart_ra *= u(1.1, 1.25)
        c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
        hx = math.hypot(a.heart_rx * c, a.heart_ry * s)
        hy = math.hypot(a.heart_rx * s, a.heart_ry * c)
        sev = "mildly" if f < 1.35 else "moderately" if f < 1.4 else "markedly"
        box = (min(a.heart_x - hx, _ra_x(a) - a.heart_ra), a.heart_y - hy, a.heart_x + hx, a.heart_y + hy)
        return _Sign(label, {}, [box], {"sev": sev})
    if label == _OPACITY:
        side, zone, x, y = _lung_point(rng, a, (0, 1), _ZONES, 0.03)
        sx, sy = u(0.045, 0.062), u(0.05, 0.07)
        p = {"x": x, "y": y, "sx": sx, "sy": sy, "amp": u(0.19, 0.24), "side": side}
        return _Sign(label, p, [_box(x, y, 1.7 * sx, 1.7 * sy)], {"side": side, "zone": zone})
    if label == _LESION:
        side, zone, x, y = _lung_point(rng, a, (0, 1), _ZONES, 0.03)
        r = u(0.028, 0.04)
        p = {"x": x, "y": y, "r": r, "amp": u(0.3, 0.36), "lob": u(0.05, 0.15), "phase": u(0, 6.28)}
        cm = round(2 * r * 38, 1)  # ~38 cm across the film
        return _Sign(
            label, p, [_box(x, y, 1.25 * r + 0.004, 1.25 * r + 0.004)], {"side": side, "zone": zone, "cm": cm}
        )
    if label == _EDEMA:
        sx, sy, amp = u(0.065, 0.085), u(0.1, 0.125), u(0.15, 0.2)
        blobs, boxes = [], []
        for side in (0, 1):
            x = 0.5 + _SIGN[side] * (a.lung_sep[side] * 0.8)
            y = a.hilum_y + u(0.0, 0.04)
            blobs.append((x, y))
            boxes.append(_box(x, y, 1.6 * sx, 1.6 * sy))
        kerley = [
            (side, u(0.65, 0.9), u(0.0, 1.0)) for side in (0, 1) for _ in range(int(rng.integers(3, 6)))
        ]
        sev = "mild" if amp < 0.165 else "moderate"
        p = {"blobs": blobs, "sx": sx, "sy": sy, "amp": amp, "kerley": kerley}
        return _Sign(label, p, boxes, {"sev": sev})
    if label == _CONSOL:
        side, zone, x, y = _lung_point(rng, a, (0, 1), ("mid", "lower", "lower"), 0.05)
        n = int(rng.integers(4, 7))
        lobes = [(x + u(-0.045, 0.045), y + u(-0.04, 0.04), u(0.02, 0.034)) for _ in range(n)]
        bronchi = []
        for _ in range(int(rng.integers(2, 4))):
            ang = u(0, 6.28)
            ln = u(0.03, 0.05)
            bronchi.append((x, y, x + ln * math.cos(ang), y + ln * math.sin(ang)))
        x0 = min(lx - 1.6 * s for lx, _, s in lobes)
        x1 = max(lx + 1.6 * s for lx, _, s in lobes)
        y0 = min(ly - 1.6 * s for _, ly, s in lobes)
        y1 = max(ly + 1.6 * s for _, ly, s in lobes)
        p = {"lobes": lobes, "bronchi": bronchi, "amp": u(0.28, 0.34), "side": side}
        return _Sign(label, p, [(x0, y0, x1, y1)], {"side": side, "zone": zone})
    if label == _PNEUMONIA:
        side, zone, x, y = _lung_point(rng, a, (0, 1), ("upper", "mid", "lower", "lower"), 0.05)
        rad = u(0.045, 0.065)
        blobs = []
        for _ in range(int(rng.integers(7, 12))):
            r, t = rad * math.sqrt(rng.random()), u(0, 6.28)
            blobs.append((x + r * math.cos(t), y + r * math.sin(t), u(0.013, 0.024)))
        hw = rad + 0.045
        p = {"blobs": blobs, "amp": u(0.2, 0.25), "cap": u(0.28, 0.32), "side": side}
        return _Sign(label, p, [_box(x, y, hw, hw)], {"side": side, "zone": zone})
    if label == _ATELEC:
        side, zone, x, y = _lung_point(rng, a, (0, 1), ("mid", "lower", "lower"), 0.06)
        ln, ang, th = u(0.11, 0.16), u(-0.3, 0.3), u(0.009, 0.013)
        dx, dy = 0.5 * ln * math.cos(ang), 0.5 * ln * math.sin(ang)
        p = {"x0": x - dx, "y0": y - dy, "x1": x + dx, "y1": y + dy, "th": th, "amp": u(0.26, 0.32)}
        pad = th + 0.012
        box = (
            min(x - dx, x + dx) - pad,
            min(y - dy, y + dy) - pad,
            max(x - dx, x + dx) + pad,
            max(y - dy, y + dy) + pad,
        )
        return _Sign(label, p, [box], {"side": side, "zone": zone})
    if label == _PTX:
        side = int(rng.integers(2))
        gap = u(0.07, 0.13)
        y_end = a.lung_top[side] + 2 * a.half(side) * u(0.45, 0.7)
        lx, lw = a.lung_cx(side), a.lung_w[side]
        p = {"side": side, "gap": gap, "y_end": y_end}
        size = "small" if gap < 0.09 else "moderate" if gap < 0.115 else "large"
        box = (lx - lw - 0.01, a.lung_top[side] - a.half(side) * 0.05 - 0.01, lx + lw + 0.01, y_end + 0.02)
        return _Sign(label, p, [box], {"side": side, "size": size})
    if label == _EFFUSION:
        r = rng.random()
        sides = (0, 1) if r < 0.25 else ((0,) if r < 0.625 else (1,))
        h = u(0.08, 0.17)
        boxes = []
        for side in sides:
            lx, lw, base = a.lung_cx(side), a.lung_w[side], a.lung_base[side]
            boxes.append((lx - lw - 0.01, base - h - 0.03, lx + lw + 0.01, base + 0.01))
        size = "small" if h < 0.11 else "moderate" if h < 0.145 else "large"
        return _Sign(label, {"sides": sides, "h": h}, boxes, {"sides": sides, "size": size})
    if label == _PLEURAL_OTHER:
        side = int(rng.integers(2))
        y0 = a.lung_top[side] + 2 * a.half(side) * u(0.22, 0.45)
        ln, th = u(0.16, 0.26), u(0.016, 0.024)
        lx, lw = a.lung_cx(side), a.lung_w[side]
        p = {"side": side, "y0": y0, "y1": y0 + ln, "th": th, "amp": u(0.26, 0.32), "phase": u(0, 6.28)}
        xs = [lx + _SIGN[side] * lw * _lung_half_width(a, side, yy) for yy in np.linspace(y0, y0 + ln, 9)]
        box = (min(xs) - th - 0.012, y0 - 0.01, max(xs) + th + 0.012, y0 + ln + 0.01)
        return _Sign(label, p, [box], {"side": side})
    if label == _FRACTURE:
        side = int(rng.integers(2))
        d_f = u(0.2, 0.29)
        ks = list(range(3, 8))
        rng.shuffle(ks)
        k, yc = ks[0], 0.0
        for k in ks:
            yc = a.rib_y0 + (k + 0.5) * a.rib_sp + _rib_curve(a, d_f)
            x = 0.5 + _SIGN[side] * d_f
            if _lung_inside(a, side, x, yc) < 0.9:
                break
        shift = u(0.5, 0.7) * a.rib_sp * (1 if rng.random() < 0.5 else -1)
        frac = {
            "side": side,
            "k": k,
            "d": d_f,
            "gap": u(0.022, 0.032),
            "shift": shift,
            "callus": u(0.24, 0.3),
        }
        a.fractures.append(frac)
        x = 0.5 + _SIGN[side] * d_f
        hy = 0.5 * a.rib_sp + abs(shift) + 0.01
        box = (
            min(x - 0.035 * _SIGN[side], x + 0.05 * _SIGN[side]),
            yc - hy,
            max(x - 0.035 * _SIGN[side], x + 0.05 * _SIGN[side]),
            yc + hy,
        )
        return _Sign(label, frac, [box], {"side": side, "rib": k + 2})
    if label == _DEVICES:
        return _sample_devices(rng, a)
    raise AssertionError(f"no sign for label {label}")


def _bezier(p0: tuple, p1: tuple, p2: tuple, n: int = 10) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)
    xs = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t**2 * p2[0]
    ys = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t**2 * p2[1]
    return [(float(x), float(y)) for x, y in zip(xs, ys)]


def _poly_box(pts: Sequence[tuple[float, float]], pad: float) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad)


def _sample_devices(rng: np.random.Generator, a: _Anatomy) -> _Sign:
    u = rng.uniform
    kinds = [k for k, p in (("pacemaker", 0.45), ("ett", 0.45), ("line", 0.45)) if rng.random() < p]
    if not kinds:
        kinds = [("pacemaker", "ett", "line")[int(rng.integers(3))]]
    parts, boxes, desc = [], [], {"kinds": kinds}
    if "ett" in kinds:
        tip = a.carina_y - u(0.04, 0.075)
        x = 0.5 + a.med_bias
        pts = [(x, -0.02), (x + u(-0.005, 0.005), tip)]
        parts.append({"kind": "path", "pts": pts, "w": 0.013, "amp": 0.12})  # the tube
        parts.append(
            {"kind": "path", "pts": [(px - 0.006, py) for px, py in pts], "w": 0.004, "amp": 0.4}
        )  # its stripe
        boxes.append((x - 0.025, 0.0, x + 0.025, tip + 0.015))
        desc["ett_cm"] = max(2, round((a.carina_y - tip) * 70))
    if "line" in kinds:
        side = 0 if rng.random() < 0.7 else 1
        s = _SIGN[side]
        tip = (0.5 + s * 0.03 + a.med_bias, u(0.3, 0.37))
        if rng.random() < 0.5:  # internal jugular
            start, ctrl, entry = (0.5 + s * u(0.09, 0.12), -0.02), (0.5 + s * 0.07, 0.1), "internal jugular"
        else:  # subclavian
            start, ctrl, entry = (
                (0.5 + s * u(0.27, 0.33), u(0.12, 0.15)),
                (0.5 + s * 0.06, 0.16),
                "subclavian",
            )
        pts = _bezier(start, ctrl, tip)
        parts.append({"kind": "path", "pts": pts, "w": 0.006, "amp": 0.38})
        boxes.append(_poly_box(pts, 0.015))
        desc["line_side"], desc["line_entry"] = side, entry
    if "pacemaker" in kinds:
        side = 1 if rng.random() < 0.8 else 0
        s = _SIGN[side]
        cx, cy = 0.5 + s * u(0.2, 0.27), u(0.12, 0.18)
        w, h = u(0.08, 0.095), u(0.055, 0.065)
        parts.append({"kind": "can", "x": cx, "y": cy, "w": w, "h": h, "amp": 0.6})
        pts_all = [(cx - w / 2, cy - h / 2), (cx + w / 2, cy + h / 2)]
        n_leads = int(rng.integers(1, 3))
        for i in range(n_leads):
            end = (a.heart_x - 0.03 + 0.05 * i + u(-0.01, 0.01), a.heart_y + u(-0.02, 0.05))
            ctrl = (0.5 + u(-0.03, 0.03), u(0.2, 0.26))
            pts = _bezier((cx - s * w * 0.3, cy + h * 0.2), ctrl, end)
            parts.append({"kind": "path", "pts": pts, "w": 0.005, "amp": 0.38})
            pts_all += pts
        boxes.append(_poly_box(pts_all, 0.015))
        desc["pm_side"], desc["pm_leads"] = side, n_leads
    return _Sign(_DEVICES, {"parts": parts}, boxes, desc)


# ----------------------------------------------------------------------------------------------------
# rendering (density space: 0 air outside the body, ~0.12 aerated lung, ~0.5 heart/abdomen)


def _ramp(v: np.ndarray, w: float) -> np.ndarray:
    """Soft step: 0 for v << 0, 1 for v >> 0, linear over a width w (cheaper than a sigmoid)."""
    r = v * (1.0 / w)
    r += 0.5
    return _unit(r)


def _unit(r: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (ufuncs: np.clip's wrapper costs more than the work at 224 px)."""
    np.maximum(r, 0.0, out=r)
    return np.minimum(r, 1.0, out=r)


def _lung_half_width(a: _Anatomy, side: int, y: float) -> float:
    """Half-width of the lung at height y in units of lung_w (0 outside the lung's vertical range)."""
    b = (y - a.vmid(side)) / a.vhalf(side)
    rest = 1 - (b * b if b < 0 else b**6)
    return math.sqrt(rest) if rest > 0 else 0.0


def _rib_curve(a: _Anatomy, d: np.ndarray | float) -> np.ndarray | float:
    """Height offset of a posterior rib at distance d from the midline (ribs droop laterally)."""
    return a.rib_curve * (d - 0.08) ** 2


class _Canvas:
    """A square grid of pixel centres in anatomy coordinates plus window slicing helpers."""

    def __init__(self, size: int) -> None:
        self.size = size
        c = ((np.arange(size, dtype=np.float32) + 0.5) / size).astype(np.float32)
        self.x = c[None, :]  # [1, S]
        self.y = c[:, None]  # [S, 1]

    def window(self, box: tuple[float, float, float, float]) -> tuple[slice, slice, np.ndarray, np.ndarray]:
        """Rows/cols covering an anatomy box (clipped), and the window's x [1, w] and y [h, 1]."""
        s = self.size
        c0, c1 = max(0, int(box[0] * s) - 1), min(s, int(math.ceil(box[2] * s)) + 1)
        r0, r1 = max(0, int(box[1] * s) - 1), min(s, int(math.ceil(box[3] * s)) + 1)
        c1, r1 = max(c1, c0), max(r1, r0)
        return slice(r0, r1), slice(c0, c1), self.x[:, c0:c1], self.y[r0:r1, :]


def _segments_dist(x: np.ndarray, y: np.ndarray, pts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Distance from each window point to a polyline, [h, w]."""
    best = None
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        ll = dx * dx + dy * dy or 1e-12
        t = np.clip(((x - x0) * dx + (y - y0) * dy) * (1.0 / ll), 0.0, 1.0)
        d2 = (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best)


def _lung_fields(a: _Anatomy, cv: _Canvas) -> tuple[list[np.ndarray], np.ndarray]:
    """Each lung's soft mask [S, S] and the diaphragm height per column [1, S]."""
    lungs, domes = [], []
    for side in (0, 1):
        aa = (cv.x - a.lung_cx(side)) * (1.0 / a.lung_w[side])  # [1, S]
        dome = a.lung_base[side] - a.dome_h[side] * np.clip(1 - aa * aa, 0, 1)  # [1, S]
        domes.append(dome)
        lx, lw = a.lung_cx(side), a.lung_w[side] + 0.02
        rs, cs, x, y = cv.window((lx - lw, a.lung_top[side] - 0.02, lx + lw, a.lung_base[side] + 0.02))
        b = (y - a.vmid(side)) * (1.0 / a.vhalf(side))  # [h, 1]
        b2 = b * b
        bq = np.where(b < 0, b2, b2 * b2 * b2)  # round apex, square base
        lung = np.zeros((cv.size, cv.size), np.float32)
        lung[rs, cs] = _ramp(1 - (aa[:, cs] ** 2 + bq), 0.12) * _ramp(dome[:, cs] - y, 0.012)
        lungs.append(lung)
    dome_all = np.where(cv.x < 0.5, domes[0], domes[1])  # [1, S]
    return lungs, dome_all


def _heart(a: _Anatomy, cv: _Canvas) -> np.ndarray:
    c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    heart = np.zeros((cv.size, cv.size), np.float32)
    r = max(a.heart_rx, a.heart_ry) + 0.02
    rs, cs, x, y = cv.window(_box(a.heart_x, a.heart_y, r, r))
    dx, dy = x - a.heart_x, y - a.heart_y
    u = (c / a.heart_rx) * dx + (s / a.heart_rx) * dy  # [h, w]
    v = (-s / a.heart_ry) * dx + (c / a.heart_ry) * dy
    heart[rs, cs] = _ramp(1 - (u * u + v * v), 0.1)
    rs, cs, x, y = cv.window(_box(_ra_x(a), a.heart_y + 0.01, a.heart_ra + 0.01, a.heart_ra + 0.01))
    ra = _ramp(a.heart_ra - np.sqrt((x - _ra_x(a)) ** 2 + (y - a.heart_y - 0.01) ** 2), 0.01)
    heart[rs, cs] = np.maximum(heart[rs, cs], ra)
    return heart


def _ribs(a: _Anatomy, cv: _Canvas, dome_all: np.ndarray, body_half: np.ndarray) -> np.ndarray:
    """Posterior and anterior rib density (0..1), with fractures cut in."""
    d = np.abs(cv.x - 0.5)  # [1, S]
    t = cv.y - _rib_curve(a, d)  # [S, S]
    ph = (t - a.rib_y0) * (1.0 / a.rib_sp)
    k = np.floor(ph)
    fr = ph - k - 0.5
    ribs = np.maximum(1 - fr * fr * (1.0 / 0.23**2), 0)
    ribs *= (k >= 0) & (k < a.n_ribs)
    lateral = _ramp(d - 0.035, 0.01) * _ramp(body_half - d, 0.02)  # [?, S]
    ribs *= lateral
    ribs *= _ramp(dome_all + 0.05 - cv.y, 0.03)
    # Anterior ribs: fainter, descending towards the midline.
    for s in (-1, 1):
        rs, cs, x, y = cv.window(
            (min(0.5 + s * 0.1, 0.5 + s * 0.42), 0.15, max(0.5 + s * 0.1, 0.5 + s * 0.42), 0.8)
        )
        dw = np.abs(x - 0.5)
        ph2 = (y + 0.45 * dw - 0.22) * (1.0 / (a.rib_sp * 1.15))
        fr2 = ph2 - np.floor(ph2) - 0.5
        ant = np.maximum(1 - fr2 * fr2 * (1.0 / 0.2**2), 0) * ((ph2 >= 0) & (ph2 < 6))
        ribs[rs, cs] += 0.35 * ant * _ramp(dw - 0.12, 0.04) * _ramp(0.4 - dw, 0.04)
    for f in a.fractures:
        _cut_fracture(a, cv, ribs, f)
    return ribs


def _cut_fracture(a: _Anatomy, cv: _Canvas, ribs: np.ndarray, f: dict) -> None:
    """Break rib k at distance d: a gap, the lateral fragment displaced by ``shift``, and callus."""
    s = _SIGN[f["side"]]
    k, d_f, gap, shift = f["k"], f["d"], f["gap"], f["shift"]
    y_lo = a.rib_y0 + (k - 1) * a.rib_sp + _rib_curve(a, d_f) - abs(shift)
    y_hi = a.rib_y0 + (k + 2) * a.rib_sp + _rib_curve(a, 0.47) + abs(shift)
    x_in, x_out = 0.5 + s * (d_f - gap), 0.5 + s * 0.48
    rs, cs, x, y = cv.window((min(x_in, x_out), y_lo, max(x_in, x_out), y_hi))
    d = np.abs(x - 0.5)
    w = ribs[rs, cs]
    curve = _rib_curve(a, d)
    ph = (y - curve - a.rib_y0) * (1.0 / a.rib_sp)
    in_rib = np.floor(ph) == k
    lateral = d > d_f - gap / 2
    ph_s = (y - shift - curve - a.rib_y0) * (1.0 / a.rib_sp)
    fr_s = ph_s - k - 0.5
    moved = np.clip(1 - fr_s * fr_s * (1.0 / 0.23**2), 0, 1) * (np.abs(fr_s) < 0.5) * (d > d_f + gap / 2)
    moved *= _ramp(0.46 - d, 0.03)
    base = np.where(in_rib & lateral, 0.0, w)
    yc = a.rib_y0 + (k + 0.5) * a.rib_sp + _rib_curve(a, d_f)
    callus = np.exp(
        -(((d - d_f) / 0.028) ** 2 + ((y - yc - shift / 2) / (0.5 * a.rib_sp + 0.5 * abs(shift))) ** 2)
    )
    ribs[rs, cs] = np.maximum(base, moved) + (f["callus"] / _RIB_DENSITY) * callus


def _draw_signs(
    D: np.ndarray, signs: Sequence[_Sign], a: _Anatomy, cv: _Canvas, lung: np.ndarray, tex: np.ndarray
) -> None:
    """Add the additive signs to the density map in place (windowed for speed)."""
    for sg in signs:
        p = sg.params
        if sg.label == _OPACITY:
            rs, cs, x, y = cv.window(_box(p["x"], p["y"], 2.6 * p["sx"], 2.6 * p["sy"]))
            g = np.exp(-0.5 * (((x - p["x"]) / p["sx"]) ** 2 + ((y - p["y"]) / p["sy"]) ** 2))
            D[rs, cs] += p["amp"] * g * (0.85 + 0.3 * tex[rs, cs]) * lung[rs, cs]
        elif sg.label == _LESION:
            rs, cs, x, y = cv.window(_box(p["x"], p["y"], 1.6 * p["r"], 1.6 * p["r"]))
            dx, dy = x - p["x"], y - p["y"]
            r = p["r"] * (1 + p["lob"] * np.cos(3 * np.arctan2(dy, dx) + p["phase"]))
            D[rs, cs] += p["amp"] * _ramp(r - np.sqrt(dx * dx + dy * dy), 0.006)
        elif sg.label == _EDEMA:
            for bx, by in p["blobs"]:
                rs, cs, x, y = cv.window(_box(bx, by, 2.5 * p["sx"], 2.5 * p["sy"]))
                g = np.exp(-0.5 * (((x - bx) / p["sx"]) ** 2 + ((y - by) / p["sy"]) ** 2))
                D[rs, cs] += p["amp"] * g * (0.7 + 0.6 * tex[rs, cs]) * lung[rs, cs]
            for side, fy, fx in p["kerley"]:  # Kerley B lines: short horizontal lines at the lateral bases
                yy = a.lung_top[side] + 2 * a.half(side) * fy
                xe = a.lung_cx(side) + _SIGN[side] * a.lung_w[side] * _lung_half_width(a, side, yy)
                ln = 0.02 + 0.02 * fx
                pts = [(xe - _SIGN[side] * 0.004, yy), (xe - _SIGN[side] * ln, yy)]
                rs, cs, x, y = cv.window(_poly_box(pts, 0.01))
                D[rs, cs] += 0.12 * _ramp(0.003 - _segments_dist(x, y, pts), 0.003) * lung[rs, cs]
        elif sg.label == _CONSOL:
            x0, y0, x1, y1 = sg.boxes[0]
            rs, cs, x, y = cv.window((x0, y0, x1, y1))
            F = sum(np.exp(-0.5 * ((x - lx) ** 2 + (y - ly) ** 2) / (s * s)) for lx, ly, s in p["lobes"])
            mask = _ramp(F - 0.45, 0.25) * lung[rs, cs]
            air = sum(
                _ramp(0.0035 - _segments_dist(x, y, [(b[0], b[1]), (b[2], b[3])]), 0.003)
                for b in p["bronchi"]
            )
            D[rs, cs] += mask * (p["amp"] - 0.16 * np.minimum(air, 1.0))
        elif sg.label == _PNEUMONIA:
            rs, cs, x, y = cv.window(sg.boxes[0])
            acc = np.zeros((y.shape[0], x.shape[1]), np.float32)
            for bx, by, s in p["blobs"]:
                acc += np.exp(-0.5 * ((x - bx) ** 2 + (y - by) ** 2) / (s * s))
            mott = 0.7 + 0.6 * tex[rs, cs]
            D[rs, cs] += np.minimum(p["amp"] * acc * mott, p["cap"]) * lung[rs, cs]
        elif sg.label == _ATELEC:
            pts = [(p["x0"], p["y0"]), (p["x1"], p["y1"])]
            rs, cs, x, y = cv.window(sg.boxes[0])
            D[rs, cs] += p["amp"] * _ramp(p["th"] - _segments_dist(x, y, pts), 0.006) * lung[rs, cs]
        elif sg.label == _PLEURAL_OTHER:
            side = p["side"]
            rs, cs, x, y = cv.window(sg.boxes[0])
            b = (y - a.vmid(side)) / a.vhalf(side)
            rest = np.clip(1 - np.where(b < 0, b * b, b**6), 0, 1)
            xb = a.lung_cx(side) + _SIGN[side] * a.lung_w[side] * np.sqrt(rest)  # lateral wall [h, 1]
            th = p["th"] * (1 + 0.3 * np.sin(y * 60 + p["phase"]))
            dist = _SIGN[side] * (xb - x)  # inwards from the wall
            band = _ramp(th - dist, 0.006) * _ramp(dist + 0.01, 0.006)
            band *= _ramp(y - p["y0"], 0.02) * _ramp(p["y1"] - y, 0.02)
            D[rs, cs] += p["amp"] * band
        elif sg.label == _DEVICES:
            for part in p["parts"]:
                if part["kind"] == "path":
                    rs, cs, x, y = cv.window(_poly_box(part["pts"], part["w"] + 0.01))
                    line = _ramp(part["w"] - _segments_dist(x, y, part["pts"]), 0.004)
                    D[rs, cs] += part["amp"] * line
                else:
                    rs, cs, x, y = cv.window(
                        _box(part["x"], part["y"], part["w"] / 2 + 0.01, part["h"] / 2 + 0.01)
                    )
                    qx = np.abs(x - part["x"]) - part["w"] / 2 + 0.012
                    qy = np.abs(y - part["y"]) - part["h"] / 2 + 0.012
                    rr = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(
                        np.maximum(qx, qy), 0
                    )
                    D[rs, cs] += (
                        part["amp"] * _ramp(0.012 - rr, 0.004) * (1 - 0.25 * _ramp(-rr - 0.02, 0.004))
                    )


def _density(
    a: _Anatomy, signs: Sequence[_Sign], cv: _Canvas, tex: np.ndarray, vessels: np.ndarray
) -> np.ndarray:
    """The patient's density map [S, S] float32 with all signs drawn.

    ``tex`` and ``vessels`` are smooth noise fields [S, S]; the zero crossings of ``vessels`` become
    the curving, branching vascular markings.
    """
    x, y = cv.x, cv.y
    d = np.abs(x - 0.5)  # [1, S]
    t = np.clip((y - 0.0) * (1.0 / (a.shoulder_y + 0.06)), 0, 1)  # [S, 1]
    body_half = a.neck_w + (a.body_w - a.neck_w) * np.sqrt(t)  # [S, 1]
    # Soft tissue is thickest mid-chest and thins towards the skin line.
    thick = 0.7 + 0.3 * np.sqrt(np.maximum(1 - (d / a.body_w) ** 2, 0))  # [1, S]
    body = _ramp(body_half - d, 0.02)  # [S, S]
    body *= thick

    lungs, dome_all = _lung_fields(a, cv)
    by_label = {sg.label: sg for sg in signs}
    # Pneumothorax and effusion change the lungs themselves.
    ptx = None
    if _PTX in by_label:
        pp = by_label[_PTX].params
        side, gap = pp["side"], pp["gap"]
        s = _SIGN[side]
        lw, lx = a.lung_w[side], a.lung_cx(side)
        lw_in = lw - 0.6 * gap
        lx_in = lx - s * 0.3 * gap  # medial border stays, the lung retracts from apex and wall
        mid_in, half_in = a.vmid(side) + gap / 2, a.vhalf(side) - gap / 2
        aa = (x - lx_in) * (1.0 / lw_in)
        b = (y - mid_in) * (1.0 / half_in)
        b2 = b * b
        q_in = aa * aa + np.where(b < 0, b2, b2 * b2 * b2)
        below = _ramp(pp["y_end"] - y, 0.05)  # [S, 1]
        ptx = (1 - _ramp(1 - q_in, 0.1)) * lungs[side] * below
        pleural_line = _ramp(0.05 - np.abs(1 - q_in), 0.05) * lungs[side] * below
    fluid = None
    if _EFFUSION in by_label:
        pe = by_label[_EFFUSION].params
        fluid = np.zeros_like(lungs[0])
        for side in pe["sides"]:
            s = _SIGN[side]
            lat = np.clip(((x - a.lung_cx(side)) * s / a.lung_w[side] + 1) / 2, 0, 1)  # 0 medial, 1 lateral
            y_f = a.lung_base[side] - pe["h"] * (0.45 + 0.55 * lat**1.5)  # meniscus climbs the lateral wall
            fluid = np.maximum(fluid, _ramp(y - y_f, 0.03) * lungs[side])

    lung = np.maximum(lungs[0], lungs[1])
    heart = _heart(a, cv)
    hw = a.med_w + a.med_widen + 0.03
    rs, cs, xw, yw = cv.window((0.5 + a.med_bias - hw, 0.0, 0.5 + a.med_bias + hw, 1.0))
    mw = a.med_w + a.med_widen * np.exp(-(((yw - 0.3) / 0.11) ** 2))  # [S, 1]
    tissue = heart
    tissue[rs, cs] = np.maximum(heart[rs, cs], _ramp(mw - np.abs(xw - 0.5 - a.med_bias), 0.012))
    # Aortic knob on the patient's left of the upper mediastinum.
    rs, cs, xw, yw = cv.window(_box(0.5 + a.med_w, 0.27, 0.05, 0.05))
    knob = _ramp(0.033 - np.sqrt((xw - 0.5 - a.med_w) ** 2 + (yw - 0.27) ** 2), 0.01)
    tissue[rs, cs] = np.maximum(tissue[rs, cs], knob)
    abd = _ramp(y - dome_all, 0.015)  # liver / spleen below the domes

    air = lung * (1 - tissue)
    if fluid is not None:
        air *= 1 - fluid
    D = body * (0.27 + 0.23 * np.maximum(tissue, abd))
    D -= 0.17 * air
    if fluid is not None:
        D += 0.17 * fluid

    # Vascular markings radiating from each hilum, plus a mottled parenchymal texture.
    marks = np.zeros_like(D)
    for side in (0, 1):
        s = _SIGN[side]
        hx = 0.5 + s * 0.09
        rs, cs, xw, yw = cv.window(
            (
                min(hx, hx + s * 0.25) - 0.02,
                a.lung_top[side] - 0.02,
                max(hx, hx + s * 0.25) + 0.02,
                a.lung_base[side] + 0.02,
            )
        )
        dx, dy = (xw - hx) * s, yw - a.hilum_y
        r = np.sqrt(dx * dx + dy * dy)
        th = np.arctan2(dy, dx)
        # Vessels: zero crossings of smooth noise (curving, branching lines) plus faint radial trunks,
        # both fading from the hilum to the periphery.
        ridge = np.clip(1 - np.abs(vessels[rs, cs]) * 4, 0, 1)
        spokes = 0.5 + 0.5 * np.cos(a.mark_n * th + 1.5 * np.sin(8 * r + a.mark_phase[side]))
        spokes = spokes * spokes
        # Gating the noise ridges by the radial pattern breaks their closed loops into branch-like
        # segments that point away from the hilum.
        m = (1.3 * ridge * ridge * (0.25 + spokes) + 0.3 * spokes * spokes) * np.exp(r * (-1 / 0.2))
        marks[rs, cs] = m + 0.7 * np.exp(-((r * (1 / 0.045)) ** 2))
    # Lower zones are overlapped by more soft tissue (breasts, diaphragm) than the apices.
    zone = np.clip((y - 0.3) * 2.5, 0, 1)  # [S, 1]
    lung_tex = marks * 0.09 + 0.03 * tex + 0.04 * zone * zone
    if ptx is not None:
        lung_tex *= 1 - ptx
        D -= 0.07 * ptx
        D += 0.2 * pleural_line
    D += lung_tex * air

    ribs = _ribs(a, cv, dome_all, body_half)
    D += _RIB_DENSITY * ribs * (1 - 0.6 * tissue) * body
    # Spine behind the mediastinum: vertebral bodies with brighter end plates.
    spine = _ramp(0.032 - d, 0.008) * (0.7 + 0.3 * np.cos((y - a.rib_y0) * (2 * math.pi / 0.05)) ** 2)
    D += 0.07 * spine * _ramp(y - 0.02, 0.02)
    # Trachea (air column) and main bronchi.
    rs, cs, xw, yw = cv.window((0.4, 0.0, 0.6, a.carina_y + 0.08))
    tx = 0.5 + a.med_bias
    trach = _ramp(0.015 - np.abs(xw - tx), 0.006) * _ramp(a.carina_y - yw, 0.01)
    for s in (-1, 1):
        pts = [(tx, a.carina_y - 0.01), (tx + s * 0.06, a.carina_y + 0.06)]
        trach = np.maximum(trach, _ramp(0.01 - _segments_dist(xw, yw, pts), 0.005))
    D[rs, cs] -= 0.09 * trach
    # Clavicles.
    for s in (-1, 1):
        pts = [
            (0.5 + s * 0.04, a.clav_y + 0.025),
            (0.5 + s * a.clav_len * 0.5, a.clav_y - 0.005),
            (0.5 + s * a.clav_len, a.clav_y - 0.03),
        ]
        rs, cs, xw, yw = cv.window(_poly_box(pts, 0.03))
        D[rs, cs] += 0.12 * _ramp(0.012 - _segments_dist(xw, yw, pts), 0.006)
    # Gastric air bubble under the left dome.
    if a.gastric:
        gx, gy = 0.5 + 0.17, a.lung_base[1] + 0.02
        rs, cs, xw, yw = cv.window(_box(gx, gy, 0.06, 0.05))
        bub = _ramp(1 - ((xw - gx) / 0.045) ** 2 - ((yw - gy) / 0.03) ** 2, 0.3) * _ramp(
            yw - gy + 0.005, 0.01
        )
        D[rs, cs] -= 0.1 * bub

    _draw_signs(D, signs, a, cv, lung, tex)
    return D


@dataclass
class _View:
    gain: float
    fog: float
    vignette: float
    blur: float
    noise: float
    angle: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)

    def forward(self, px: float, py: float, size: int) -> tuple[float, float]:
        """Map a pixel position of the canonical rendering to this view."""
        c = size / 2
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        dx, dy = px - c, py - c
        return (
            c + self.shift[0] * size + self.scale * (ca * dx - sa * dy),
            c + self.shift[1] * size + self.scale * (sa * dx + ca * dy),
        )

    def inverse_coeffs(self, size: int) -> tuple[float, ...]:
        """PIL AFFINE coefficients (output pixel -> input pixel)."""
        c = size / 2
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        k = 1 / self.scale
        tx, ty = c + self.shift[0] * size, c + self.shift[1] * size
        # p_in = R^T (p_out - t) / s + c
        return (k * ca, k * sa, c - k * (ca * tx + sa * ty), -k * sa, k * ca, c - k * (-sa * tx + ca * ty))


def _sample_view(rng: np.random.Generator, index: int) -> _View:
    u = rng.uniform
    v = _View(gain=u(2.4, 2.9), fog=u(0.02, 0.05), vignette=u(0.1, 0.25), blur=u(0.4, 0.8), noise=u(1.5, 3.0))
    if index > 0:  # a second exposure of the same patient, repositioned
        v.angle, v.scale, v.shift = u(-0.05, 0.05), u(0.94, 1.04), (u(-0.03, 0.03), u(-0.03, 0.03))
    return v


def _film(D: np.ndarray, view: _View, cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Expose, reposition, blur and add quantum noise: density [S, S] -> uint8 film [S, S]."""
    size = cv.size
    # Film response 1 - exp(-gain * D) compresses the highlights; fog lifts the blacks; the vignette
    # darkens the corners. Written out so each step is one pass over the image.
    vig = (1 - view.vignette * 2 * ((cv.x - 0.5) ** 2 + (cv.y - 0.5) ** 2)) * 255  # [S, S], 191..255
    e = np.exp(np.maximum(D, 0) * -view.gain)  # (0, 1]
    e *= vig * (view.fog - 1)
    e += vig + 0.5  # = vig * (1 - (1 - fog) * e) + 0.5, within [0.5, 255.5)
    pil = Image.fromarray(e.astype(np.uint8))
    if view.angle != 0.0 or view.scale != 1.0 or view.shift != (0.0, 0.0):
        pil = pil.transform(
            (size, size),
            Image.Transform.AFFINE,
            view.inverse_coeffs(size),
            resample=Image.Resampling.BILINEAR,
            fillcolor=int(view.fog * 255),
        )
    pil = pil.filter(ImageFilter.GaussianBlur(view.blur * size / 224))
    # Quantum mottle; uniform noise of the same variance is much cheaper to draw than Gaussian.
    noise = rng.random((size, size), dtype=np.float32)
    noise -= 0.5
    noise *= view.noise * math.sqrt(12)
    noise += np.asarray(pil, dtype=np.float32) + 0.5
    return np.minimum(np.maximum(noise, 0, out=noise), 255, out=noise).astype(np.uint8)


def _texture(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Smooth zero-mean noise in [-1, 1] with ``grid`` cells across, [S, S]."""
    g = rng.uniform(-1, 1, size=(grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC))


def _pixel_box(box: tuple[float, float, float, float], view: _View, size: int) -> list[int]:
    x0, y0, x1, y1 = (v * size for v in box)
    pts = [view.forward(px, py, size) for px, py in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    bx0 = min(max(int(math.floor(min(xs))), 0), size - 1)
    by0 = min(max(int(math.floor(min(ys))), 0), size - 1)
    bx1 = max(min(int(math.ceil(max(xs))), size), bx0 + 1)
    by1 = max(min(int(math.ceil(max(ys))), size), by0 + 1)
    return [bx0, by0, bx1, by1]


# ----------------------------------------------------------------------------------------------------
# reports: every sentence carries the label codes it states


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _positive_sentence(sg: _Sign, rng: np.random.Generator) -> str:
    d, lab = sg.desc, sg.label
    if lab == _EC:
        return _pick(
            rng,
            [
                "There is widened mediastinum.",
                "Widened mediastinum is noted.",
                "Enlarged cardiomediastinum is present.",
                "The mediastinum is widened.",
            ],
        )
    if lab == _CARDIO:
        return _pick(
            rng,
            [
                "The heart is enlarged.",
                f"The heart is {d['sev']} enlarged.",
                "Cardiomegaly is present.",
                f"There is {d['sev'].removesuffix('ly')} cardiomegaly.",
            ],
        )
    if lab in (_OPACITY, _LESION, _CONSOL, _PNEUMONIA, _ATELEC):
        loc = _location(d["side"], d["zone"], rng)
        if lab == _OPACITY:
            return _pick(
                rng,
                [
                    f"There is a hazy opacity in {loc}.",
                    f"Ill-defined opacity in {loc}.",
                    f"A hazy opacity projects over {loc}.",
                ],
            )
        if lab == _LESION:
            return _pick(
                rng,
                [
                    f"There is a {d['cm']} cm nodule in {loc}.",
                    f"A well-circumscribed nodule projects over {loc}.",
                    f"{_cap(loc.removeprefix('the '))} pulmonary nodule measuring {d['cm']} cm.",
                ],
            )
        if lab == _CONSOL:
            return _pick(
                rng,
                [
                    f"There is consolidation in {loc} with air bronchograms.",
                    f"Dense consolidation in {loc}.",
                    f"Focal consolidation is present in {loc}.",
                ],
            )
        if lab == _PNEUMONIA:
            return _pick(
                rng,
                [
                    f"Findings are consistent with pneumonia in {loc}.",
                    f"There is pneumonia in {loc}.",
                    f"Patchy pneumonia in {loc}.",
                ],
            )
        base = f"the {_SIDE_WORD[d['side']]} lung base" if d["zone"] == "lower" else loc
        return _pick(
            rng,
            [
                f"Plate-like atelectasis in {base}.",
                f"There is linear atelectasis in {base}.",
                f"Subsegmental atelectasis in {loc}.",
            ],
        )
    if lab == _EDEMA:
        return _pick(
            rng,
            [
                f"There is {d['sev']} pulmonary edema.",
                "Bilateral perihilar edema is present.",
                f"Findings are consistent with {d['sev']} interstitial edema.",
                "Perihilar edema with Kerley B lines.",
            ],
        )
    if lab == _PTX:
        side = _SIDE_WORD[d["side"]]
        return _pick(
            rng,
            [
                f"There is a {d['size']} {side} apical pneumothorax.",
                f"A {d['size']} {side} pneumothorax is present.",
                f"{_cap(side)} apical pneumothorax is seen.",
            ],
        )
    if lab == _EFFUSION:
        if len(d["sides"]) == 2:
            return _pick(
                rng,
                [
                    f"{_cap(d['size'])} bilateral pleural effusions.",
                    f"There are {d['size']} bilateral pleural effusions.",
                    "Bilateral pleural effusions with blunting of the costophrenic angles.",
                ],
            )
        side = _SIDE_WORD[d["sides"][0]]
        return _pick(
            rng,
            [
                f"There is a {d['size']} {side} pleural effusion.",
                f"{_cap(d['size'])} {side} pleural effusion with blunting of the costophrenic angle.",
                f"Blunting of the {side} costophrenic angle consistent with a {d['size']} pleural effusion.",
            ],
        )
    if lab == _PLEURAL_OTHER:
        side = _SIDE_WORD[d["side"]]
        return _pick(
            rng,
            [
                f"There is {side} lateral pleural thickening.",
                f"Pleural thickening along the {side} lateral chest wall.",
                f"{_cap(side)} pleural thickening is noted.",
            ],
        )
    if lab == _FRACTURE:
        side, nth = _SIDE_WORD[d["side"]], _ordinal(d["rib"])
        return _pick(
            rng,
            [
                f"There is a displaced fracture of the {side} {nth} rib.",
                f"A healing fracture of the lateral {side} {nth} rib is seen.",
                f"{_cap(side)} {nth} rib fracture is noted.",
            ],
        )
    if lab == _DEVICES:
        parts = []
        if "ett" in d["kinds"]:
            parts.append(
                _pick(
                    rng,
                    [
                        f"An endotracheal tube terminates {d['ett_cm']} cm above the carina.",
                        "The endotracheal tube is in standard position.",
                    ],
                )
            )
        if "line" in d["kinds"]:
            side = _SIDE_WORD[d["line_side"]]
            parts.append(
                _pick(
                    rng,
                    [
                        f"A {side} {d['line_entry']} central line terminates in the superior vena cava.",
                        f"A {side}-sided central line tip projects over the superior vena cava.",
                    ],
                )
            )
        if "pacemaker" in d["kinds"]:
            side = _SIDE_WORD[d["pm_side"]]
            leads = "a lead" if d["pm_leads"] == 1 else "leads"
            parts.append(
                _pick(
                    rng,
                    [
                        f"A {side} chest wall pacemaker is present with {leads} projecting over the heart.",
                        f"A pacemaker is in place with {leads} in the right heart.",
                    ],
                )
            )
        return " ".join(parts)
    raise AssertionError(lab)


def _hedged_sentence(sg: _Sign, rng: np.random.Generator) -> str:
    d, lab = sg.desc, sg.label
    if lab in (_OPACITY, _LESION, _CONSOL, _PNEUMONIA, _ATELEC):
        loc = _location(d["side"], d["zone"], rng)
    phrase = {
        _EC: lambda: "widened mediastinum",
        _CARDIO: lambda: "mild cardiomegaly",
        _OPACITY: lambda: f"faint opacity in {loc}",
        _LESION: lambda: f"small nodule in {loc}",
        _EDEMA: lambda: "mild pulmonary edema",
        _CONSOL: lambda: f"consolidation in {loc}",
        _PNEUMONIA: lambda: f"early pneumonia in {loc}",
        _ATELEC: lambda: f"atelectasis in {loc}",
        _PTX: lambda: f"small {_SIDE_WORD[d['side']]} apical pneumothorax",
        _EFFUSION: lambda: (
            "small bilateral pleural effusions"
            if len(d["sides"]) == 2
            else f"small {_SIDE_WORD[d['sides'][0]]} pleural effusion"
        ),
        _PLEURAL_OTHER: lambda: f"{_SIDE_WORD[d['side']]} pleural thickening",
        _FRACTURE: lambda: f"nondisplaced {_SIDE_WORD[d['side']]} rib fracture",
    }[lab]()
    form = _pick(
        rng, ["Possible {}.", "Cannot exclude {}.", "Questionable {}.", "Findings may represent {}."]
    )
    return form.format(phrase)


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# (labels negated together, templates); a combined template is used only when all its labels are negated.
_NEGATIONS: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...] = (
    ((_CONSOL, _EFFUSION, _PTX), ("No focal consolidation, pleural effusion, or pneumothorax.",)),
    (
        (_EFFUSION, _PTX),
        (
            "No pleural effusion or pneumothorax.",
            "There is no pleural effusion or pneumothorax.",
            "No pneumothorax or pleural effusion.",
        ),
    ),
    ((_EC, _CARDIO), ("Heart size is normal and there is no widened mediastinum.",)),
    (
        (_EC,),
        (
            "No widened mediastinum.",
            "The cardiomediastinal silhouette is within normal limits.",
            "The mediastinum is not widened.",
        ),
    ),
    ((_CARDIO,), ("Heart size is normal.", "No cardiomegaly.", "The heart is not enlarged.")),
    ((_OPACITY,), ("No focal opacity.", "There is no focal airspace opacity.")),
    ((_LESION,), ("No pulmonary nodule.", "No suspicious pulmonary nodules.", "No nodule is seen.")),
    ((_EDEMA,), ("No pulmonary edema.", "There is no edema.")),
    ((_CONSOL,), ("No focal consolidation.", "There is no consolidation.")),
    ((_PNEUMONIA,), ("No evidence of pneumonia.", "There is no pneumonia.")),
    ((_ATELEC,), ("No atelectasis.", "No evidence of atelectasis.")),
    ((_PTX,), ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.")),
    (
        (_EFFUSION,),
        ("No pleural effusion.", "There is no pleural effusion.", "No evidence of pleural effusion."),
    ),
    ((_PLEURAL_OTHER,), ("No pleural thickening.", "There is no pleural thickening.")),
    ((_FRACTURE,), ("No acute fracture.", "No displaced rib fracture.", "No fracture is seen.")),
    ((_DEVICES,), ("No support devices.",)),
)
_LUNG_LABELS = (_OPACITY, _LESION, _EDEMA, _CONSOL, _PNEUMONIA, _ATELEC, _PTX, _EFFUSION)


def _impression_phrase(sg: _Sign) -> str:
    d, lab = sg.desc, sg.label
    side = lambda k="side": _SIDE_WORD[d[k]]  # noqa: E731
    return {
        _EC: lambda: "Widened mediastinum.",
        _CARDIO: lambda: "Cardiomegaly.",
        _OPACITY: lambda: f"{_cap(side())} {d['zone']} lung opacity.",
        _LESION: lambda: f"{_cap(side())} {d['zone']} lung nodule.",
        _EDEMA: lambda: "Pulmonary edema.",
        _CONSOL: lambda: f"{_cap(side())} {d['zone']} lung consolidation.",
        _PNEUMONIA: lambda: f"{_cap(side())} {d['zone']} lung pneumonia.",
        _ATELEC: lambda: f"{_cap(side())} atelectasis.",
        _PTX: lambda: f"{_cap(side())} pneumothorax.",
        _EFFUSION: lambda: (
            "Bilateral pleural effusions."
            if len(d["sides"]) == 2
            else f"{_cap(_SIDE_WORD[d['sides'][0]])} pleural effusion."
        ),
        _PLEURAL_OTHER: lambda: f"{_cap(side())} pleural thickening.",
        _FRACTURE: lambda: f"{_cap(side())} rib fracture.",
        _DEVICES: lambda: "Support devices as described.",
    }[lab]()


def _write_report(
    codes: Sequence[int | None], signs: dict[int, _Sign], rng: np.random.Generator
) -> tuple[str, list[int | None]]:
    """Compose a report for the 13 finding codes; return it with the codes its sentences state."""
    sentences: list[tuple[str, dict[int, int]]] = []
    for j in _FINDINGS:
        if codes[j] == 1:
            sentences.append((_positive_sentence(signs[j], rng), {j: 1}))
        elif codes[j] == -1:
            sentences.append((_hedged_sentence(signs[j], rng), {j: -1}))
    negated = {j for j in _FINDINGS if codes[j] == 0}
    active = {j for j in _FINDINGS if codes[j] in (1, -1)}
    for group, templates in _NEGATIONS:
        if set(group) <= negated and (len(group) == 1 or rng.random() < 0.6):
            if _CARDIO in active:  # a normal silhouette would contradict the big heart
                templates = tuple(t for t in templates if "silhouette" not in t)
            sentences.append((_pick(rng, templates), dict.fromkeys(group, 0)))
            negated -= set(group)
    assert not negated, negated
    if not active & set(_LUNG_LABELS) and rng.random() < 0.7:
        sentences.append((_pick(rng, ["The lungs are clear.", "The lungs are well expanded and clear."]), {}))
    if _FRACTURE not in active and rng.random() < 0.4:
        sentences.append(
            (
                _pick(
                    rng,
                    ["No acute osseous abnormality.", "The visualized osseous structures are unremarkable."],
                ),
                {},
            )
        )
    order = rng.permutation(len(sentences))
    body = [sentences[i] for i in order]
    positives = [j for j in _FINDINGS if codes[j] == 1]
    if positives:
        chosen = rng.permutation(positives)[: int(rng.integers(1, 3))]
        for j in sorted(int(c) for c in chosen):
            body.append((_impression_phrase(signs[j]), {j: 1}))
    elif not active:
        body.append(
            (
                _pick(
                    rng,
                    [
                        "No acute cardiopulmonary process.",
                        "No acute cardiopulmonary abnormality.",
                        "Normal chest radiograph.",
                    ],
                ),
                {},
            )
        )
    stated: list[int | None] = [None] * NUM_LABELS
    for _, said in body:
        for j, v in said.items():
            assert stated[j] in (None, v), (j, stated[j], v)
            stated[j] = v
    return " ".join(s for s, _ in body), stated


# ----------------------------------------------------------------------------------------------------
# public API


def render_study(
    rng: np.random.Generator, image_size: int, n_views: int, labels: Sequence[int | None] | None = None
) -> SyntheticStudy:
    """Render one study in memory.

    Args:
        rng: the study's random generator; the same generator state gives the same study.
        image_size: side of the square images in pixels.
        n_views: number of views (1 or more); every view shows the same findings.
        labels: optional 14 codes (CheXbert order: 1, 0, -1, None) to use instead of sampling them;
            the No Finding entry is ignored and derived from the others. Anatomy, each sign's
            placement and the noise come from separate streams of ``rng``, so changing one label
            leaves the rest of the film unchanged (tests compare such pairs); the one coupling is that
            lung signs are kept clear of a widened mediastinum or an enlarged heart.

    Returns:
        The study: views, labels, sign boxes (pixels) and report.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    if labels is not None and len(labels) != NUM_LABELS:
        raise ValueError(f"labels must have {NUM_LABELS} codes in CheXbert order, got {len(labels)}")
    seeds = rng.integers(0, 2**63 - 1, size=5 + NUM_LABELS)
    anat_rng, label_rng, view_rng, text_rng, tex_rng = (np.random.default_rng(int(s)) for s in seeds[:5])
    anatomy = _sample_anatomy(anat_rng)
    codes = _sample_codes(label_rng) if labels is None else [labels[j] for j in _FINDINGS]
    for j, c in enumerate(codes):
        if c not in (1, 0, -1, None):
            raise ValueError(f"labels[{j}] ({LABELS[j]}) is {c!r}; expected 1, 0, -1 or None")
    # Anatomy-changing signs first, so the others are placed around the enlarged heart/mediastinum.
    order = [_EC, _CARDIO, *(j for j in _FINDINGS if j not in (_EC, _CARDIO))]
    signs = {
        j: _sample_sign(j, np.random.default_rng(int(seeds[5 + j])), anatomy)
        for j in order
        if codes[j] in (1, -1)
    }
    report, stated = _write_report(codes, signs, text_rng)
    # CheXpert rule: support devices do not count against No Finding.
    active = any(stated[j] in (1, -1) for j in _FINDINGS if j != _DEVICES)
    stated[_NO_FINDING] = None if active else 1
    cv = _Canvas(image_size)
    tex, vessels = _texture(tex_rng, image_size, 12), _texture(tex_rng, image_size, 20)
    D = _density(anatomy, list(signs.values()), cv, tex, vessels)
    images, boxes = [], []
    for v in range(n_views):
        view = _sample_view(view_rng, v)
        images.append(_film(D, view, cv, view_rng))
        for j, sg in sorted(signs.items()):
            for b in sg.boxes:
                boxes.append({"label": LABELS[j], "view": v, "box": _pixel_box(b, view, image_size)})
    return SyntheticStudy(images=images, labels=stated, boxes=boxes, report=report)


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    problems = []
    if n < 1:
        problems.append(f"n must be >= 1, got {n}")
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            problems.append(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        total = val_fraction + test_fraction
        problems.append(f"val_fraction + test_fraction must be < 1 to leave a train split, got {total}")
    if problems:
        raise ValueError("synthesize: " + "; ".join(problems))
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return n - n_val - n_test, n_val, n_test


def synthesize(
    out: Path,
    n: int,
    seed: int = 0,
    image_size: int = 224,
    two_view_prob: float = 0.5,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
) -> Path:
    """Write n synthetic studies under out/ (out/images/<id>/<view>.png + out/annotation.json);
    return the annotation path. Deterministic by seed (same seed -> byte-identical files).

    Args:
        out: output folder (created).
        n: number of studies.
        seed: master seed; study i is rendered from ``default_rng([seed, i])``, so the first k studies
            of a larger run equal a run with n=k.
        image_size: side of the square PNGs in pixels.
        two_view_prob: probability that a study has a second view.
        val_fraction: share of studies in the val split (rounded).
        test_fraction: share of studies in the test split (rounded).
        progress: show a tqdm progress bar.

    Raises:
        ValueError: bad n, fractions, probability or image size (all problems listed).
    """
    n_train, n_val, n_test = _split_sizes(n, val_fraction, test_fraction)
    if not 0.0 <= two_view_prob <= 1.0:
        raise ValueError(f"synthesize: two_view_prob must be in [0, 1], got {two_view_prob}")
    if image_size < 16:
        raise ValueError(f"synthesize: image_size must be >= 16 pixels, got {image_size}")
    out = Path(out)
    ann_path = out / "annotation.json"
    out.mkdir(parents=True, exist_ok=True)
    if ann_path.exists():
        # Drop the old index first: a run that dies half-way must not leave it pointing at mixed images.
        logger.info("removing the previous %s before writing new images", ann_path)
        ann_path.unlink()
    perm = np.random.default_rng([seed, n, 1]).permutation(n)
    split_of = {}
    for rank, i in enumerate(perm):
        split_of[int(i)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    width = max(6, len(str(n - 1)))
    records: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for i in tqdm(range(n), desc="synth", disable=not progress):
        rng = np.random.default_rng([seed, i])
        n_views = 2 if rng.random() < two_view_prob else 1
        study = render_study(rng, image_size, n_views)
        sid = f"synth_{i:0{width}d}"
        rel = []
        (out / "images" / sid).mkdir(parents=True, exist_ok=True)
        for v, img in enumerate(study.images):
            path = f"images/{sid}/{v}.png"
            Image.fromarray(img).save(out / path, format="PNG", compress_level=_PNG_LEVEL)
            rel.append(path)
        split = split_of[i]
        records[split].append(
            {
                "id": sid,
                "report": study.report,
                "image_path": rel,
                "split": split,
                "labels": study.labels,
                "boxes": study.boxes,
            }
        )
    tmp = out / f".annotation.json.tmp{os.getpid()}"
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, ann_path)
    logger.info(
        "wrote %d synthetic studies (train %d, val %d, test %d) at %d px to %s",
        n,
        n_train,
        n_val,
        n_test,
        image_size,
        ann_path,
    )
    return ann_path
