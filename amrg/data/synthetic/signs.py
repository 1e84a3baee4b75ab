"""Signs of the findings on a synthetic film: where each one goes, how it is drawn, its boxes and words.

``sample_sign`` places one finding's sign in an anatomy (Enlarged Cardiomediastinum, Cardiomegaly and
Fracture edit the anatomy itself) and records its boxes in anatomy coordinates and the descriptors
the report is written from; ``render.py`` draws it and ``prose.py`` words it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from amrg.data.synthetic.anatomy import (
    SIDE_SIGN,
    ZONES,
    Anatomy,
    centred_box,
    lung_half_width,
    lung_inside,
    lung_point,
    poly_box,
    ra_x,
    rib_curve,
)
from amrg.data.synthetic.labels import (
    ATELEC,
    CARDIO,
    CONSOL,
    DEVICES,
    EC,
    EDEMA,
    EFFUSION,
    FRACTURE,
    LESION,
    OPACITY,
    PLEURAL_OTHER,
    PNEUMONIA,
    PTX,
)

__all__ = ["Sign", "sample_sign"]


@dataclass
class Sign:
    """A finding's drawing parameters, its boxes (anatomy coordinates) and report descriptors."""

    label: int
    params: dict
    boxes: list[tuple[float, float, float, float]]
    desc: dict


def sample_sign(label: int, rng: np.random.Generator, a: Anatomy) -> Sign:
    """Draw a finding's parameters; Enlarged Cardiomediastinum, Cardiomegaly and Fracture edit ``a``."""
    u = rng.uniform
    if label == EC:
        a.med_widen = a.med_w * u(0.75, 1.05)
        hw = a.med_w + a.med_widen + 0.015
        return Sign(label, {}, [(0.5 + a.med_bias - hw, 0.12, 0.5 + a.med_bias + hw, 0.47)], {})
    if label == CARDIO:
        f = u(1.3, 1.45)
        a.heart_rx *= f
        a.heart_ry *= u(1.08, 1.16)
        a.heart_ra *= u(1.1, 1.25)
        c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
        hx = math.hypot(a.heart_rx * c, a.heart_ry * s)
        hy = math.hypot(a.heart_rx * s, a.heart_ry * c)
        sev = "mildly" if f < 1.35 else "moderately" if f < 1.4 else "markedly"
        box = (min(a.heart_x - hx, ra_x(a) - a.heart_ra), a.heart_y - hy, a.heart_x + hx, a.heart_y + hy)
        return Sign(label, {}, [box], {"sev": sev})
    if label == OPACITY:
        side, zone, x, y = lung_point(rng, a, (0, 1), ZONES, 0.03)
        sx, sy = u(0.045, 0.062), u(0.05, 0.07)
        p = {"x": x, "y": y, "sx": sx, "sy": sy, "amp": u(0.19, 0.24), "side": side}
        return Sign(label, p, [centred_box(x, y, 1.7 * sx, 1.7 * sy)], {"side": side, "zone": zone})
    if label == LESION:
        side, zone, x, y = lung_point(rng, a, (0, 1), ZONES, 0.03)
        r = u(0.028, 0.04)
        p = {"x": x, "y": y, "r": r, "amp": u(0.3, 0.36), "lob": u(0.05, 0.15), "phase": u(0, 6.28)}
        cm = round(2 * r * 38, 1)  # ~38 cm across the film
        return Sign(
            label,
            p,
            [centred_box(x, y, 1.25 * r + 0.004, 1.25 * r + 0.004)],
            {"side": side, "zone": zone, "cm": cm},
        )
    if label == EDEMA:
        sx, sy, amp = u(0.065, 0.085), u(0.1, 0.125), u(0.15, 0.2)
        blobs, boxes = [], []
        for side in (0, 1):
            x = 0.5 + SIDE_SIGN[side] * (a.lung_sep[side] * 0.8)
            y = a.hilum_y + u(0.0, 0.04)
            blobs.append((x, y))
            boxes.append(centred_box(x, y, 1.6 * sx, 1.6 * sy))
        kerley = [
            (side, u(0.65, 0.9), u(0.0, 1.0)) for side in (0, 1) for _ in range(int(rng.integers(3, 6)))
        ]
        sev = "mild" if amp < 0.165 else "moderate"
        p = {"blobs": blobs, "sx": sx, "sy": sy, "amp": amp, "kerley": kerley}
        return Sign(label, p, boxes, {"sev": sev})
    if label == CONSOL:
        side, zone, x, y = lung_point(rng, a, (0, 1), ("mid", "lower", "lower"), 0.05)
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
        return Sign(label, p, [(x0, y0, x1, y1)], {"side": side, "zone": zone})
    if label == PNEUMONIA:
        side, zone, x, y = lung_point(rng, a, (0, 1), ("upper", "mid", "lower", "lower"), 0.05)
        rad = u(0.045, 0.065)
        blobs = []
        for _ in range(int(rng.integers(7, 12))):
            r, t = rad * math.sqrt(rng.random()), u(0, 6.28)
            blobs.append((x + r * math.cos(t), y + r * math.sin(t), u(0.013, 0.024)))
        hw = rad + 0.045
        p = {"blobs": blobs, "amp": u(0.2, 0.25), "cap": u(0.28, 0.32), "side": side}
        return Sign(label, p, [centred_box(x, y, hw, hw)], {"side": side, "zone": zone})
    if label == ATELEC:
        side, zone, x, y = lung_point(rng, a, (0, 1), ("mid", "lower", "lower"), 0.06)
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
        return Sign(label, p, [box], {"side": side, "zone": zone})
    if label == PTX:
        side = int(rng.integers(2))
        gap = u(0.07, 0.13)
        y_end = a.lung_top[side] + 2 * a.half(side) * u(0.45, 0.7)
        lx, lw = a.lung_cx(side), a.lung_w[side]
        p = {"side": side, "gap": gap, "y_end": y_end}
        size = "small" if gap < 0.09 else "moderate" if gap < 0.115 else "large"
        box = (lx - lw - 0.01, a.lung_top[side] - a.half(side) * 0.05 - 0.01, lx + lw + 0.01, y_end + 0.02)
        return Sign(label, p, [box], {"side": side, "size": size})
    if label == EFFUSION:
        r = rng.random()
        sides = (0, 1) if r < 0.25 else ((0,) if r < 0.625 else (1,))
        h = u(0.08, 0.17)
        boxes = []
        for side in sides:
            lx, lw, base = a.lung_cx(side), a.lung_w[side], a.lung_base[side]
            boxes.append((lx - lw - 0.01, base - h - 0.03, lx + lw + 0.01, base + 0.01))
        size = "small" if h < 0.11 else "moderate" if h < 0.145 else "large"
        return Sign(label, {"sides": sides, "h": h}, boxes, {"sides": sides, "size": size})
    if label == PLEURAL_OTHER:
        side = int(rng.integers(2))
        y0 = a.lung_top[side] + 2 * a.half(side) * u(0.22, 0.45)
        ln, th = u(0.16, 0.26), u(0.016, 0.024)
        lx, lw = a.lung_cx(side), a.lung_w[side]
        p = {"side": side, "y0": y0, "y1": y0 + ln, "th": th, "amp": u(0.26, 0.32), "phase": u(0, 6.28)}
        xs = [lx + SIDE_SIGN[side] * lw * lung_half_width(a, side, yy) for yy in np.linspace(y0, y0 + ln, 9)]
        box = (min(xs) - th - 0.012, y0 - 0.01, max(xs) + th + 0.012, y0 + ln + 0.01)
        return Sign(label, p, [box], {"side": side})
    if label == FRACTURE:
        side = int(rng.integers(2))
        d_f = u(0.2, 0.29)
        ks = list(range(3, 8))
        rng.shuffle(ks)
        k, yc = ks[0], 0.0
        for k in ks:
            yc = a.rib_y0 + (k + 0.5) * a.rib_sp + rib_curve(a, d_f)
            x = 0.5 + SIDE_SIGN[side] * d_f
            if lung_inside(a, side, x, yc) < 0.9:
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
        x = 0.5 + SIDE_SIGN[side] * d_f
        hy = 0.5 * a.rib_sp + abs(shift) + 0.01
        box = (
            min(x - 0.035 * SIDE_SIGN[side], x + 0.05 * SIDE_SIGN[side]),
            yc - hy,
            max(x - 0.035 * SIDE_SIGN[side], x + 0.05 * SIDE_SIGN[side]),
            yc + hy,
        )
        return Sign(label, frac, [box], {"side": side, "rib": k + 2})
    if label == DEVICES:
        return _sample_devices(rng, a)
    raise AssertionError(f"no sign for label {label}")


def _bezier(p0: tuple, p1: tuple, p2: tuple, n: int = 10) -> list[tuple[float, float]]:
    t = np.linspace(0, 1, n)
    xs = (1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t**2 * p2[0]
    ys = (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t**2 * p2[1]
    return [(float(x), float(y)) for x, y in zip(xs, ys)]


def _sample_devices(rng: np.random.Generator, a: Anatomy) -> Sign:
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
        s = SIDE_SIGN[side]
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
        boxes.append(poly_box(pts, 0.015))
        desc["line_side"], desc["line_entry"] = side, entry
    if "pacemaker" in kinds:
        side = 1 if rng.random() < 0.8 else 0
        s = SIDE_SIGN[side]
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
        boxes.append(poly_box(pts_all, 0.015))
        desc["pm_side"], desc["pm_leads"] = side, n_leads
    return Sign(DEVICES, {"parts": parts}, boxes, desc)
