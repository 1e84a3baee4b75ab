"""Label sampling for synthetic studies: the label indices and the codes drawn for each study.

Codes follow the CheXpert labeler: 1 positive, 0 negated, -1 uncertain, None not mentioned. Only the
13 findings are sampled here; No Finding is derived from what the report states (``study.py``).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ATELEC",
    "CARDIO",
    "CONSOL",
    "DEVICES",
    "EC",
    "EDEMA",
    "EFFUSION",
    "FINDINGS",
    "FRACTURE",
    "LESION",
    "NO_FINDING",
    "OPACITY",
    "PLEURAL_OTHER",
    "PNEUMONIA",
    "PTX",
    "sample_codes",
]

# Label indices (CheXbert order, amrg.labels.LABELS).
(
    EC,
    CARDIO,
    OPACITY,
    LESION,
    EDEMA,
    CONSOL,
    PNEUMONIA,
    ATELEC,
    PTX,
    EFFUSION,
    PLEURAL_OTHER,
    FRACTURE,
    DEVICES,
    NO_FINDING,
) = range(14)
FINDINGS = tuple(range(NO_FINDING))  # the 13 labels that can carry a sign


# Label sampling (per study). Marginals come out at ~0.2 per finding; see tests/data/synthetic/test_labels.py.
_P_NORMAL = 0.22
_P_FINDING = (0.22, 0.26, 0.26, 0.22, 0.2, 0.22, 0.22, 0.24, 0.18, 0.26, 0.18, 0.2, 0.26)
_P_UNCERTAIN = 0.07
_P_NEGATED = 0.5
_P_NEGATED_DEVICES = 0.08  # real reports rarely say "no support devices"


def sample_codes(rng: np.random.Generator) -> list[int | None]:
    """Codes for the 13 findings (No Finding is derived later)."""
    pos = np.zeros(len(FINDINGS), dtype=bool)
    draws = rng.random(len(FINDINGS))
    extra = rng.random(6)
    if rng.random() >= _P_NORMAL:
        pos = draws < np.asarray(_P_FINDING)
        # Clinical correlations: pneumonia with consolidation/opacity, edema with a big heart and effusions.
        pos[CONSOL] |= pos[PNEUMONIA] and extra[0] < 0.4
        pos[OPACITY] |= pos[PNEUMONIA] and extra[1] < 0.3
        pos[CARDIO] |= pos[EDEMA] and extra[2] < 0.35
        pos[EFFUSION] |= pos[EDEMA] and extra[3] < 0.35
        pos[ATELEC] |= pos[EFFUSION] and extra[4] < 0.25
        if not pos.any():
            pos[int(extra[5] * len(FINDINGS))] = True
    unc = rng.random(len(FINDINGS)) < _P_UNCERTAIN
    neg = rng.random(len(FINDINGS))
    codes: list[int | None] = []
    for j in FINDINGS:
        if pos[j]:
            codes.append(-1 if unc[j] and j != DEVICES else 1)
        else:
            p_neg = _P_NEGATED_DEVICES if j == DEVICES else _P_NEGATED
            codes.append(0 if neg[j] < p_neg else None)
    return codes
