"""ReportGenerator: prefix shapes, loss, freezing, LoRA, generation, explanations (no files, tiny parts).

The helpers at the top also build the tiny stage-1 checkpoint and memory banks that
tests/modules/test_reporter_module.py and tests/test_predict.py use.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from amrg.errors import ConfigError
from amrg.labels import LABELS
from amrg.memory.bank import MemoryBank
from amrg.models.classifier import DiseaseClassifier
from amrg.models.llm import apply_lora, build_tiny_llm, freeze
from amrg.models.qformer import DiseaseQFormer
from amrg.models.reporter import RecalledItem, ReportGenerator
from amrg.models.retrievers import HopfieldRetriever, NoRetriever
from amrg.models.tokenizer import train_report_tokenizer
from amrg.models.vision import VisionEncoder

IMAGE_SIZE = 32
WIDTH = 32  # Q-Former width D
REPORT_DIM = 24  # report-memory (text encoder) width
ENCODER = dict(img_size=IMAGE_SIZE, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
QFORMER = dict(
    vision_width=32, hidden_size=WIDTH, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0
)
RETRIEVER = dict(num_heads=2, hidden_size=8, dropout=0.0)
REPORTS = [
    "the heart is normal in size. the lungs are clear. no pleural effusion.",
    "small left pleural effusion. mild cardiomegaly.",
    "mild cardiomegaly is present. no pneumothorax is seen. the mediastinum is unremarkable.",
    "there is a right lower lobe opacity concerning for pneumonia.",
]
# 4 slots in 5 labels each: visual slots 0..14 and report slots 0..9 in label order.
MEMORY_LABELS = LABELS[:5]


# --------------------------------------------------------------------------------------------------
# Helpers shared with the module and predict tests


def tiny_classifier(seed: int = 0, num_queries: int = 14, multi_view: str = "mean") -> DiseaseClassifier:
    torch.manual_seed(seed)
    qformer = dict(QFORMER, num_queries=num_queries)
    return DiseaseClassifier(VisionEncoder(**ENCODER, multi_view=multi_view), DiseaseQFormer(**qformer))


def stage1_config(num_queries: int = 14, hidden_size: int = WIDTH) -> dict:
    """The net config LightningCLI stores in a stage-1 checkpoint (class_path/init_args)."""
    return {
        "class_path": "amrg.models.classifier.DiseaseClassifier",
        "init_args": {
            "encoder": {"class_path": "amrg.models.vision.VisionEncoder", "init_args": dict(ENCODER)},
            "qformer": {
                "class_path": "amrg.models.qformer.DiseaseQFormer",
                "init_args": dict(QFORMER, num_queries=num_queries, hidden_size=hidden_size),
            },
        },
    }


def write_stage1_checkpoint(
    path: Path, num_queries: int = 14, hidden_size: int = WIDTH, seed: int = 0
) -> Path:
    """A stage-1 checkpoint as `amrg fit` writes it: net.* weights plus the net config."""
    torch.manual_seed(seed)
    qformer = dict(QFORMER, num_queries=num_queries, hidden_size=hidden_size)
    net = DiseaseClassifier(VisionEncoder(**ENCODER), DiseaseQFormer(**qformer))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"net": stage1_config(num_queries, hidden_size)},
        },
        path,
    )
    return path


def tiny_banks(
    visual_dim: int = WIDTH, ids: tuple[str, ...] = (), seed: int = 0
) -> tuple[MemoryBank, MemoryBank]:
    """A visual bank [15, visual_dim] and a report bank [10, REPORT_DIM] over 5 labels, train ids only."""
    g = torch.Generator().manual_seed(seed)
    visual, report = MemoryBank("visual", visual_dim), MemoryBank("report", REPORT_DIM)
    for i, label in enumerate(MEMORY_LABELS):
        visual.add(
            label,
            torch.randn(3, visual_dim, generator=g),
            [
                {"source_id": f"train_{i:03d}", "split": "train", "box": [0, 0, 8, 8], "view": 0}
                for _ in range(3)
            ],
        )
        report.add(
            label,
            torch.randn(2, REPORT_DIM, generator=g),
            [
                {"source_id": f"train_{i + j:03d}", "split": "train", "text": REPORTS[(i + j) % 4]}
                for j in range(2)
            ],
        )
    for source_id in ids:  # e.g. an evaluation id, for the leakage guard
        report.add(
            LABELS[0],
            torch.randn(1, REPORT_DIM, generator=g),
            [{"source_id": source_id, "split": "val", "text": "leak"}],
        )
    return visual, report


def write_memory(
    folder: Path, stage1: Path, visual_dim: int = WIDTH, ids: tuple[str, ...] = (), seed: int = 0
) -> Path:
    """A memory folder (both banks + manifest) as `amrg memory build` writes it, mined with ``stage1``."""
    from amrg.checkpoints.memory import write_memory_folder
    from amrg.checkpoints.stage1 import file_sha256

    visual, report = tiny_banks(visual_dim, ids, seed=seed)
    info = {"stage1_checkpoint": str(stage1), "stage1_checkpoint_sha256": file_sha256(stage1), "seed": 0}
    return write_memory_folder(folder, {"visual": visual, "report": report}, {**info, "split": "train"})


def train_reports(n: int = 60) -> list[str]:
    return [REPORTS[i % len(REPORTS)] for i in range(n)]


def tiny_tokenizer(folder: Path, style: str = "llama") -> PreTrainedTokenizerBase:
    return train_report_tokenizer(
        train_reports(),
        folder,
        vocab_size=400,
        style=style,  # type: ignore[arg-type]
    )


def tiny_llm(tokenizer: PreTrainedTokenizerBase, family: str = "llama", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_tiny_llm(
        tokenizer, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, family=family
    )  # type: ignore[arg-type]


def batch(n: int = 2, views: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, views, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    view_mask = torch.ones(n, views, dtype=torch.bool)
    view_mask[-1, -1] = False  # a one-view study in a two-view batch
    return images, view_mask


def make_generator(
    tokenizer: PreTrainedTokenizerBase,
    family: str = "llama",
    llm_training: str = "full",
    multi_view: str = "mean",
    report_retriever: type[nn.Module] = HopfieldRetriever,
    **kwargs,
) -> ReportGenerator:
    classifier = tiny_classifier(multi_view=multi_view)
    visual, report = tiny_banks()
    v_patterns, _, v_prov = visual.stacked()
    r_patterns, _, r_prov = report.stacked()
    llm = tiny_llm(tokenizer, family)
    if llm_training == "lora":
        llm = apply_lora(llm, r=4, alpha=8, dropout=0.0)
    elif llm_training == "frozen":
        llm = freeze(llm)
    r_kwargs = RETRIEVER if report_retriever is not NoRetriever else {}
    options = dict(max_report_tokens=24, num_beams=2, min_new_tokens=2, max_new_tokens=6)
    options.update(kwargs)
    return ReportGenerator(
        classifier=classifier,
        llm=llm,
        tokenizer=tokenizer,
        visual_retriever=HopfieldRetriever(WIDTH, v_patterns, **RETRIEVER),
        report_retriever=report_retriever(WIDTH, r_patterns, **r_kwargs),
        visual_provenance=v_prov,
        report_provenance=r_prov,
        **options,
    )


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PreTrainedTokenizerBase]:
    root = tmp_path_factory.mktemp("reporter_tokenizers")
    return {style: tiny_tokenizer(root / style, style) for style in ("llama", "qwen")}


# --------------------------------------------------------------------------------------------------
# Shapes, loss, gradients


@pytest.mark.parametrize("multi_view", ["mean", "concat"])
def test_prefix_shapes_and_backward_reach_every_trainable_parameter(tokenizers, multi_view: str) -> None:
    net = make_generator(tokenizers["llama"], multi_view=multi_view)
    images, view_mask = batch()
    visual = net.encode(images, view_mask)
    per_view = (IMAGE_SIZE // 4 // 2) ** 2  # Swin: patch 4, one patch merge -> 4x4 = 16 tokens per view
    n_tokens = per_view * (2 if multi_view == "concat" else 1)
    assert visual.prefix.shape == (2, n_tokens + 3 * 14, 32)  # [B, N + 3Q, H]
    assert visual.logits.shape == (2, 14)
    assert torch.isfinite(visual.prefix).all()
    if multi_view == "concat":
        assert visual.prefix_mask is not None and visual.prefix_mask.shape == (2, n_tokens + 42)
        assert not visual.prefix_mask[1, per_view:n_tokens].any()  # the missing view is masked
        assert visual.prefix_mask[1, n_tokens:].all()
    else:
        assert visual.prefix_mask is None

    loss = net(images, view_mask, REPORTS[:2])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("classifier.") for n in trainable)  # stage 1 frozen by default
    no_grad = sorted(n for n, p in net.named_parameters() if p.requires_grad and p.grad is None)
    assert no_grad == []
    assert all(p.grad is None for p in net.classifier.parameters())


def test_loss_falls_over_a_few_steps(tokenizers) -> None:
    net = make_generator(tokenizers["llama"])
    images, view_mask = batch()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = net(images, view_mask, REPORTS[:2])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_unfrozen_qformer_trains_and_frozen_parts_stay_in_eval_mode(tokenizers) -> None:
    net = make_generator(tokenizers["llama"], freeze_qformer=False)
    net.train()
    assert not net.classifier.encoder.training and not net.classifier.head.training
    assert net.classifier.qformer.training and net.prefix_norm.training
    images, view_mask = batch()
    net(images, view_mask, REPORTS[:2]).backward()
    assert net.classifier.qformer.queries.grad is not None
    assert all(p.grad is None for p in net.classifier.encoder.parameters())
    assert all(not p.requires_grad for p in net.classifier.head.parameters())


def test_with_lora_only_adapters_prefix_and_retrievers_train(tokenizers) -> None:
    net = make_generator(tokenizers["llama"], llm_training="lora")
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    allowed = ("prefix_proj.", "prefix_norm.", "visual_retriever.", "report_retriever.")
    assert all(n.startswith(allowed) or (n.startswith("llm.") and ".lora_" in n) for n in trainable), (
        trainable
    )
    assert any(".lora_A." in n for n in trainable) and any(
        n.startswith("visual_retriever.") for n in trainable
    )
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    images, view_mask = batch()
    for _ in range(2):  # LoRA's B starts at zero: A moves only from the second step
        optimizer.zero_grad()
        net(images, view_mask, REPORTS[:2]).backward()
        optimizer.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= set(trainable)
    assert {n for n in trainable if ".lora_" in n} <= changed
    # The stored patterns are buffers: untouched.
    assert not any("memory" in n for n in changed)


def test_width_mismatches_are_named(tokenizers) -> None:
    tok = tokenizers["llama"]
    classifier = tiny_classifier()
    with pytest.raises(ValueError, match=r"visual_retriever \(HopfieldRetriever\) has dim=16 .* 32 wide"):
        ReportGenerator(
            classifier,
            tiny_llm(tok),
            tok,
            HopfieldRetriever(16, torch.randn(3, 32), **RETRIEVER),
            HopfieldRetriever(WIDTH, torch.randn(3, REPORT_DIM), **RETRIEVER),
        )
    with pytest.raises(ValueError, match="stores patterns of width 20"):
        ReportGenerator(
            classifier,
            tiny_llm(tok),
            tok,
            HopfieldRetriever(WIDTH, torch.randn(3, 20), **RETRIEVER),
            HopfieldRetriever(WIDTH, torch.randn(3, REPORT_DIM), **RETRIEVER),
        )


# --------------------------------------------------------------------------------------------------
# Generation and explanations


@pytest.mark.parametrize(("style", "family"), [("llama", "llama"), ("qwen", "qwen2")])
def test_generate_returns_text_for_llama_and_qwen_style_tokenizers(
    tokenizers, style: str, family: str
) -> None:
    net = make_generator(tokenizers[style], family=family)
    assert net.prompt.template == ("chat" if style == "qwen" else "plain")
    images, view_mask = batch(3)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(3):
        optimizer.zero_grad()
        net(images, view_mask, REPORTS[:3]).backward()
        optimizer.step()
    net.train()
    reports = net.generate(images, view_mask, max_new_tokens=8)
    assert net.training  # generate restores the mode
    assert isinstance(reports, list) and len(reports) == 3
    assert all(isinstance(r, str) for r in reports) and any(r for r in reports)
    # Deterministic: beam search, eval mode inside generate.
    assert net.generate(images, view_mask, max_new_tokens=8) == reports
    with pytest.raises(ValueError, match="unknown decoding option"):
        net.generate(images, view_mask, temperature=0.7)


def test_predict_gives_probabilities_and_ranked_explanations(tokenizers) -> None:
    net = make_generator(tokenizers["llama"])
    images, view_mask = batch()
    pred = net.predict(images, view_mask, top_k=3)
    assert len(pred.reports) == 2 and pred.probabilities.shape == (2, 14)
    assert torch.allclose(pred.probabilities, torch.sigmoid(net.classifier(images, view_mask)), atol=1e-5)
    for items in pred.explanations:
        visual = [i for i in items if i.memory == "visual"]
        report = [i for i in items if i.memory == "report"]
        assert len(visual) == 3 and len(report) == 3
        for group, provenance in ((visual, net.visual_provenance), (report, net.report_provenance)):
            weights = [i.weight for i in group]
            assert weights == sorted(weights, reverse=True) and all(0.0 < w <= 1.0 for w in weights)
            for item in group:
                assert item.source_id == provenance[item.slot]["source_id"]
                assert item.label == provenance[item.slot]["label"]
        assert all(i.text in REPORTS for i in report) and all(i.text is None for i in visual)
        # the visual rows' provenance gives the view and the patch box (tiny_banks: view 0, [0, 0, 8, 8])
        assert all(i.view == 0 and i.box == (0.0, 0.0, 8.0, 8.0) and i.image is None for i in visual)
        assert all(i.view is None and i.box is None for i in report)
    as_dict = pred.explanations[0][-1].as_dict()
    stored_under = [r["label"] for r in net.report_provenance if r["source_id"] == as_dict["source_id"]]
    assert len(stored_under) == 2  # tiny_banks stores each report under two labels: "labels" names both
    assert list(as_dict) == ["memory", "source_id", "label", "labels", "text", "weight"]
    assert sorted(as_dict["labels"]) == sorted(stored_under)
    visual_dict = pred.explanations[0][0].as_dict()
    assert list(visual_dict) == ["memory", "source_id", "label", "view", "box", "weight"]
    assert visual_dict["box"] == [0.0, 0.0, 8.0, 8.0]
    full = RecalledItem("visual", "s", "Edema", 0.5, 1, view=1, box=(1, 2, 3, 4), image="s/1.png").as_dict()
    assert list(full) == ["memory", "source_id", "label", "view", "box", "image", "weight"]
    assert list(RecalledItem("visual", "s", "Edema", 0.5, 1).as_dict()) == [
        "memory",
        "source_id",
        "label",
        "weight",
    ]


def test_a_report_stored_under_several_labels_is_recalled_once(tokenizers) -> None:
    """The report memory stores a report once per label; its explanation lists each report once, with its
    rows' weights summed and every label it is stored under, so the top items are distinct reports."""
    net = make_generator(tokenizers["llama"]).eval()
    images, view_mask = batch()
    with torch.no_grad():
        visual = net.encode(images, view_mask, return_attention=True)
    items = net.explain_from_prefix(visual, top_k=100)
    rows = visual.report_attention.float().mean(dim=(1, 2))  # [B, M], the weight of every stored row
    sources = sorted({r["source_id"] for r in net.report_provenance})
    for b, study in enumerate(items):
        report = [i for i in study if i.memory == "report"]
        assert sorted(i.source_id for i in report) == sources  # each report once, none left out
        for item in report:
            mine = [k for k, r in enumerate(net.report_provenance) if r["source_id"] == item.source_id]
            assert item.weight == pytest.approx(float(rows[b, mine].sum()), rel=1e-5)
            assert item.slot == max(mine, key=lambda k: float(rows[b, k]))  # label/slot: its heaviest row
            assert item.labels == tuple(
                label for label in LABELS if label in {net.report_provenance[k]["label"] for k in mine}
            )
        visual_items = [i for i in study if i.memory == "visual"]
        assert len(visual_items) == len(net.visual_provenance)  # every patch is its own item
        assert all(i.labels == (i.label,) for i in visual_items)
    assert sum(i.weight for i in items[0] if i.memory == "report") == pytest.approx(1.0, rel=1e-5)


def test_no_retriever_explains_nothing_and_mismatched_provenance_is_refused(tokenizers) -> None:
    net = make_generator(tokenizers["llama"], report_retriever=NoRetriever)
    images, view_mask = batch()
    pred = net.predict(images, view_mask, top_k=2)
    assert all({i.memory for i in items} == {"visual"} for items in pred.explanations)
    net.set_provenance(visual=net.visual_provenance[:-1])
    with pytest.raises(ValueError, match="visual memory: 14 provenance records for 15 attended slots"):
        net.predict(images, view_mask, top_k=2)


# --------------------------------------------------------------------------------------------------
# The throughput benchmark's CPU smoke path


def _load_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "stage2_throughput.py"
    spec = importlib.util.spec_from_file_location("stage2_throughput", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_benchmark_tiny_path_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_benchmark()
    out = tmp_path / "bench.json"
    results = bench.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "train samples/s" in printed and "reports/s" in printed
    assert {r["measure"] for r in results} >= {"train", "generate"}
    assert all(r["value"] > 0 for r in results)
    assert out.is_file()


def test_throughput_benchmark_times_the_fast_path(capsys: pytest.CaptureFixture[str]) -> None:
    bench = _load_benchmark()
    args = ["--tiny", "--device", "cpu", "--no-train", "--eval-batches", "2", "--cache", "static"]
    results = bench.main([*args, "--compile", "default"])
    assert [r["measure"] for r in results] == ["generate", "generate_bare_llm"]
    assert "cache static, compile default" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a compiled step needs the static cache
        bench.main(["--tiny", "--device", "cpu", "--compile", "default"])


def test_throughput_benchmark_flops_on_meta_equal_real_tensors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--flops counts by shape: the meta device (how the 7B model is counted without its weights) must
    give exactly the counts of real CPU tensors, split by module group with nothing left over."""
    bench = _load_benchmark()
    out = tmp_path / "flops.json"
    meta = bench.main(["--tiny", "--flops", "--json", str(out)])
    real = bench.main(["--tiny", "--flops", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "module group" in printed and "bare LLM" in printed

    def by_measure(results: list[dict]) -> dict[str, dict]:
        return {r["measure"]: {k: v for k, v in r.items() if k != "device"} for r in results}

    counts = by_measure(meta)
    assert counts == by_measure(real)
    assert set(counts) == {"train_flops", "train_flops_bare_llm", "prefill_flops", "prefill_flops_bare_llm"}
    for step in ("train_flops", "prefill_flops"):
        full, bare = counts[step], counts[f"{step}_bare_llm"]
        groups = full["groups"]
        assert sum(groups.values()) == full["value"] > bare["value"] > 0
        assert all(groups[g] > 0 for g in ("vision encoder", "Q-Former", "retrievers", "prefix projection"))
        assert groups["other"] < 0.001 * full["value"]  # the stage-1 head only
        parts = {g: v for g, v in full["overhead"].items() if g != "total"}  # the groups' parts add up
        assert sum(parts.values()) == pytest.approx(full["overhead"]["total"])
    # The prefill runs the same LLM ops as the bare LLM; training adds the backward into the prefix.
    assert counts["prefill_flops"]["groups"]["LLM"] == counts["prefill_flops_bare_llm"]["value"]
    assert counts["train_flops"]["groups"]["LLM"] > counts["train_flops_bare_llm"]["value"]
    assert json.loads(out.read_text())["results"] == meta


def test_pooled_queries_ablation_makes_every_query_the_same(tokenizers) -> None:
    net = make_generator(tokenizers["llama"], queries="pooled").eval()
    images, view_mask = batch()
    visual = net.encode(images, view_mask, return_attention=True)
    disease_slots = visual.prefix[:, -3 * 14 : -2 * 14]  # [B, Q, H], the projected query tokens
    assert torch.allclose(disease_slots, disease_slots[:, :1].expand_as(disease_slots))
    reference = make_generator(tokenizers["llama"]).eval().encode(images, view_mask)
    assert torch.equal(visual.logits, reference.logits)  # stage-1 probabilities still from disease tokens
    assert not torch.allclose(visual.prefix, reference.prefix)
    with pytest.raises(ValueError, match="queries must be 'disease' or 'pooled'"):
        make_generator(tokenizers["llama"], queries="mean")


def test_findings_prompt_states_the_stage1_positives_in_training_and_generation(tokenizers) -> None:
    instruction = "Findings: <FindingsHere>. Write the report."
    net = make_generator(tokenizers["llama"], instruction=instruction, findings_threshold=0.5).eval()
    images, view_mask = batch()
    visual = net.encode(images, view_mask)
    visual.logits = torch.full_like(visual.logits, -5.0)
    visual.logits[0, [LABELS.index("Cardiomegaly"), LABELS.index("Edema")]] = 0.1  # p = 0.525
    visual.logits[1, LABELS.index("Edema")] = -0.1  # p = 0.475: below the threshold
    assert net.findings(visual) == [["Cardiomegaly", "Edema"], []]
    assert make_generator(tokenizers["llama"]).findings(visual) is None  # no placeholder, no findings
    loss = net.loss_from_prefix(visual, ["heart is enlarged.", "lungs are clear."])
    assert torch.isfinite(loss)
    # What is stated changes what is written: the same prefix with other findings gives other logits.
    shifted = net.encode(images, view_mask)
    shifted.logits = visual.logits.flip(0)
    assert net.findings(shifted) == [[], ["Cardiomegaly", "Edema"]]
    assert net.loss_from_prefix(shifted, ["heart is enlarged.", "lungs are clear."]) != loss
    assert len(net.generate_from_prefix(visual, num_beams=1, max_new_tokens=3, min_new_tokens=1)) == 2
    with pytest.raises(ValueError, match=r"findings_threshold must be in \(0, 1\)"):
        make_generator(tokenizers["llama"], instruction=instruction, findings_threshold=1.0)


def _study(visual, i: int):
    """Study ``i`` of an encoded batch, as a batch of one."""
    mask = None if visual.prefix_mask is None else visual.prefix_mask[i : i + 1]
    return type(visual)(visual.prefix[i : i + 1], mask, visual.logits[i : i + 1])


def test_findings_embedding_starts_as_a_no_op_and_trains_the_stated_labels_rows(tokenizers) -> None:
    torch.manual_seed(0)
    plain = make_generator(tokenizers["llama"]).eval()
    net = make_generator(tokenizers["llama"], findings_embedding=True, training_findings="labels").eval()
    missing = net.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["findings_embed"] and plain.findings_embed is None
    assert net.findings_embed.shape == (14, net.llm_hidden_size) and not net.findings_embed.any()
    images, view_mask = batch()
    visual = net.encode(images, view_mask)
    labels = torch.zeros(2, 14)
    labels[0, LABELS.index("Edema")] = labels[1, LABELS.index("Fracture")] = 1
    labels[1, LABELS.index("Pneumonia")] = -1  # uncertain: not stated
    reports = ["heart is enlarged.", "lungs are clear."]
    # zero vectors: the same loss and the same reports as without the embedding
    assert torch.equal(net.loss_from_prefix(visual, reports, labels), plain.loss_from_prefix(visual, reports))
    assert net.generate_from_prefix(visual) == plain.generate_from_prefix(visual)
    # training states the labels (training_findings="labels"): only their rows get a gradient
    net.train()
    net.loss_from_prefix(visual, reports, labels).backward()
    grad = net.findings_embed.grad
    rows = {LABELS.index("Edema"), LABELS.index("Fracture")}
    assert all(grad[q].abs().sum() > 0 for q in rows)
    assert not grad[[q for q in range(14) if q not in rows]].any()
    offset = net.findings_offset(visual, labels)
    torch.testing.assert_close(offset[1], net.findings_embed[LABELS.index("Fracture")])


def test_findings_embedding_conditions_every_beam_of_every_study(tokenizers) -> None:
    torch.manual_seed(0)
    net = make_generator(tokenizers["llama"], findings_embedding=True, max_new_tokens=8).eval()
    images, view_mask = batch(3)
    visual = net.encode(images, view_mask)
    visual.logits = torch.full_like(visual.logits, -5.0)
    visual.logits[0, LABELS.index("Cardiomegaly")] = visual.logits[2, LABELS.index("Edema")] = 5.0
    before = net.generate_from_prefix(visual, num_beams=3)
    with torch.no_grad():
        net.findings_embed.normal_(0.0, 1.0)
    batched = net.generate_from_prefix(visual, num_beams=3)
    # each study's beams get its own vector: the batch writes what each study alone writes
    assert batched == [net.generate_from_prefix(_study(visual, i), num_beams=3)[0] for i in range(3)]
    assert batched[1] == before[1]  # nothing stated: a zero vector
    assert batched[0] != before[0] and batched[2] != before[2]
    # a ConfigError (a ValueError): `amrg fit` prints it as one line
    with pytest.raises(ConfigError, match="findings_embedding does not combine with compile"):
        make_generator(tokenizers["llama"], findings_embedding=True, cache="static", compile="default")
    with pytest.raises(ConfigError, match="findings_embedding does not combine with compile"):
        net.generate_from_prefix(visual, cache="static", compile="default")


# --------------------------------------------------------------------------------------------------
# The auxiliary association loss


def test_association_loss_is_minus_log_matching_mass_and_training_it_raises_that_mass(tokenizers) -> None:
    torch.manual_seed(0)
    net = make_generator(tokenizers["llama"])
    images, view_mask = batch()
    labels = torch.zeros(2, 14)
    labels[0, LABELS.index(MEMORY_LABELS[0])] = 1
    labels[1, LABELS.index(MEMORY_LABELS[1])] = 1
    labels[1, LABELS.index(MEMORY_LABELS[2])] = -1  # uncertain is not positive
    visual = net.encode(images, view_mask, return_attention=True)

    # By hand: head-mean weights over memory rows, share on rows of the study's positive labels.
    expected = []
    for attention, skip, provenance in (
        (visual.visual_attention, 14, net.visual_provenance),
        (visual.report_attention, 0, net.report_provenance),
    ):
        rows = attention[..., skip:].mean(dim=1)  # [B, Q, M]
        rows = rows / rows.sum(-1, keepdim=True)
        match = torch.tensor(
            [[labels[b, LABELS.index(r["label"])] == 1 for r in provenance] for b in range(2)]
        )
        expected.append(-torch.log((rows * match.unsqueeze(1)).sum(-1)).mean())
    loss = net.association_loss(visual, labels)
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-5)

    # A study without a positive label adds nothing; no positives at all give exactly 0.
    assert net.association_loss(visual, torch.zeros(2, 14)).item() == 0.0
    with pytest.raises(ValueError, match=r"labels must be \[B=2, 14\]"):
        net.association_loss(visual, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="return_attention=True"):
        net.association_loss(net.encode(images, view_mask), labels)

    # Trained on it alone, the retrievers move their weight onto the matching rows.
    params = [p for n, p in net.named_parameters() if "retriever" in n and p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    net.train()
    for _ in range(30):
        optimizer.zero_grad()
        net.association_loss(net.encode(images, view_mask, return_attention=True), labels).backward()
        optimizer.step()
    net.eval()
    after = net.association_loss(net.encode(images, view_mask, return_attention=True), labels)
    assert after.item() < 0.5 * loss.item()
