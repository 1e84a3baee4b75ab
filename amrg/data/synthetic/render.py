"""Rendering a synthetic film: density map (anatomy and signs), film exposure, views and pixel boxes.

The patient is drawn in density space (0 air outside the body, ~0.12 aerated lung, ~0.5
heart/abdomen) on a ``Canvas`` of pixel centres, then exposed as film. A second view is the same
density with another exposure, a small rotation/shift/zoom and fresh noise; ``pixel_box`` maps a
sign's anatomy box through that transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from amrg.data.synthetic.anatomy import (
    SIDE_SIGN,
    Anatomy,
    centred_box,
    lung_half_width,
    poly_box,
    ra_x,
    rib_curve,
)
from amrg.data.synthetic.labels import (
    ATELEC,
    CONSOL,
    DEVICES,
    EDEMA,
    EFFUSION,
    LESION,
    OPACITY,
    PLEURAL_OTHER,
    PNEUMONIA,
    PTX,
)
from amrg.data.synthetic.signs import Sign

__all__ = ["Canvas", "View", "expose_film", "noise_texture", "pixel_box", "render_density", "sample_view"]

_RIB_DENSITY = 0.07


def _ramp(v: np.ndarray, w: float) -> np.ndarray:
    """Soft step: 0 for v << 0, 1 for v >> 0, linear over a width w (cheaper than a sigmoid)."""
    r = v * (1.0 / w)
    r += 0.5
    return _unit(r)


def _unit(r: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (ufuncs: np.clip's wrapper costs more than the work at 224 px)."""
    np.maximum(r, 0.0, out=r)
    return np.minimum(r, 1.0, out=r)


class Canvas:
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


def _lung_fields(a: Anatomy, cv: Canvas) -> tuple[list[np.ndarray], np.ndarray]:
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


def _heart(a: Anatomy, cv: Canvas) -> np.ndarray:
    c, s = math.cos(a.heart_tilt), math.sin(a.heart_tilt)
    heart = np.zeros((cv.size, cv.size), np.float32)
    r = max(a.heart_rx, a.heart_ry) + 0.02
    rs, cs, x, y = cv.window(centred_box(a.heart_x, a.heart_y, r, r))
    dx, dy = x - a.heart_x, y - a.heart_y
    u = (c / a.heart_rx) * dx + (s / a.heart_rx) * dy  # [h, w]
    v = (-s / a.heart_ry) * dx + (c / a.heart_ry) * dy
    heart[rs, cs] = _ramp(1 - (u * u + v * v), 0.1)
    rs, cs, x, y = cv.window(centred_box(ra_x(a), a.heart_y + 0.01, a.heart_ra + 0.01, a.heart_ra + 0.01))
    ra = _ramp(a.heart_ra - np.sqrt((x - ra_x(a)) ** 2 + (y - a.heart_y - 0.01) ** 2), 0.01)
    heart[rs, cs] = np.maximum(heart[rs, cs], ra)
    return heart


def _ribs(a: Anatomy, cv: Canvas, dome_all: np.ndarray, body_half: np.ndarray) -> np.ndarray:
    """Posterior and anterior rib density (0..1), with fractures cut in."""
    d = np.abs(cv.x - 0.5)  # [1, S]
    t = cv.y - rib_curve(a, d)  # [S, S]
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


def _cut_fracture(a: Anatomy, cv: Canvas, ribs: np.ndarray, f: dict) -> None:
    """Break rib k at distance d: a gap, the lateral fragment displaced by ``shift``, and callus."""
    s = SIDE_SIGN[f["side"]]
    k, d_f, gap, shift = f["k"], f["d"], f["gap"], f["shift"]
    y_lo = a.rib_y0 + (k - 1) * a.rib_sp + rib_curve(a, d_f) - abs(shift)
    y_hi = a.rib_y0 + (k + 2) * a.rib_sp + rib_curve(a, 0.47) + abs(shift)
    x_in, x_out = 0.5 + s * (d_f - gap), 0.5 + s * 0.48
    rs, cs, x, y = cv.window((min(x_in, x_out), y_lo, max(x_in, x_out), y_hi))
    d = np.abs(x - 0.5)
    w = ribs[rs, cs]
    curve = rib_curve(a, d)
    ph = (y - curve - a.rib_y0) * (1.0 / a.rib_sp)
    in_rib = np.floor(ph) == k
    lateral = d > d_f - gap / 2
    ph_s = (y - shift - curve - a.rib_y0) * (1.0 / a.rib_sp)
    fr_s = ph_s - k - 0.5
    moved = np.clip(1 - fr_s * fr_s * (1.0 / 0.23**2), 0, 1) * (np.abs(fr_s) < 0.5) * (d > d_f + gap / 2)
    moved *= _ramp(0.46 - d, 0.03)
    base = np.where(in_rib & lateral, 0.0, w)
    yc = a.rib_y0 + (k + 0.5) * a.rib_sp + rib_curve(a, d_f)
    callus = np.exp(
        -(((d - d_f) / 0.028) ** 2 + ((y - yc - shift / 2) / (0.5 * a.rib_sp + 0.5 * abs(shift))) ** 2)
    )
    ribs[rs, cs] = np.maximum(base, moved) + (f["callus"] / _RIB_DENSITY) * callus


def _draw_signs(
    D: np.ndarray, signs: Sequence[Sign], a: Anatomy, cv: Canvas, lung: np.ndarray, tex: np.ndarray
) -> None:
    """Add the additive signs to the density map in place (windowed for speed)."""
    for sg in signs:
        p = sg.params
        if sg.label == OPACITY:
            rs, cs, x, y = cv.window(centred_box(p["x"], p["y"], 2.6 * p["sx"], 2.6 * p["sy"]))
            g = np.exp(-0.5 * (((x - p["x"]) / p["sx"]) ** 2 + ((y - p["y"]) / p["sy"]) ** 2))
            D[rs, cs] += p["amp"] * g * (0.85 + 0.3 * tex[rs, cs]) * lung[rs, cs]
        elif sg.label == LESION:
            rs, cs, x, y = cv.window(centred_box(p["x"], p["y"], 1.6 * p["r"], 1.6 * p["r"]))
            dx, dy = x - p["x"], y - p["y"]
            r = p["r"] * (1 + p["lob"] * np.cos(3 * np.arctan2(dy, dx) + p["phase"]))
            D[rs, cs] += p["amp"] * _ramp(r - np.sqrt(dx * dx + dy * dy), 0.006)
        elif sg.label == EDEMA:
            for bx, by in p["blobs"]:
                rs, cs, x, y = cv.window(centred_box(bx, by, 2.5 * p["sx"], 2.5 * p["sy"]))
                g = np.exp(-0.5 * (((x - bx) / p["sx"]) ** 2 + ((y - by) / p["sy"]) ** 2))
                D[rs, cs] += p["amp"] * g * (0.7 + 0.6 * tex[rs, cs]) * lung[rs, cs]
            for side, fy, fx in p["kerley"]:  # Kerley B lines: short horizontal lines at the lateral bases
                yy = a.lung_top[side] + 2 * a.half(side) * fy
                xe = a.lung_cx(side) + SIDE_SIGN[side] * a.lung_w[side] * lung_half_width(a, side, yy)
                ln = 0.02 + 0.02 * fx
                pts = [(xe - SIDE_SIGN[side] * 0.004, yy), (xe - SIDE_SIGN[side] * ln, yy)]
                rs, cs, x, y = cv.window(poly_box(pts, 0.01))
                D[rs, cs] += 0.12 * _ramp(0.003 - _segments_dist(x, y, pts), 0.003) * lung[rs, cs]
        elif sg.label == CONSOL:
            x0, y0, x1, y1 = sg.boxes[0]
            rs, cs, x, y = cv.window((x0, y0, x1, y1))
            F = sum(np.exp(-0.5 * ((x - lx) ** 2 + (y - ly) ** 2) / (s * s)) for lx, ly, s in p["lobes"])
            mask = _ramp(F - 0.45, 0.25) * lung[rs, cs]
            air = sum(
                _ramp(0.0035 - _segments_dist(x, y, [(b[0], b[1]), (b[2], b[3])]), 0.003)
                for b in p["bronchi"]
            )
            D[rs, cs] += mask * (p["amp"] - 0.16 * np.minimum(air, 1.0))
        elif sg.label == PNEUMONIA:
            rs, cs, x, y = cv.window(sg.boxes[0])
            acc = np.zeros((y.shape[0], x.shape[1]), np.float32)
            for bx, by, s in p["blobs"]:
                acc += np.exp(-0.5 * ((x - bx) ** 2 + (y - by) ** 2) / (s * s))
            mott = 0.7 + 0.6 * tex[rs, cs]
            D[rs, cs] += np.minimum(p["amp"] * acc * mott, p["cap"]) * lung[rs, cs]
        elif sg.label == ATELEC:
            pts = [(p["x0"], p["y0"]), (p["x1"], p["y1"])]
            rs, cs, x, y = cv.window(sg.boxes[0])
            D[rs, cs] += p["amp"] * _ramp(p["th"] - _segments_dist(x, y, pts), 0.006) * lung[rs, cs]
        elif sg.label == PLEURAL_OTHER:
            side = p["side"]
            rs, cs, x, y = cv.window(sg.boxes[0])
            b = (y - a.vmid(side)) / a.vhalf(side)
            rest = np.clip(1 - np.where(b < 0, b * b, b**6), 0, 1)
            xb = a.lung_cx(side) + SIDE_SIGN[side] * a.lung_w[side] * np.sqrt(rest)  # lateral wall [h, 1]
            th = p["th"] * (1 + 0.3 * np.sin(y * 60 + p["phase"]))
            dist = SIDE_SIGN[side] * (xb - x)  # inwards from the wall
            band = _ramp(th - dist, 0.006) * _ramp(dist + 0.01, 0.006)
            band *= _ramp(y - p["y0"], 0.02) * _ramp(p["y1"] - y, 0.02)
            D[rs, cs] += p["amp"] * band
        elif sg.label == DEVICES:
            for part in p["parts"]:
                if part["kind"] == "path":
                    rs, cs, x, y = cv.window(poly_box(part["pts"], part["w"] + 0.01))
                    line = _ramp(part["w"] - _segments_dist(x, y, part["pts"]), 0.004)
                    D[rs, cs] += part["amp"] * line
                else:
                    rs, cs, x, y = cv.window(
                        centred_box(part["x"], part["y"], part["w"] / 2 + 0.01, part["h"] / 2 + 0.01)
                    )
                    qx = np.abs(x - part["x"]) - part["w"] / 2 + 0.012
                    qy = np.abs(y - part["y"]) - part["h"] / 2 + 0.012
                    rr = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2) + np.minimum(
                        np.maximum(qx, qy), 0
                    )
                    D[rs, cs] += (
                        part["amp"] * _ramp(0.012 - rr, 0.004) * (1 - 0.25 * _ramp(-rr - 0.02, 0.004))
                    )


def render_density(
    a: Anatomy, signs: Sequence[Sign], cv: Canvas, tex: np.ndarray, vessels: np.ndarray
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
    if PTX in by_label:
        pp = by_label[PTX].params
        side, gap = pp["side"], pp["gap"]
        s = SIDE_SIGN[side]
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
    if EFFUSION in by_label:
        pe = by_label[EFFUSION].params
        fluid = np.zeros_like(lungs[0])
        for side in pe["sides"]:
            s = SIDE_SIGN[side]
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
    rs, cs, xw, yw = cv.window(centred_box(0.5 + a.med_w, 0.27, 0.05, 0.05))
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
        s = SIDE_SIGN[side]
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
        rs, cs, xw, yw = cv.window(poly_box(pts, 0.03))
        D[rs, cs] += 0.12 * _ramp(0.012 - _segments_dist(xw, yw, pts), 0.006)
    # Gastric air bubble under the left dome.
    if a.gastric:
        gx, gy = 0.5 + 0.17, a.lung_base[1] + 0.02
        rs, cs, xw, yw = cv.window(centred_box(gx, gy, 0.06, 0.05))
        bub = _ramp(1 - ((xw - gx) / 0.045) ** 2 - ((yw - gy) / 0.03) ** 2, 0.3) * _ramp(
            yw - gy + 0.005, 0.01
        )
        D[rs, cs] -= 0.1 * bub

    _draw_signs(D, signs, a, cv, lung, tex)
    return D


@dataclass
class View:
    """One exposure: film response, blur and noise, and (second views) a rotation, zoom and shift."""

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


def sample_view(rng: np.random.Generator, index: int) -> View:
    """Exposure settings of view ``index``; views after the first are also repositioned."""
    u = rng.uniform
    v = View(gain=u(2.4, 2.9), fog=u(0.02, 0.05), vignette=u(0.1, 0.25), blur=u(0.4, 0.8), noise=u(1.5, 3.0))
    if index > 0:  # a second exposure of the same patient, repositioned
        v.angle, v.scale, v.shift = u(-0.05, 0.05), u(0.94, 1.04), (u(-0.03, 0.03), u(-0.03, 0.03))
    return v


def expose_film(D: np.ndarray, view: View, cv: Canvas, rng: np.random.Generator) -> np.ndarray:
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


def noise_texture(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Smooth zero-mean noise in [-1, 1] with ``grid`` cells across, [S, S]."""
    g = rng.uniform(-1, 1, size=(grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BICUBIC))


def pixel_box(box: tuple[float, float, float, float], view: View, size: int) -> list[int]:
    """An anatomy box in a view's pixel edges: its four corners mapped, then clipped to the image."""
    x0, y0, x1, y1 = (v * size for v in box)
    pts = [view.forward(px, py, size) for px, py in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    bx0 = min(max(int(math.floor(min(xs))), 0), size - 1)
    by0 = min(max(int(math.floor(min(ys))), 0), size - 1)
    bx1 = max(min(int(math.ceil(max(xs))), size), bx0 + 1)
    by1 = max(min(int(math.ceil(max(ys))), size), by0 + 1)
    return [bx0, by0, bx1, by1]
