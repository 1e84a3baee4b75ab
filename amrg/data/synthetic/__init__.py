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

Modules, in the order a study is made: ``labels`` (codes per study), ``anatomy`` (the patient and
the geometry helpers), ``signs`` (where each finding goes), ``render`` (density, film, views, pixel
boxes), ``prose`` (the report), ``study`` (one study in memory), ``dataset`` (PNGs and
``annotation.json`` on disk).
"""

from __future__ import annotations

from amrg.data.synthetic.dataset import synthesize, write_annotation, write_views
from amrg.data.synthetic.study import SyntheticStudy, SyntheticViews, render_study, render_views

__all__ = [
    "SyntheticStudy",
    "SyntheticViews",
    "render_study",
    "render_views",
    "synthesize",
    "write_annotation",
    "write_views",
]
