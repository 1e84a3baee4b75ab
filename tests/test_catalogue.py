"""The catalogue of bad inputs (issue 14): each one through the `amrg` command, one line, nothing changed.

Every case builds a tiny fixture in ``tmp_path``, runs ``python -m amrg.cli ...`` in a subprocess there and
checks: a non-zero exit, stderr holding exactly one line that starts with ``amrg: error:`` (no traceback,
no progress bar, no warning), that line naming the file or record, and every file under ``tmp_path``
(inputs and earlier outputs) byte-identical afterwards, with no file added.

Most cases stop before torch is imported or right after (0.2-2 s each); the few that parse a Lightning recipe
(``fit --ckpt_path``, ``memory build``) or import transformers (a checkpoint that only torch.load can
judge) take 5-9 s, so there are few of them (a weights-only checkpoint and a missing ``--ckpt_path`` are
tested in-process in tests/test_cli.py). The cases run side by side (the ``runs`` fixture). Measured one
by one: eval and synth 0.2-0.3 s, every command that imports torch (data check, predict-images) 2-3 s, the
four heavy ones 7-9 s; about 110 s of CPU in all, ~55 s on an idle 2-core box. The closing note of issue 14 lists each case's line;
``python tests/test_catalogue.py [NAME_PART ...]`` prints them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"


@dataclass
class Case:
    """One bad input: the command's arguments and the fragments its error line must contain."""

    args: list[str]
    names: list[str]
    code: int = 1
    slow: bool = False  # parses a Lightning recipe or imports transformers: started first


# ---- tiny fixtures ------------------------------------------------------------------------------------
def _png(path: Path, size: int = 32, seed: int = 0) -> Path:
    from tests.conftest import write_image

    return write_image(path, size=size, seed=seed)


def _jpeg(path: Path, size: int = 128) -> Path:
    from tests.conftest import write_image

    return write_image(path, size=size, mode="RGB", seed=3)


def _record(i: str, views: int = 1, **over) -> dict:
    rec = {"id": i, "report": "No acute disease.", "image_path": [f"{i}/{v}.png" for v in range(views)]}
    rec.update(over)
    return rec


def _dataset(tmp: Path, records: list[dict] | None = None) -> Path:
    """annotation.json with studies a and b (their PNGs written) in train, c in test."""
    records = records if records is not None else [_record("a"), _record("b", views=2)]
    for rec in records:
        for rel in rec["image_path"]:
            if rel.endswith(".png"):  # the cases write their other files themselves
                _png(tmp / rel)
    ann = tmp / "annotation.json"
    ann.write_text(json.dumps({"train": records, "test": [_record("c")]}))
    _png(tmp / "c" / "0.png")
    return ann


def _junk(path: Path, size: int = 256) -> Path:
    path.write_bytes(bytes((i * 151 + 7) % 256 for i in range(size)))  # fixed "random" bytes
    return path


def _state_dict(path: Path) -> Path:
    import torch

    torch.save({"encoder.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, path)
    return path


def _predictions(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _pred(i: str, report: str = "No acute disease.", ref: str = "Normal chest.") -> str:
    return json.dumps({"id": i, "report": report, "reference": ref})


def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return path


def _check(tmp: Path, ann: Path, *extra: str) -> list[str]:
    return ["data", "check", str(ann), *extra]


# ---- the cases ------------------------------------------------------------------------------------------
def _annotation_missing(tmp: Path) -> Case:
    return Case(_check(tmp, tmp / "nope.json"), ["nope.json", "not found"])


def _annotation_empty(tmp: Path) -> Case:
    (tmp / "annotation.json").write_text("")
    return Case(_check(tmp, tmp / "annotation.json"), ["annotation.json", "empty"])


def _annotation_not_json(tmp: Path) -> Case:
    (tmp / "annotation.json").write_text('{"train": [{"id": "a",\n  oops}]}')
    return Case(_check(tmp, tmp / "annotation.json"), ["annotation.json", "malformed JSON at line 2"])


def _annotation_not_utf8(tmp: Path) -> Case:
    ann = _dataset(tmp)
    text = ann.read_text().replace("No acute disease.", "Caf\udce9 lungs.", 1)  # one Latin-1 byte
    ann.write_bytes(text.encode("utf-8", "surrogateescape"))
    return Case(_check(tmp, ann), ["annotation.json", "not UTF-8", "line 1", "record id='a'"])


def _annotation_not_an_object(tmp: Path) -> Case:
    (tmp / "annotation.json").write_text("[1, 2]")
    return Case(_check(tmp, tmp / "annotation.json"), ["annotation.json", "top level must be an object"])


def _annotation_missing_fields(tmp: Path) -> Case:
    ann = _dataset(tmp, [_record("a"), {"id": "b", "image_path": ["b/0.png"]}])
    return Case(_check(tmp, ann), ["annotation.json", "train[1] id='b'", "field 'report' is missing"])


def _annotation_duplicate_ids(tmp: Path) -> Case:
    ann = _dataset(tmp, [_record("a"), _record("a")])
    return Case(_check(tmp, ann), ["annotation.json", "train[1] id='a'", "duplicate id"])


def _annotation_bad_labels(tmp: Path) -> Case:
    ann = _dataset(tmp, [_record("a", labels=[2] + [0] * 13)])
    return Case(_check(tmp, ann), ["train[0] id='a'", "field 'labels'[0]", "is 2"])


def _annotation_is_a_folder(tmp: Path) -> Case:
    (tmp / "ann").mkdir()
    return Case(_check(tmp, tmp / "ann"), ["ann", "is a folder"])


def _image_missing(tmp: Path) -> Case:
    ann = _dataset(tmp)
    (tmp / "b" / "1.png").unlink()
    return Case(_check(tmp, ann), ["annotation.json", "1 missing", "train id='b'", "b/1.png"])


def _image_corrupt_png(tmp: Path) -> Case:
    ann = _dataset(tmp)
    (tmp / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return Case(_check(tmp, ann), ["1 unreadable", "a/0.png"])


def _image_truncated_jpeg(tmp: Path) -> Case:
    ann = _dataset(tmp, [_record("a") | {"image_path": ["a/0.jpg"]}])
    data = _jpeg(tmp / "a" / "0.jpg").read_bytes()
    (tmp / "a" / "0.jpg").write_bytes(data[: len(data) // 2])
    return Case(_check(tmp, ann, "--decode", "true"), ["1 unreadable", "a/0.jpg"])


def _image_not_dicom(tmp: Path) -> Case:
    ann = _dataset(tmp, [_record("a") | {"image_path": ["a/0.dcm"]}])
    (tmp / "a").mkdir()
    (tmp / "a" / "0.dcm").write_text("not a DICOM file")
    return Case(_check(tmp, ann), ["1 unreadable", "a/0.dcm"])


def _image_outside_root(tmp: Path) -> Case:
    ann = _dataset(tmp, [_record("a") | {"image_path": ["../elsewhere.png"]}])
    _png(tmp.parent / f"{tmp.name}-elsewhere.png")  # what ../ would have read: outside tmp, not watched
    return Case(_check(tmp, ann), ["1 outside the image root", "../elsewhere.png"])


def _image_over_the_pixel_cap(tmp: Path) -> Case:
    ann = _dataset(tmp)  # 32 x 32 images: 1,024 pixels each
    return Case(_check(tmp, ann, "--max_pixels", "1000"), ["unreadable", "a/0.png", "max_pixels"])


def _eval_missing(tmp: Path) -> Case:
    return Case(["eval", str(tmp / "p.jsonl"), "--no_meteor"], ["p.jsonl", "not found"])


def _eval_empty(tmp: Path) -> Case:
    _predictions(tmp / "p.jsonl", [])
    return Case(["eval", str(tmp / "p.jsonl"), "--no_meteor"], ["p.jsonl", "empty file"])


def _eval_bad_json_line(tmp: Path) -> Case:
    _predictions(tmp / "p.jsonl", [_pred("a"), "{not json"])
    return Case(["eval", str(tmp / "p.jsonl"), "--no_meteor"], ["p.jsonl:2", "not JSON"])


def _eval_duplicate_id(tmp: Path) -> Case:
    _predictions(tmp / "p.jsonl", [_pred("a"), _pred("b"), _pred("a")])
    return Case(["eval", str(tmp / "p.jsonl"), "--no_meteor"], ["p.jsonl:3 id='a'", "duplicate id"])


def _eval_not_utf8(tmp: Path) -> Case:
    (tmp / "p.jsonl").write_bytes(
        _pred("a").encode() + b'\n{"id": "b", "report": "caf\xe9", "reference": "r"}\n'
    )
    return Case(["eval", str(tmp / "p.jsonl"), "--no_meteor"], ["p.jsonl", "not UTF-8"])


def _eval_compare_mismatch(tmp: Path) -> Case:
    _predictions(tmp / "a.jsonl", [_pred("a"), _pred("b")])
    _predictions(tmp / "b.jsonl", [_pred("a"), _pred("c")])
    args = ["eval", str(tmp / "a.jsonl"), "--compare", str(tmp / "b.jsonl"), "--no_meteor"]
    return Case(args, ["b.jsonl:2 id='c'", "a.jsonl"])


def _eval_output_not_ours(tmp: Path) -> Case:
    _predictions(tmp / "p.jsonl", [_pred("a")])
    (tmp / "p.eval.json").write_text('{"mine": true}\n')  # an earlier file amrg eval did not write
    return Case(["eval", str(tmp / "p.jsonl"), "--no_meteor"], ["p.eval.json", "refusing to overwrite"])


def _synth_bad_n(tmp: Path) -> Case:
    return Case(["data", "synth", "--out", str(tmp / "out"), "--n", "0"], ["n must be >= 1", "0"])


def _synth_bad_two_view_prob(tmp: Path) -> Case:
    args = ["data", "synth", "--out", str(tmp / "out"), "--n", "4", "--two_view_prob", "1.5"]
    return Case(args, ["two_view_prob", "1.5"])


def _synth_bad_image_size(tmp: Path) -> Case:
    args = ["data", "synth", "--out", str(tmp / "out"), "--n", "4", "--image_size", "8"]
    return Case(args, ["image_size", "8"])


def _synth_bad_fractions(tmp: Path) -> Case:
    args = [
        "data",
        "synth",
        "--out",
        str(tmp / "out"),
        "--n",
        "4",
        "--val_fraction",
        "0.7",
        "--test_fraction",
        "0.6",
    ]
    return Case(args, ["val_fraction", "test_fraction"])


def _synth_out_is_a_file(tmp: Path) -> Case:
    (tmp / "out").write_text("a file where the dataset folder should go")
    return Case(["data", "synth", "--out", str(tmp / "out"), "--n", "4", "--image_size", "32"], ["out"])


def _iu_synth_missing_reports(tmp: Path) -> Case:
    args = ["data", "iu-synth", "--out", str(tmp / "out"), "--reports", str(tmp / "NLMCXR_reports.tgz")]
    return Case(args, ["--reports", "NLMCXR_reports.tgz", "no such file"])


def _iu_synth_tgz_without_xml(tmp: Path) -> Case:
    tgz = _tgz(tmp / "reports.tgz", {"readme.txt": b"hello"})
    return Case(
        ["data", "iu-synth", "--out", str(tmp / "out"), "--reports", str(tgz)],
        ["reports.tgz", "no Open-i XML"],
    )


def _iu_synth_not_an_archive(tmp: Path) -> Case:
    (tmp / "reports.tgz").write_text("FINDINGS: clear lungs")
    args = ["data", "iu-synth", "--out", str(tmp / "out"), "--reports", str(tmp / "reports.tgz")]
    return Case(args, ["reports.tgz", "neither a .tgz"])


def _preview_empty_split(tmp: Path) -> Case:
    ann = _dataset(tmp)
    args = ["data", "preview", str(ann), "--out", str(tmp / "grid.png"), "--split", "val"]
    return Case(args, ["annotation.json", "'val'"])


def _predict(tmp: Path, ckpt: Path, inputs: list[Path], out: Path, *extra: str) -> list[str]:
    return ["predict-images", str(ckpt), json.dumps([str(p) for p in inputs]), str(out), *extra]


def _predict_missing_checkpoint(tmp: Path) -> Case:
    _png(tmp / "x.png")
    return Case(
        _predict(tmp, tmp / "nope.ckpt", [tmp / "x.png"], tmp / "p.jsonl"), ["nope.ckpt", "not found"]
    )


def _predict_random_bytes_checkpoint(tmp: Path) -> Case:
    _png(tmp / "x.png")
    ckpt = _junk(tmp / "model.ckpt")
    return Case(
        _predict(tmp, ckpt, [tmp / "x.png"], tmp / "p.jsonl"), ["model.ckpt", "not a file torch.save wrote"]
    )


def _predict_empty_checkpoint(tmp: Path) -> Case:
    _png(tmp / "x.png")
    (tmp / "model.ckpt").write_bytes(b"")
    return Case(_predict(tmp, tmp / "model.ckpt", [tmp / "x.png"], tmp / "p.jsonl"), ["model.ckpt", "empty"])


def _predict_state_dict_checkpoint(tmp: Path) -> Case:
    _png(tmp / "x.png")
    ckpt = _state_dict(tmp / "model.ckpt")
    args = _predict(tmp, ckpt, [tmp / "x.png"], tmp / "p.jsonl")
    return Case(args, ["model.ckpt", "plain state dict", "not a Lightning checkpoint"], slow=True)


def _predict_missing_image(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    return Case(_predict(tmp, ckpt, [tmp / "x.png"], tmp / "p.jsonl"), ["x.png", "not found"])


def _predict_corrupt_image(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    (tmp / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return Case(_predict(tmp, ckpt, [tmp / "x.png"], tmp / "p.jsonl"), ["x.png", "not a readable image"])


_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _predict_output_is_an_input(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    image = _png(tmp / "x.png")
    _png(tmp / "y.png", seed=1)
    args = _predict(tmp, ckpt, [image, tmp / "y.png"], image)
    return Case(args, ["x.png", "input image", "refusing to overwrite"])


def _predict_output_is_another_file(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    (tmp / "annotation.json").write_text('{"train": []}\n')
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "annotation.json")
    return Case(args, ["annotation.json", "not a predictions file", "refusing to overwrite"])


def _predict_output_is_a_folder(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    (tmp / "results").mkdir()
    return Case(_predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "results"), ["results", "is a folder"])


def _predict_output_folder_is_a_file(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    (tmp / "results").write_text("a file where the output folder should be")
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "results" / "p.jsonl")
    return Case(args, ["cannot write predictions", "results/p.jsonl", "results' is a file, not a folder"])


def _predict_output_folder_read_only(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    if _ROOT:  # root ignores a folder's permissions; sysfs refuses it a new folder all the same
        out = Path("/sys/kernel/amrg-catalogue/p.jsonl")
        return Case(_predict(tmp, ckpt, [_png(tmp / "x.png")], out), ["cannot write predictions", str(out)])
    (tmp / "results").mkdir()
    (tmp / "results").chmod(0o555)
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "results" / "p.jsonl")
    return Case(args, ["cannot write predictions", "results/p.jsonl", "permission denied"])


def _predict_image_over_the_pixel_cap(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "p.jsonl", "--max_pixels", "1000")
    return Case(args, ["x.png", "1,024 pixels", "max_pixels"])


def _predict_bad_option(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "p.jsonl", "--batch_size", "0")
    return Case(args, ["batch_size >= 1", "got 0"])


def _memory_build_not_a_checkpoint(tmp: Path) -> Case:
    ckpt = _junk(tmp / "stage1.ckpt")
    args = ["memory", "build", "-c", str(DEMO / "data.yaml"), "--stage1_checkpoint", str(ckpt)]
    args += ["--memories", "visual", "--out_dir", str(tmp / "memory"), "--device", "cpu"]
    return Case(args, ["stage1_checkpoint", "stage1.ckpt", "could not be read as a checkpoint"], slow=True)


def _fit(tmp: Path, ckpt: Path) -> list[str]:
    recipe = ["-c", str(DEMO / "data.yaml"), "-c", str(DEMO / "stage1.yaml"), "--run_root", str(tmp / "run")]
    return ["fit", *recipe, "--ckpt_path", str(ckpt)]


def _resume_random_bytes(tmp: Path) -> Case:
    ckpt = _junk(tmp / "last.ckpt")
    return Case(_fit(tmp, ckpt), ["--ckpt_path", "last.ckpt", "not a file torch.save wrote"], slow=True)


def _resume_state_dict(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "last.ckpt")
    return Case(_fit(tmp, ckpt), ["--ckpt_path", "last.ckpt", "plain state dict"], slow=True)


def _deepspeed_folder(path: Path) -> Path:
    """The layout DeepSpeed writes for one checkpoint (configs/trainer/deepspeed_zero*.yaml)."""
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint\n")
    return path


def _predict_deepspeed_checkpoint(tmp: Path) -> Case:
    ckpt = _deepspeed_folder(tmp / "last.ckpt")
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "p.jsonl")
    return Case(
        args, ["last.ckpt", "DeepSpeed checkpoint folder", "convert_zero_checkpoint_to_fp32_state_dict"]
    )


def _resume_deepspeed_folder_without_deepspeed(tmp: Path) -> Case:
    ckpt = _deepspeed_folder(tmp / "last.ckpt")
    return Case(_fit(tmp, ckpt), ["--ckpt_path", "DeepSpeed checkpoint folder", "last-fp32.ckpt"])


def _deepspeed_overlay_without_deepspeed(tmp: Path) -> Case:
    args = [*_fit(tmp, _deepspeed_folder(tmp / "last.ckpt"))]
    args += ["-c", str(DEMO.parent / "trainer" / "deepspeed_zero2.yaml"), "--trainer.accelerator=cpu"]
    return Case(args, ["DeepSpeedStrategy", "deepspeed is not installed", "pip install deepspeed"])


def _predict_figures_is_a_file(tmp: Path) -> Case:
    ckpt = _state_dict(tmp / "model.ckpt")
    (tmp / "figures").write_text("a file where the figures folder should be")
    args = _predict(tmp, ckpt, [_png(tmp / "x.png")], tmp / "p.jsonl", "--figures", str(tmp / "figures"))
    return Case(args, ["figures", "is a file, not a folder"])


CASES: dict[str, Callable[[Path], Case]] = {
    "annotation missing": _annotation_missing,
    "annotation empty": _annotation_empty,
    "annotation not JSON": _annotation_not_json,
    "annotation not UTF-8": _annotation_not_utf8,
    "annotation not an object": _annotation_not_an_object,
    "annotation record missing a field": _annotation_missing_fields,
    "annotation duplicate ids": _annotation_duplicate_ids,
    "annotation bad label value": _annotation_bad_labels,
    "annotation is a folder": _annotation_is_a_folder,
    "image missing": _image_missing,
    "image corrupt PNG": _image_corrupt_png,
    "image truncated JPEG": _image_truncated_jpeg,
    "image .dcm not DICOM": _image_not_dicom,
    "image path outside the root": _image_outside_root,
    "image over the pixel cap": _image_over_the_pixel_cap,
    "eval file missing": _eval_missing,
    "eval empty file": _eval_empty,
    "eval bad JSON line": _eval_bad_json_line,
    "eval duplicate id": _eval_duplicate_id,
    "eval not UTF-8": _eval_not_utf8,
    "eval --compare ids differ": _eval_compare_mismatch,
    "eval output not written by amrg": _eval_output_not_ours,
    "synth --n 0": _synth_bad_n,
    "synth --two_view_prob 1.5": _synth_bad_two_view_prob,
    "synth --image_size 8": _synth_bad_image_size,
    "synth fractions over 1": _synth_bad_fractions,
    "synth --out is a file": _synth_out_is_a_file,
    "iu-synth --reports missing": _iu_synth_missing_reports,
    "iu-synth tgz without XML": _iu_synth_tgz_without_xml,
    "iu-synth --reports not an archive": _iu_synth_not_an_archive,
    "preview empty split": _preview_empty_split,
    "predict checkpoint missing": _predict_missing_checkpoint,
    "predict checkpoint random bytes": _predict_random_bytes_checkpoint,
    "predict checkpoint empty": _predict_empty_checkpoint,
    "predict checkpoint plain state dict": _predict_state_dict_checkpoint,
    "predict image missing": _predict_missing_image,
    "predict image corrupt PNG": _predict_corrupt_image,
    "predict output is an input image": _predict_output_is_an_input,
    "predict output is another kind of file": _predict_output_is_another_file,
    "predict output is a folder": _predict_output_is_a_folder,
    "predict output folder is a file": _predict_output_folder_is_a_file,
    "predict output folder read-only": _predict_output_folder_read_only,
    "predict image over the pixel cap": _predict_image_over_the_pixel_cap,
    "predict --batch_size 0": _predict_bad_option,
    "predict --figures is a file": _predict_figures_is_a_file,
    "predict checkpoint is a DeepSpeed folder": _predict_deepspeed_checkpoint,
    "fit --ckpt_path a DeepSpeed folder, no DeepSpeed strategy": _resume_deepspeed_folder_without_deepspeed,
    "DeepSpeed overlay without deepspeed installed": _deepspeed_overlay_without_deepspeed,
    "memory build on a non-checkpoint": _memory_build_not_a_checkpoint,
    "fit resume from random bytes": _resume_random_bytes,
    "fit resume from a plain state dict": _resume_state_dict,
}

# Cases that still print a traceback or a wrong line, each in a file this catalogue's owner does not own.
XFAIL: dict[str, str] = {}

SKIP: dict[str, str] = (
    {"DeepSpeed overlay without deepspeed installed": "deepspeed is installed here"}
    if importlib.util.find_spec("deepspeed") is not None
    else {}
)


def _params() -> list:
    params = []
    for name in CASES:
        marks = []
        if name in XFAIL:
            marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[name]))
        if name in SKIP:
            marks.append(pytest.mark.skip(reason=SKIP[name]))
        params.append(pytest.param(name, marks=marks, id=name.replace(" ", "-")))
    return params


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and each folder, as "dir"), by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run(case: Case, work: Path) -> subprocess.CompletedProcess:
    """Run a case's arguments through the ``amrg`` command in ``work`` (no --debug in the environment)."""
    env = {k: v for k, v in os.environ.items() if k != "AMRG_DEBUG"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "amrg.cli", *case.args],
        capture_output=True,
        text=True,
        cwd=work,
        env=env,
        timeout=300,
    )


def run_case(name: str, work: Path) -> tuple[Case, subprocess.CompletedProcess]:
    """Build case ``name`` in ``work`` and run it."""
    case = CASES[name](work)
    return case, _run(case, work)


@dataclass
class _Run:
    case: Case
    work: Path
    before: dict[str, str]
    done: Future


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Every selected case built and started at once, the slow ones first, a few processes at a time.

    The cases are independent processes; running them side by side brings the catalogue from the sum of
    ~45 start-ups to about half of it on 2 cores.
    """
    names = [
        item.callspec.params["name"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and not item.get_closest_marker("skip")
    ]
    started: dict[str, _Run] = {}
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        built = []
        for name in names:
            work = tmp_path_factory.mktemp("case") / "work"
            work.mkdir()
            case = CASES[name](work)
            built.append((name, case, work, _snapshot(work)))
        for name, case, work, before in sorted(built, key=lambda b: not b[1].slow):
            started[name] = _Run(case, work, before, pool.submit(_run, case, work))
        yield started


@pytest.mark.parametrize("name", _params())
def test_bad_input_is_one_line_naming_it_and_changes_nothing(name: str, runs: dict[str, _Run]) -> None:
    run = runs[name]
    res = run.done.result()
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == run.case.code, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("amrg: error: "), res.stderr[-3000:]
    for fragment in run.case.names:
        assert fragment in lines[0], (fragment, lines[0])
    if (run.work / "results").is_dir():
        (run.work / "results").chmod(0o755)  # the read-only case
    assert _snapshot(run.work) == run.before  # no input or earlier output changed, nothing left behind


def test_there_are_at_least_30_kinds() -> None:
    assert len(CASES) >= 30


if __name__ == "__main__":  # print each case's line, for the closing note
    import tempfile

    for case_name in [n for n in CASES if not sys.argv[1:] or any(a in n for a in sys.argv[1:])]:
        with tempfile.TemporaryDirectory() as d:
            _, done = run_case(case_name, Path(d))
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(nothing)"]
            print(f"| {case_name} | {done.returncode} | `{last[0].replace(d, '<tmp>')}` |")
