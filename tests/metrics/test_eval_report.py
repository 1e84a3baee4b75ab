"""amrg eval's outputs: file names, the overwrite guard, table rows per protocol, the JSON record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from amrg.metrics.eval_report import (
    CE_PROTOCOLS,
    check_targets,
    markdown_table,
    output_paths,
    result_json,
    write_outputs,
)
from amrg.metrics.evaluate import EvalInputError, evaluate_files
from tests.metrics.test_clinical import TOY, _toy_labeler


@pytest.fixture
def result(tmp_path: Path):
    path = tmp_path / "toy.jsonl"
    path.write_text(
        "".join(json.dumps({"id": i, "report": h, "reference": r}) + "\n" for i, (h, r, _, _) in TOY.items())
    )
    return evaluate_files(path, meteor=False, labeler=_toy_labeler(), resamples=25, seed=2)


def test_output_paths() -> None:
    assert output_paths(Path("runs/test.jsonl")) == (Path("runs/test.eval.json"), Path("runs/test.eval.md"))
    assert output_paths(Path("a/x.jsonl"), Path("b/y.jsonl"), Path("out")) == (
        Path("out/x.vs.y.eval.json"),
        Path("out/x.vs.y.eval.md"),
    )


def test_table_has_a_row_per_protocol_statistic(result) -> None:
    table = markdown_table(result)
    assert table.splitlines()[0].startswith("<!-- written by amrg eval")
    for proto in CE_PROTOCOLS.values():
        for stat in ("P", "R", "F1"):
            assert f"| {proto['label']} {stat} |" in table
    assert "| METEOR |" not in table  # METEOR off: no row
    assert "**3 studies**" in table and "`TableLabeler`" in table and "25 resamples, seed 2" in table


def test_json_records_protocols_bootstrap_and_every_score(result) -> None:
    doc = result_json(result)
    json.dumps(doc)  # plain JSON
    assert doc["protocols"]["ce14_micro_u0"]["keys"]["f1"] == "ce/micro_f1/14/u0"
    assert doc["protocols"]["ce5_micro_u1"]["keys"]["f1"] == "ce/micro_f1/5/u1"
    assert doc["bootstrap"]["p_value"].startswith(
        "- two-sided p-value (percentile-interval inversion): p = min("
    )
    assert "2 * (min(#{r: d*_r <= 0}, #{r: d*_r >= 0}) + 1) / (R + 1)" in doc["bootstrap"]["p_value"]
    assert doc["bootstrap"]["resampling"]["cider"].startswith("approximation")
    metrics = doc["systems"]["A"]["metrics"]
    assert all(m["low"] <= m["high"] for m in metrics.values())
    assert "difference" not in doc


def test_targets_that_are_inputs_or_foreign_files_are_refused(result, tmp_path: Path) -> None:
    json_path, md_path = tmp_path / "r.eval.json", tmp_path / "r.eval.md"
    with pytest.raises(EvalInputError, match="is an input of this run"):
        check_targets([json_path, md_path], [md_path])
    write_outputs(result, json_path, md_path, inputs=[])
    write_outputs(result, json_path, md_path, inputs=[])  # ours: replaced
    json_path.write_text('{"written_by": "someone else"}')
    with pytest.raises(EvalInputError, match="r.eval.json: exists and was not written by amrg eval"):
        write_outputs(result, json_path, md_path, inputs=[])
    assert json.loads(json_path.read_text()) == {"written_by": "someone else"}
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind
