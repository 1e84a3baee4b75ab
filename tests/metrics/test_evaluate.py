"""amrg eval: prediction files scored as pycocoevalcap and the CE toy score them; comparisons; one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from amrg import cli
from amrg.data.cleaning import clean_report_mimic_cxr
from amrg.metrics.evaluate import EvalInputError, evaluate_files, read_predictions
from amrg.metrics.nlg import nlg_scores
from tests.metrics.test_clinical import EXPECTED, TOY, _toy_labeler
from tests.metrics.test_nlg import ROWS, _direct


def _write(path: Path, records, raw: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + raw, encoding="utf-8")
    return path


@pytest.fixture
def nlg_file(tmp_path: Path) -> Path:
    """The NLG rows of test_nlg as the metrics callback writes them (hypothesis + reference)."""
    return _write(tmp_path / "a.jsonl", [{"id": i, "hypothesis": h, "reference": r} for i, h, r in ROWS])


def _eval(*args: str, capsys) -> tuple[int, str, str]:
    try:
        cli.main(["eval", *args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_scores_equal_pycocoevalcap_directly(nlg_file: Path) -> None:
    result = evaluate_files(nlg_file, meteor=False, resamples=50)
    got = {k: v.value for k, v in result.systems["A"].intervals.items()}
    assert {k: got[k] for k in _direct(ROWS)} == _direct(ROWS)  # exact
    assert result.ids == tuple(sorted(i for i, _, _ in ROWS))
    assert result.labeler == "chexpert-rules"


def test_ce_equals_the_clinical_toy(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "toy.jsonl", [{"id": i, "report": h, "reference": r} for i, (h, r, _, _) in TOY.items()]
    )
    result = evaluate_files(path, meteor=False, labeler=_toy_labeler(), resamples=20)
    for key, value in EXPECTED.items():
        assert result.systems["A"].intervals[key].value == pytest.approx(value, abs=1e-12), key
    assert result.labeler == "TableLabeler"  # no `name`: the class name


def test_cli_writes_json_and_markdown_next_to_the_predictions(nlg_file: Path, capsys) -> None:
    code, out, err = _eval(str(nlg_file), "--no-meteor", "--resamples", "30", "--seed", "1", capsys=capsys)
    assert code == 0, err
    assert "| BLEU-4 |" in out and "| CE-14 micro F1 |" in out and "wrote" in out
    doc = json.loads((nlg_file.parent / "a.eval.json").read_text())
    assert doc["written_by"] == "amrg eval" and doc["labeler"] == "chexpert-rules" and doc["meteor"] is False
    assert doc["bootstrap"]["resamples"] == 30 and doc["bootstrap"]["seed"] == 1
    assert doc["bootstrap"]["p_value"].startswith("- two-sided p-value")
    metrics = doc["systems"]["A"]["metrics"]
    assert metrics["bleu4"]["value"] == _direct(ROWS)["bleu4"]
    assert len([k for k in metrics if k.startswith("ce/")]) == 36
    md = (nlg_file.parent / "a.eval.md").read_text()
    assert md.startswith("<!-- written by amrg eval") and "| CIDEr |" in md
    # A second run replaces its own files.
    assert _eval(str(nlg_file), "--no_meteor", "true", "--resamples", "30", capsys=capsys)[0] == 0


def test_line_order_does_not_change_any_number(nlg_file: Path, tmp_path: Path) -> None:
    lines = nlg_file.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[::-1]) + "\n\n")  # reversed, with a blank line
    a = evaluate_files(nlg_file, meteor=False, resamples=40)
    b = evaluate_files(shuffled, meteor=False, resamples=40)
    assert a.systems["A"].intervals == b.systems["A"].intervals


def test_compare_identical_files_gives_zero_and_p_one(nlg_file: Path, tmp_path: Path) -> None:
    # predict-images' layout ("report", no reference) for B, references from A's lines
    copy = _write(tmp_path / "b.jsonl", [{"id": i, "report": h, "reference": r} for i, h, r in ROWS])
    result = evaluate_files(nlg_file, compare=copy, meteor=False, resamples=100)
    assert result.difference is not None and len(result.difference) == len(result.systems["A"].intervals)
    for key, d in result.difference.items():
        assert (d.value, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0), key


def test_compare_writes_a_paired_table(nlg_file: Path, tmp_path: Path, capsys) -> None:
    worse = _write(tmp_path / "b.jsonl", [{"id": i, "report": ""} for i, _, _ in ROWS])
    out_dir = tmp_path / "results"
    code, out, err = _eval(
        str(nlg_file),
        "--compare",
        str(worse),
        "--no_meteor",
        "--resamples",
        "50",
        "--out",
        str(out_dir),
        capsys=capsys,
    )
    assert code == 0, err
    assert "A − B" in out and "| p |" in out
    doc = json.loads((out_dir / "a.vs.b.eval.json").read_text())
    d = doc["difference"]["bleu1"]
    assert d["value"] == d["a"] - d["b"] > 0 and 0 < d["p_value"] <= 1


def _annotation(tmp_path: Path, ids) -> Path:
    records = [
        {"id": i, "report": f"The heart is normal.\n Lungs: clear. Study {i}.", "image_path": [f"{i}.png"]}
        for i in ids
    ]
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({"train": [{**records[0], "id": "train_0"}], "test": records}))
    return path


def test_references_from_an_annotation_are_cleaned(tmp_path: Path) -> None:
    ann = _annotation(tmp_path, ["s1", "s2"])
    preds = _write(
        tmp_path / "p.jsonl",
        [
            {"id": "s1", "report": "the heart is normal ."},
            {"id": "s2", "report": "lungs clear .", "reference": "ignored"},
        ],
    )
    result = evaluate_files(preds, annotation=ann, cleaning="mimic_cxr", meteor=False, resamples=20)
    refs = [clean_report_mimic_cxr(f"The heart is normal.\n Lungs: clear. Study {i}.") for i in ("s1", "s2")]
    expected = nlg_scores(["the heart is normal .", "lungs clear ."], refs, meteor=False)
    assert {k: result.systems["A"].intervals[k].value for k in expected} == expected
    assert result.references == {
        "source": "annotation",
        "annotation": str(ann),
        "split": "test",
        "cleaning": "mimic_cxr",
    }


BAD_CASES = {
    # name: (file content, expected fragments of the one-line error)
    "not json": (
        '{"id": "a", "report": "x", "reference": "y"}\n{"id": "b", report}\n',
        ["p.jsonl:2", "not JSON"],
    ),
    "not an object": ('["a", "x"]\n', ["p.jsonl:1", "expected a JSON object"]),
    "no report": ('{"id": "a", "reference": "y"}\n', ["p.jsonl:1 id='a'", "'report'"]),
    "report not a string": ('{"id": "a", "report": 3, "reference": "y"}\n', ["p.jsonl:1 id='a'", "'report'"]),
    "no id": ('{"report": "x", "reference": "y"}\n', ["p.jsonl:1", "'id'"]),
    "duplicate id": (
        '{"id": "a", "report": "x", "reference": "y"}\n\n{"id": "a", "report": "z", "reference": "y"}\n',
        ["p.jsonl:3 id='a'", "duplicate id (first on line 1)"],
    ),
    "no reference": (
        '{"id": "a", "report": "x", "reference": "y"}\n{"id": "b", "report": "x"}\n',
        ["p.jsonl:2 id='b'", "no 'reference'"],
    ),
    "empty reference": (
        '{"id": "a", "report": "x", "reference": " "}\n',
        ["p.jsonl:1 id='a'", "'reference'"],
    ),
    "empty file": ("\n\n", ["p.jsonl", "empty file"]),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_predictions_give_one_line_and_exit_1(case: str, tmp_path: Path, capsys) -> None:
    content, fragments = BAD_CASES[case]
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    code, out, err = _eval(str(path), "--no_meteor", "--resamples", "10", capsys=capsys)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("amrg: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not (tmp_path / "p.eval.json").exists()


def test_annotation_and_compare_mismatches_are_one_line_errors(tmp_path: Path, capsys) -> None:
    ann = _annotation(tmp_path, ["s1", "s2"])
    good = _write(tmp_path / "p.jsonl", [{"id": "s1", "report": "x"}, {"id": "s2", "report": "y"}])
    stray = _write(tmp_path / "q.jsonl", [{"id": "s1", "report": "x"}, {"id": "s9", "report": "y"}])
    part = _write(tmp_path / "r.jsonl", [{"id": "s1", "report": "x"}])
    cases = [
        (
            [str(stray), "--annotation", str(ann), "--cleaning", "mimic_cxr"],
            ["q.jsonl:2 id='s9'", "id not in"],
        ),
        (
            [str(part), "--annotation", str(ann), "--cleaning", "mimic_cxr"],
            ["r.jsonl", "1 of the 2", "id='s2'"],
        ),
        ([str(good), "--annotation", str(ann)], ["--annotation needs --cleaning"]),
        (
            [str(good), "--annotation", str(ann), "--cleaning", "iu_xray", "--compare", str(part)],
            ["r.jsonl", "no prediction for id='s2'"],
        ),
        (
            [str(good), "--annotation", str(ann), "--cleaning", "iu_xray", "--split", "val"],
            ["annotation.json", "val"],
        ),
        ([str(tmp_path / "missing.jsonl")], ["missing.jsonl", "not found"]),
        ([str(good), "--labeler", "chexbert"], ["--chexbert_weights"]),
    ]
    for args, fragments in cases:
        code, _, err = _eval(*args, "--no_meteor", "--resamples", "10", capsys=capsys)
        assert code == 1 and err.count("\n") == 1, (args, err)
        for fragment in fragments:
            assert fragment in err, (fragment, err)


def test_user_files_are_never_overwritten(nlg_file: Path, capsys) -> None:
    mine = nlg_file.parent / "a.eval.md"
    mine.write_text("my notes\n")
    code, _, err = _eval(str(nlg_file), "--no_meteor", "--resamples", "10", capsys=capsys)
    assert code == 1 and "a.eval.md: exists and was not written by amrg eval" in err
    assert mine.read_text() == "my notes\n"
    assert not (nlg_file.parent / "a.eval.json").exists()  # checked before anything is written


def test_one_line_error_from_the_console_script(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "report": "x", "reference": "y"}\nnot json\n')
    res = subprocess.run(
        [sys.executable, "-m", "amrg.cli", "eval", str(path), "--no-meteor"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and f"{path}:2: not JSON" in res.stderr, res.stderr


def test_read_predictions_accepts_both_layouts(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "p.jsonl", [{"id": "a", "report": "x"}, {"id": 7, "hypothesis": "y", "reference": "r"}]
    )
    pred = read_predictions(path)
    assert (
        pred.reports == {"a": "x", "7": "y"}
        and pred.references == {"7": "r"}
        and pred.lines == {"a": 1, "7": 2}
    )
    clash = _write(tmp_path / "c.jsonl", [{"id": "a", "report": "x", "hypothesis": "z"}])
    with pytest.raises(EvalInputError, match="c.jsonl:1 id='a'"):
        read_predictions(clash)


def test_chexbert_labeler_from_local_weights(nlg_file: Path, tmp_path: Path, capsys) -> None:
    from amrg.labeling import build_labeler
    from amrg.metrics.clinical import ce_scores
    from tests.labeling.test_chexbert import tiny_chexbert

    weights, _, config, _ = tiny_chexbert(tmp_path)  # chexbert.pth with vocab.txt beside it
    (tmp_path / "config.json").write_text((config / "config.json").read_text())  # the tiny BERT's sizes
    code, _, err = _eval(
        str(nlg_file),
        "--labeler",
        "chexbert",
        "--chexbert_weights",
        str(weights),
        "--no_meteor",
        "--resamples",
        "20",
        capsys=capsys,
    )
    assert code == 0, err
    doc = json.loads((nlg_file.parent / "a.eval.json").read_text())
    assert doc["labeler"] == "chexbert:chexbert.pth"
    rows = sorted(ROWS)
    labeler = build_labeler("chexbert", chexbert_weights=weights)
    expected = ce_scores(labeler.label_batch([r[1] for r in rows]), labeler.label_batch([r[2] for r in rows]))
    got = doc["systems"]["A"]["metrics"]
    assert {k: got[k]["value"] for k in expected} == expected
    code, _, err = _eval(
        str(nlg_file),
        "--labeler",
        "chexbert",
        "--chexbert_weights",
        str(tmp_path / "no.pth"),
        "--no_meteor",
        capsys=capsys,
    )
    assert code == 1 and err.count("\n") == 1 and "no.pth not found" in err
