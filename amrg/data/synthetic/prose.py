"""Report prose for synthetic studies: every sentence carries the label codes it states."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from amrg.data.synthetic.labels import (
    ATELEC,
    CARDIO,
    CONSOL,
    DEVICES,
    EC,
    EDEMA,
    EFFUSION,
    FINDINGS,
    FRACTURE,
    LESION,
    OPACITY,
    PLEURAL_OTHER,
    PNEUMONIA,
    PTX,
)
from amrg.data.synthetic.signs import Sign
from amrg.labels import NUM_LABELS

__all__ = ["write_report"]

_SIDE_WORD = ("right", "left")


def _location(side: int, zone: str, rng: np.random.Generator) -> str:
    """Where a sign is, in report words ("the right lower lobe", "the left mid lung")."""
    lobe = {"upper": "upper lobe", "mid": ("middle lobe", "lingula")[side], "lower": "lower lobe"}[zone]
    options = [f"the {_SIDE_WORD[side]} {zone} lung", f"the {_SIDE_WORD[side]} {zone} lung zone"]
    options.append("the lingula" if lobe == "lingula" else f"the {_SIDE_WORD[side]} {lobe}")
    return options[int(rng.integers(len(options)))]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _positive_sentence(sg: Sign, rng: np.random.Generator) -> str:
    d, lab = sg.desc, sg.label
    if lab == EC:
        return _pick(
            rng,
            [
                "There is widened mediastinum.",
                "Widened mediastinum is noted.",
                "Enlarged cardiomediastinum is present.",
                "The mediastinum is widened.",
            ],
        )
    if lab == CARDIO:
        return _pick(
            rng,
            [
                "The heart is enlarged.",
                f"The heart is {d['sev']} enlarged.",
                "Cardiomegaly is present.",
                f"There is {d['sev'].removesuffix('ly')} cardiomegaly.",
            ],
        )
    if lab in (OPACITY, LESION, CONSOL, PNEUMONIA, ATELEC):
        loc = _location(d["side"], d["zone"], rng)
        if lab == OPACITY:
            return _pick(
                rng,
                [
                    f"There is a hazy opacity in {loc}.",
                    f"Ill-defined opacity in {loc}.",
                    f"A hazy opacity projects over {loc}.",
                ],
            )
        if lab == LESION:
            return _pick(
                rng,
                [
                    f"There is a {d['cm']} cm nodule in {loc}.",
                    f"A well-circumscribed nodule projects over {loc}.",
                    f"{_cap(loc.removeprefix('the '))} pulmonary nodule measuring {d['cm']} cm.",
                ],
            )
        if lab == CONSOL:
            return _pick(
                rng,
                [
                    f"There is consolidation in {loc} with air bronchograms.",
                    f"Dense consolidation in {loc}.",
                    f"Focal consolidation is present in {loc}.",
                ],
            )
        if lab == PNEUMONIA:
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
    if lab == EDEMA:
        return _pick(
            rng,
            [
                f"There is {d['sev']} pulmonary edema.",
                "Bilateral perihilar edema is present.",
                f"Findings are consistent with {d['sev']} interstitial edema.",
                "Perihilar edema with Kerley B lines.",
            ],
        )
    if lab == PTX:
        side = _SIDE_WORD[d["side"]]
        return _pick(
            rng,
            [
                f"There is a {d['size']} {side} apical pneumothorax.",
                f"A {d['size']} {side} pneumothorax is present.",
                f"{_cap(side)} apical pneumothorax is seen.",
            ],
        )
    if lab == EFFUSION:
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
    if lab == PLEURAL_OTHER:
        side = _SIDE_WORD[d["side"]]
        return _pick(
            rng,
            [
                f"There is {side} lateral pleural thickening.",
                f"Pleural thickening along the {side} lateral chest wall.",
                f"{_cap(side)} pleural thickening is noted.",
            ],
        )
    if lab == FRACTURE:
        side, nth = _SIDE_WORD[d["side"]], _ordinal(d["rib"])
        return _pick(
            rng,
            [
                f"There is a displaced fracture of the {side} {nth} rib.",
                f"A healing fracture of the lateral {side} {nth} rib is seen.",
                f"{_cap(side)} {nth} rib fracture is noted.",
            ],
        )
    if lab == DEVICES:
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


def _hedged_sentence(sg: Sign, rng: np.random.Generator) -> str:
    d, lab = sg.desc, sg.label
    if lab in (OPACITY, LESION, CONSOL, PNEUMONIA, ATELEC):
        loc = _location(d["side"], d["zone"], rng)
    phrase = {
        EC: lambda: "widened mediastinum",
        CARDIO: lambda: "mild cardiomegaly",
        OPACITY: lambda: f"faint opacity in {loc}",
        LESION: lambda: f"small nodule in {loc}",
        EDEMA: lambda: "mild pulmonary edema",
        CONSOL: lambda: f"consolidation in {loc}",
        PNEUMONIA: lambda: f"early pneumonia in {loc}",
        ATELEC: lambda: f"atelectasis in {loc}",
        PTX: lambda: f"small {_SIDE_WORD[d['side']]} apical pneumothorax",
        EFFUSION: lambda: (
            "small bilateral pleural effusions"
            if len(d["sides"]) == 2
            else f"small {_SIDE_WORD[d['sides'][0]]} pleural effusion"
        ),
        PLEURAL_OTHER: lambda: f"{_SIDE_WORD[d['side']]} pleural thickening",
        FRACTURE: lambda: f"nondisplaced {_SIDE_WORD[d['side']]} rib fracture",
    }[lab]()
    form = _pick(
        rng, ["Possible {}.", "Cannot exclude {}.", "Questionable {}.", "Findings may represent {}."]
    )
    return form.format(phrase)


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


# (labels negated together, templates); a combined template is used only when all its labels are negated.
_NEGATIONS: tuple[tuple[tuple[int, ...], tuple[str, ...]], ...] = (
    ((CONSOL, EFFUSION, PTX), ("No focal consolidation, pleural effusion, or pneumothorax.",)),
    (
        (EFFUSION, PTX),
        (
            "No pleural effusion or pneumothorax.",
            "There is no pleural effusion or pneumothorax.",
            "No pneumothorax or pleural effusion.",
        ),
    ),
    ((EC, CARDIO), ("Heart size is normal and there is no widened mediastinum.",)),
    (
        (EC,),
        (
            "No widened mediastinum.",
            "The cardiomediastinal silhouette is within normal limits.",
            "The mediastinum is not widened.",
        ),
    ),
    ((CARDIO,), ("Heart size is normal.", "No cardiomegaly.", "The heart is not enlarged.")),
    ((OPACITY,), ("No focal opacity.", "There is no focal airspace opacity.")),
    ((LESION,), ("No pulmonary nodule.", "No suspicious pulmonary nodules.", "No nodule is seen.")),
    ((EDEMA,), ("No pulmonary edema.", "There is no edema.")),
    ((CONSOL,), ("No focal consolidation.", "There is no consolidation.")),
    ((PNEUMONIA,), ("No evidence of pneumonia.", "There is no pneumonia.")),
    ((ATELEC,), ("No atelectasis.", "No evidence of atelectasis.")),
    ((PTX,), ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax.")),
    (
        (EFFUSION,),
        ("No pleural effusion.", "There is no pleural effusion.", "No evidence of pleural effusion."),
    ),
    ((PLEURAL_OTHER,), ("No pleural thickening.", "There is no pleural thickening.")),
    ((FRACTURE,), ("No acute fracture.", "No displaced rib fracture.", "No fracture is seen.")),
    ((DEVICES,), ("No support devices.",)),
)
_LUNG_LABELS = (OPACITY, LESION, EDEMA, CONSOL, PNEUMONIA, ATELEC, PTX, EFFUSION)

# Where each finding is read on the film; a sentence belongs to the region of its first label.
_REGION = {
    DEVICES: "devices",
    EC: "heart",
    CARDIO: "heart",
    OPACITY: "lungs",
    LESION: "lungs",
    EDEMA: "lungs",
    CONSOL: "lungs",
    PNEUMONIA: "lungs",
    ATELEC: "lungs",
    PTX: "pleura",
    EFFUSION: "pleura",
    PLEURAL_OTHER: "pleura",
    FRACTURE: "bones",
}
# Radiologists read a film in a fixed order of their own and write the findings in it (IU X-ray:
# heart first; MIMIC-CXR: lines and tubes first). Each report takes one of these orders; sentences of
# one region come in random order.
READING_ORDERS: tuple[tuple[str, ...], ...] = (
    ("heart", "lungs", "pleura", "bones", "devices"),
    ("devices", "lungs", "pleura", "heart", "bones"),
    ("devices", "heart", "lungs", "pleura", "bones"),
)


def _impression_phrase(sg: Sign) -> str:
    d, lab = sg.desc, sg.label
    side = lambda k="side": _SIDE_WORD[d[k]]  # noqa: E731
    return {
        EC: lambda: "Widened mediastinum.",
        CARDIO: lambda: "Cardiomegaly.",
        OPACITY: lambda: f"{_cap(side())} {d['zone']} lung opacity.",
        LESION: lambda: f"{_cap(side())} {d['zone']} lung nodule.",
        EDEMA: lambda: "Pulmonary edema.",
        CONSOL: lambda: f"{_cap(side())} {d['zone']} lung consolidation.",
        PNEUMONIA: lambda: f"{_cap(side())} {d['zone']} lung pneumonia.",
        ATELEC: lambda: f"{_cap(side())} atelectasis.",
        PTX: lambda: f"{_cap(side())} pneumothorax.",
        EFFUSION: lambda: (
            "Bilateral pleural effusions."
            if len(d["sides"]) == 2
            else f"{_cap(_SIDE_WORD[d['sides'][0]])} pleural effusion."
        ),
        PLEURAL_OTHER: lambda: f"{_cap(side())} pleural thickening.",
        FRACTURE: lambda: f"{_cap(side())} rib fracture.",
        DEVICES: lambda: "Support devices as described.",
    }[lab]()


def write_report(
    codes: Sequence[int | None], signs: dict[int, Sign], rng: np.random.Generator
) -> tuple[str, list[int | None]]:
    """Compose a report for the 13 finding codes; return it with the codes its sentences state."""
    sentences: list[tuple[str, dict[int, int]]] = []  # (text, {label: code stated})
    generic: dict[str, str] = {}  # sentences that state no label -> their region
    for j in FINDINGS:
        if codes[j] == 1:
            sentences.append((_positive_sentence(signs[j], rng), {j: 1}))
        elif codes[j] == -1:
            sentences.append((_hedged_sentence(signs[j], rng), {j: -1}))
    negated = {j for j in FINDINGS if codes[j] == 0}
    active = {j for j in FINDINGS if codes[j] in (1, -1)}
    for group, templates in _NEGATIONS:
        if set(group) <= negated and (len(group) == 1 or rng.random() < 0.6):
            if CARDIO in active:  # a normal silhouette would contradict the big heart
                templates = tuple(t for t in templates if "silhouette" not in t)
            sentences.append((_pick(rng, templates), dict.fromkeys(group, 0)))
            negated -= set(group)
    assert not negated, negated
    if not active & set(_LUNG_LABELS) and rng.random() < 0.7:
        text = _pick(rng, ["The lungs are clear.", "The lungs are well expanded and clear."])
        sentences.append((text, {}))
        generic[text] = "lungs"
    if FRACTURE not in active and rng.random() < 0.4:
        text = _pick(
            rng, ["No acute osseous abnormality.", "The visualized osseous structures are unremarkable."]
        )
        sentences.append((text, {}))
        generic[text] = "bones"
    regions = [_REGION[min(said)] if said else generic[text] for text, said in sentences]
    reading = READING_ORDERS[int(rng.integers(len(READING_ORDERS)))]
    body = []
    for region in reading:
        members = [i for i, r in enumerate(regions) if r == region]
        body += [sentences[members[k]] for k in rng.permutation(len(members))]
    assert len(body) == len(sentences)
    positives = [j for j in FINDINGS if codes[j] == 1]
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
