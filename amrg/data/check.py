"""``amrg data check``: validate a prepared dataset before training on it."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from amrg.data.images import DEFAULT_MAX_PIXELS, image_problem, leaves_root
from amrg.data.schema import load_annotation
from amrg.labels import LABELS

__all__ = ["DatasetReport", "check_dataset"]


@dataclass
class DatasetReport:
    """What ``check_dataset`` found."""

    annotation: Path
    counts: dict[str, int]
    views: dict[str, Counter] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    outside_root: list[str] = field(default_factory=list)
    label_counts: dict[str, dict[str, Counter]] = field(default_factory=dict)
    unlabelled: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unreadable and not self.outside_root

    def format(self, max_listed: int = 20) -> str:
        """A plain-text table for the terminal."""
        lines = [f"annotation: {self.annotation}", "", f"{'split':<8}{'studies':>10}  views per study"]
        for split, n in self.counts.items():
            views = ", ".join(f"{k}:{v}" for k, v in sorted(self.views.get(split, Counter()).items()))
            lines.append(f"{split:<8}{n:>10}  {views}")
        lines.append("")
        lines.append(f"missing images: {len(self.missing)}   unreadable images: {len(self.unreadable)}")
        if self.outside_root:
            lines.append(
                f"image paths outside the image root: {len(self.outside_root)} "
                "(refused; --allow_outside_root true reads them)"
            )
        listed = (
            ("missing", self.missing),
            ("unreadable", self.unreadable),
            ("outside root", self.outside_root),
        )
        for kind, items in listed:
            for item in items[:max_listed]:
                lines.append(f"  {kind}: {item}")
            if len(items) > max_listed:
                lines.append(f"  ... and {len(items) - max_listed} more {kind}")
        if self.label_counts:
            splits = list(self.label_counts)
            lines += ["", "labels (positive / uncertain / negative / not mentioned):"]
            lines.append(f"{'label':<28}" + "".join(f"{s:>24}" for s in splits))
            for name in LABELS:
                row = f"{name:<28}"
                for s in splits:
                    c = self.label_counts[s][name]
                    row += f"{c[1]:>6}/{c[-1]:>5}/{c[0]:>6}/{c[None]:>5}"
                lines.append(row)
            if any(self.unlabelled.values()):
                lines.append(
                    "studies without labels: " + ", ".join(f"{k}={v}" for k, v in self.unlabelled.items())
                )
        return "\n".join(lines)


def check_dataset(
    annotation: Path,
    image_root: Path | None = None,
    decode: bool = False,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_outside_root: bool = False,
) -> DatasetReport:
    """Validate an annotation and every image it names.

    Args:
        annotation: the ``annotation.json`` (schema errors raise at once, all listed).
        image_root: folder image paths are relative to (default: the annotation's folder).
        decode: fully decode each image as training will (slow) instead of checking its header and
            structure (for DICOM: pixel data present, one frame, a decoder for its transfer syntax).
        progress: show a progress bar over the images.
        max_pixels: an image with more pixels (width x height, from its header) is unreadable, as
            training would refuse or skip it; None for no cap.
        allow_outside_root: accept image paths that are absolute or climb out of the image root with
            ``..``; otherwise each is listed as "outside root" and its file is not opened.
    """
    ann = load_annotation(annotation)
    root = Path(image_root) if image_root is not None else Path(annotation).parent
    report = DatasetReport(Path(annotation), ann.counts())
    total = sum(len(s.image_paths) for s in ann)
    with tqdm(total=total, desc="checking images", unit="img", disable=not progress) as bar:
        for split, studies in ann.splits.items():
            views: Counter = Counter()
            labels = {name: Counter() for name in LABELS}
            unlabelled = 0
            for study in studies:
                views[len(study.image_paths)] += 1
                for rel in study.image_paths:
                    path = root / rel
                    where = f"{split} id={study.id!r}: {path}"
                    if not allow_outside_root and leaves_root(rel):
                        report.outside_root.append(
                            f"{split} id={study.id!r}: image path {rel!r} leaves {root}"
                        )
                    elif not path.is_file():
                        report.missing.append(where)
                    elif (err := image_problem(path, decode, max_pixels)) is not None:
                        report.unreadable.append(f"{split} id={study.id!r}: {err}")
                    bar.update()
                if study.labels is None:
                    unlabelled += 1
                else:
                    for name, v in zip(LABELS, study.labels, strict=True):
                        labels[name][v] += 1
            report.views[split] = views
            report.label_counts[split] = labels
            report.unlabelled[split] = unlabelled
    return report
