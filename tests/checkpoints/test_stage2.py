"""Stage 2 built outside Lightning; its checkpoint is the whole model and never runs code on load."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from amrg.checkpoints.memory import MemoryFolderError
from amrg.checkpoints.safety import UntrustedCheckpointError
from amrg.checkpoints.stage2 import (
    RECORD_KEY,
    DecodingConfig,
    TinyLLMConfig,
    build_report_generator,
    load_stage2,
)
from amrg.models.llm import LoRAConfig
from amrg.models.reporter import ReportGenerator
from amrg.models.retrievers import CrossAttentionRetriever, HopfieldRetriever
from amrg.modules.reporter import ReporterModule
from tests.models.test_reporter import (
    REPORTS,
    RETRIEVER,
    WIDTH,
    batch,
    tiny_llm,
    tiny_tokenizer,
    write_memory,
    write_stage1_checkpoint,
)

TINY = TinyLLMConfig(
    hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=400, min_frequency=1
)
DECODING = DecodingConfig(num_beams=2, min_new_tokens=2, max_new_tokens=6)


def stage2_files(root: Path, seed: int = 0) -> dict[str, Path]:
    """A stage-1 checkpoint and a memory folder mined with it."""
    stage1 = write_stage1_checkpoint(root / "stage1.ckpt", seed=seed)
    return {"stage1": stage1, "memory": write_memory(root / "memory", stage1)}


def build(files: dict[str, Path], **overrides: Any) -> ReportGenerator:
    options: dict[str, Any] = dict(
        stage1_checkpoint=files["stage1"],
        memory=files["memory"],
        visual_retriever=functools.partial(HopfieldRetriever, **RETRIEVER),
        report_retriever=functools.partial(HopfieldRetriever, **RETRIEVER),
        tiny_llm=TINY,
        llm_training="full",
        max_report_tokens=24,
        decoding=DECODING,
    )
    options.update(overrides)
    return build_report_generator(**options)


def save(net: ReportGenerator, path: Path, **module_args: Any) -> Path:
    """Write a stage-2 checkpoint the way a Trainer does (hooks included) without running a loop."""
    module = ReporterModule(net, **module_args)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def read(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_a_little(net: ReportGenerator, steps: int = 2) -> None:
    images, view_mask = batch()
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        net(images, view_mask, REPORTS[:2]).backward()
        optimizer.step()
    net.eval()


def assert_same_network(a: ReportGenerator, b: ReportGenerator) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    images, view_mask = batch(3)
    assert a.generate(images, view_mask) == b.generate(images, view_mask)
    assert a.visual_provenance == b.visual_provenance and a.report_provenance == b.report_provenance


# --------------------------------------------------------------------------------------------------
# Whole models


def test_a_tiny_checkpoint_alone_rebuilds_the_same_network(tmp_path: Path) -> None:
    files = stage2_files(tmp_path / "run")
    net = build(files)
    train_a_little(net)
    ckpt = save(net, tmp_path / "run" / "stage2.ckpt")
    record = read(ckpt)[RECORD_KEY]
    state = read(ckpt)["state_dict"]
    assert any(k.startswith("net.classifier.encoder.") for k in state)  # stage 1 travels along
    assert state["net.visual_retriever.memory"].shape == (15, WIDTH)  # the sampled memories too
    assert any(k.startswith("net.llm.") for k in state)  # a tiny LLM has no folder to come back from
    assert len(record["visual_memory"]["provenance"]) == 15 and record["llm"]["kind"] == "tiny"
    assert "tokenizer.json" in record["tokenizer_files"]
    assert record["memory"]["manifest"]["stage1_checkpoint_sha256"] == record["stage1_checkpoint_sha256"]

    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    shutil.rmtree(tmp_path / "run")  # stage-1 checkpoint, memory folder: all gone
    assert_same_network(net, load_stage2(moved))


def test_a_findings_embedding_is_recorded_and_survives_a_round_trip(tmp_path: Path) -> None:
    files = stage2_files(tmp_path / "run")
    net = build(files, findings_embedding=True)
    train_a_little(net)
    assert net.findings_embed is not None and net.findings_embed.abs().sum() > 0  # it trained
    ckpt = save(net, tmp_path / "stage2.ckpt")
    assert read(ckpt)[RECORD_KEY]["settings"]["findings_embedding"] is True
    loaded = load_stage2(ckpt)
    assert_same_network(net, loaded)
    assert load_stage2(save(build(files), tmp_path / "plain.ckpt")).findings_embed is None


def _checkpointed(net: ReportGenerator) -> bool:
    flags = [m.gradient_checkpointing for m in net.llm.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags  # the tiny Llama's model and decoder layers carry the switch
    return all(flags)


@pytest.mark.parametrize("llm_training", ["full", "lora"])
def test_gradient_checkpointing_is_recorded_and_survives_a_round_trip(
    tmp_path: Path, llm_training: str
) -> None:
    files = stage2_files(tmp_path / "run")
    plain = build(files, llm_training=llm_training)
    net = build(files, llm_training=llm_training, gradient_checkpointing=True)
    assert not _checkpointed(plain) and _checkpointed(net)
    net.load_state_dict(plain.state_dict())  # the prefix projections draw from the global RNG
    # the switch changes memory, not the numbers: same loss and gradients on the whole network
    images, view_mask = batch()
    grads = []
    for model in (plain, net):
        model.train()
        model.zero_grad()
        torch.manual_seed(0)  # the same Hopfield dropout masks (the recompute replays the RNG state)
        loss = model(images, view_mask, REPORTS[:2])
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    ckpt = save(net, tmp_path / "stage2.ckpt")
    assert read(ckpt)[RECORD_KEY]["llm"]["gradient_checkpointing"] is True
    loaded = load_stage2(ckpt)
    assert _checkpointed(loaded)
    assert loaded.build_record["llm"]["gradient_checkpointing"] is True
    assert not _checkpointed(load_stage2(save(plain, tmp_path / "plain.ckpt")))


@pytest.mark.parametrize("llm_training", ["lora", "frozen"])
def test_a_base_llm_is_referenced_by_identity_and_may_move(tmp_path: Path, llm_training: str) -> None:
    files = stage2_files(tmp_path)
    tiny_llm(tiny_tokenizer(tmp_path / "llm", "qwen"), "qwen2").save_pretrained(tmp_path / "llm")
    net = build(
        files,
        tiny_llm=None,
        llm_path=tmp_path / "llm",
        llm_training=llm_training,
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
    )
    assert net.prompt.template == "chat"  # Qwen-style tokenizer: its ChatML template
    train_a_little(net)
    ckpt = save(net, tmp_path / "stage2.ckpt")
    checkpoint = read(ckpt)
    llm_keys = [k for k in checkpoint["state_dict"] if k.startswith("net.llm.")]
    assert all(".lora_" in k for k in llm_keys) and bool(llm_keys) == (llm_training == "lora")
    identity = checkpoint[RECORD_KEY]["llm"]["identity"]
    assert set(identity["weights"]) == {"model.safetensors"} and len(identity["config_sha256"]) == 64

    shutil.move(tmp_path / "llm", tmp_path / "moved_llm")
    with pytest.raises(FileNotFoundError, match=r"not on this machine; give its folder with --llm_path"):
        load_stage2(ckpt)
    assert_same_network(net, load_stage2(ckpt, llm_path=tmp_path / "moved_llm"))

    tiny_llm(tiny_tokenizer(tmp_path / "other", "qwen"), "qwen2", seed=1).save_pretrained(tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"is not the one this checkpoint was trained with: trained with \[config"
    ) as err:
        load_stage2(ckpt, llm_path=tmp_path / "other")
    assert "model.safetensors" in str(err.value) and "found [" in str(err.value)


def test_retriever_configs_from_yaml_are_recorded(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    net = build(
        files, report_retriever=functools.partial(CrossAttentionRetriever, num_heads=2, hidden_size=8)
    )
    ckpt = save(net, tmp_path / "stage2.ckpt")
    record = read(ckpt)[RECORD_KEY]
    assert record["report_retriever"] == {
        "class_path": "amrg.models.retrievers.CrossAttentionRetriever",
        "init_args": {"num_heads": 2, "hidden_size": 8},
    }
    assert type(load_stage2(ckpt).report_retriever) is CrossAttentionRetriever


# --------------------------------------------------------------------------------------------------
# Checkpoints never run code


def _sentinel_module(folder: Path) -> Path:
    """A module whose import writes a file: proof that code ran."""
    sentinel = folder / "SENTINEL"
    (folder / "sentinel_mod.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
        "import torch\nclass Evil(torch.nn.Module):\n    def __init__(self, *a, **k):\n        super().__init__()\n"
    )
    return sentinel


@pytest.mark.parametrize(
    "where",
    ["visual_retriever", "classifier.init_args.encoder", "classifier"],
    ids=lambda w: w.split(".")[-1],
)
def test_a_class_path_outside_the_allow_list_is_refused_before_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    sentinel = _sentinel_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = save(build(stage2_files(tmp_path)), tmp_path / "stage2.ckpt")
    checkpoint = read(ckpt)
    entry = checkpoint[RECORD_KEY]
    for key in where.split("."):
        entry = entry[key]
    entry["class_path"] = "sentinel_mod.Evil"
    torch.save(checkpoint, ckpt)
    with pytest.raises(UntrustedCheckpointError, match=r"sentinel_mod.Evil.*AMRG_TRUSTED_CLASSES"):
        load_stage2(ckpt)
    with pytest.raises(UntrustedCheckpointError):
        ReporterModule.load_from_checkpoint(ckpt)
    assert not sentinel.exists() and "sentinel_mod" not in sys.modules


def test_remote_code_and_paths_in_a_checkpoint_are_never_obeyed(tmp_path: Path) -> None:
    """A crafted checkpoint asks for trust_remote_code and points at a folder with model code: no code runs."""
    files = stage2_files(tmp_path)
    folder = tmp_path / "llm"
    tiny_llm(tiny_tokenizer(folder, "llama")).save_pretrained(folder)
    net = build(files, tiny_llm=None, llm_path=folder, llm_training="frozen")
    ckpt = save(net, tmp_path / "stage2.ckpt")
    sentinel = tmp_path / "SENTINEL"
    (folder / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).write_text('ran')\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    checkpoint = read(ckpt)
    checkpoint["hyper_parameters"] = {
        "net": {"init_args": {"trust_remote_code": True, "llm_path": str(folder)}}
    }
    checkpoint[RECORD_KEY]["llm"]["trust_remote_code"] = True
    from amrg.checkpoints.llm import llm_identity

    checkpoint[RECORD_KEY]["llm"]["identity"] = llm_identity(
        folder
    )  # the crafted folder passes the hash check
    torch.save(checkpoint, ckpt)
    for load in (load_stage2, ReporterModule.load_from_checkpoint):
        try:
            load(ckpt)
        except Exception as err:  # transformers may refuse the auto_map without trust_remote_code: also fine
            assert "trust_remote_code" in str(err) or "remote code" in str(err), err
        assert not sentinel.exists()


# --------------------------------------------------------------------------------------------------
# Memories: whole, unmixed, mined with this stage-1 model


def test_memory_of_a_killed_build_is_refused(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    (files["memory"] / "manifest.json").unlink()  # what a build killed before its last step leaves
    with pytest.raises(MemoryFolderError, match=r"has no manifest.json: a build was killed"):
        build(files)


def test_mixed_banks_are_refused(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    other = write_memory(tmp_path / "other", files["stage1"], seed=1)
    for suffix in (".safetensors", ".json"):
        shutil.copy(other / f"report_memory{suffix}", files["memory"] / f"report_memory{suffix}")
    with pytest.raises(
        MemoryFolderError, match=r"report_memory.safetensors is not the file this build wrote.*mixed"
    ):
        build(files)


def test_memory_mined_with_another_stage1_model_is_refused(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    files["stage1"] = write_stage1_checkpoint(tmp_path / "retrained.ckpt", seed=7)
    with pytest.raises(
        MemoryFolderError, match=r"mined with another stage-1 model.*retrained.ckpt|mined with another"
    ):
        build(files)


def test_a_memory_holding_an_evaluation_id_is_refused(tmp_path: Path) -> None:
    stage1 = write_stage1_checkpoint(tmp_path / "stage1.ckpt")
    memory = write_memory(tmp_path / "memory", stage1, ids=("val_001",))
    with pytest.raises(ValueError, match=r"1 source id\(s\) belong to the evaluation .*'val_001'"):
        build({"stage1": stage1, "memory": memory}, forbidden_ids=["val_000", "val_001"])


# --------------------------------------------------------------------------------------------------
# Bad input: one clear message


def test_missing_files_are_all_named_in_one_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        build(
            {"stage1": tmp_path / "stage1.ckpt", "memory": tmp_path / "mem"},
            tiny_llm=None,
            llm_path=tmp_path / "Llama-2-7b-chat-hf",
            tokenizer_path=tmp_path / "tok",
        )
    message = str(err.value)
    for name in ("stage1.ckpt", "mem'", "Llama-2-7b-chat-hf", "tok'"):
        assert name in message
    assert "`amrg memory build`" in message and "never downloaded" in message
    assert message.count("\n  - ") == 4


def test_a_stage1_checkpoint_with_another_label_set_is_refused(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    files["stage1"] = write_stage1_checkpoint(tmp_path / "thirteen.ckpt", num_queries=13)
    with pytest.raises(
        ValueError, match=r"thirteen.ckpt' predicts 13 labels, but amrg needs the 14 CheXpert"
    ):
        build(files)


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    files["stage1"].write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"stage1.ckpt' could not be read as a checkpoint"):
        build(files)


def test_inconsistent_options_are_refused(tmp_path: Path) -> None:
    files = stage2_files(tmp_path)
    with pytest.raises(ValueError, match="exactly one of llm_path"):
        build(files, llm_path=tmp_path)
    with pytest.raises(ValueError, match="min_new_tokens <= max_new_tokens"):
        DecodingConfig(min_new_tokens=9, max_new_tokens=8)
    with pytest.raises(ValueError, match="retriever class or a functools.partial"):
        build(files, visual_retriever=lambda dim, memory: HopfieldRetriever(dim, memory))


def test_checkpoint_size_benchmark_counts_everything_but_the_base_llm(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "checkpoint_size.py"
    spec = importlib.util.spec_from_file_location("checkpoint_size", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sizes = module.main(["--tiny"])
    assert {"classifier.encoder", "classifier.qformer", "visual_retriever", "report_retriever", "llm"} <= set(
        sizes["kept"]
    )
    assert set(sizes["base"]) == {"llm"} and sizes["base"]["llm"] > sizes["kept"]["llm"] > 0  # LoRA only
    assert "training checkpoint" in capsys.readouterr().out
