"""Training strategies for the stage modules: FSDP that shards the stage-2 LLM and replicates the frozen
stage-1 network.

Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` puts every parameter that its
``auto_wrap_policy`` leaves out (embeddings, lm_head, the stage-1 network, retrievers, prefix projection)
into FSDP's root unit and shards it. The frozen stage-1 network gains nothing from that: it never trains, so
it has no gradients or optimiser states to shard, and sharding it only adds an all-gather of its weights to
every step. :class:`Stage2FSDPStrategy` hands the frozen stage-1 parts to FSDP as ``ignored_modules``
instead, so each rank keeps a full copy of them.
"""

from __future__ import annotations

from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from amrg.errors import ConfigError
from amrg.models.reporter import ReportGenerator

__all__ = ["Stage2FSDPStrategy", "replicated_parts"]


def replicated_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The frozen stage-1 parts of every :class:`ReportGenerator` in ``model``, by qualified name.

    These are the parts that :class:`ReportGenerator` freezes: the stage-1 head always, the vision encoder
    with ``freeze_encoder`` and the Q-Former with ``freeze_qformer``. A part that trains is never returned.

    Args:
        model: a LightningModule (or any module) holding one or more ReportGenerators.

    Returns:
        The parts, keyed by their names in ``model`` (``"net.classifier.head"``...), in module order.

    Raises:
        ConfigError: ``model`` holds no ReportGenerator (a stage-1 module: train it with DDP), or a part
            that the ReportGenerator freezes has a trainable parameter (set after the network was built).
    """
    frozen = {
        id(part) for net in model.modules() if isinstance(net, ReportGenerator) for part in net.frozen_parts()
    }
    if not frozen:
        raise ConfigError(
            f"Stage2FSDPStrategy: {type(model).__name__} holds no stage-2 ReportGenerator, so there is no "
            "frozen stage-1 network to replicate and no LLM to shard; train stage 1 with DDP "
            "(configs/trainer/ddp_gpu.yaml)"
        )
    parts = {name: part for name, part in model.named_modules() if id(part) in frozen}
    trainable = [
        f"{name}.{param_name}"
        for name, part in parts.items()
        for param_name, param in part.named_parameters()
        if param.requires_grad
    ]
    if trainable:
        # FSDP does not reduce the gradients of ignored parameters: a trainable one would drift apart on
        # every rank without an error.
        shown = ", ".join(trainable[:5]) + (f" and {len(trainable) - 5} more" if len(trainable) > 5 else "")
        raise ConfigError(
            f"Stage2FSDPStrategy: the frozen stage-1 parts have {len(trainable)} trainable parameter(s) "
            f"({shown}); FSDP would not synchronise their gradients across ranks. Unfreeze them with the "
            "ReportGenerator's freeze_encoder/freeze_qformer instead of requires_grad_"
        )
    return parts


class Stage2FSDPStrategy(FSDPStrategy):
    """FSDP for stage 2 that shards the LLM and keeps the frozen stage-1 network replicated on every rank.

    Takes the arguments of :class:`~lightning.pytorch.strategies.FSDPStrategy`. When Lightning wraps the
    LightningModule, the frozen stage-1 parts (see :func:`replicated_parts`) are passed to FSDP as
    ``ignored_modules``: FSDP neither shards, gathers nor moves them, so this strategy moves them to the
    rank's device itself, and each rank holds the full weights. Everything else is wrapped as
    ``FSDPStrategy`` does (``auto_wrap_policy`` units, the rest in the root unit).

    Only frozen parts may be ignored: FSDP does not all-reduce the gradients of ignored parameters, so a
    trainable part there would train differently on every rank. A stage-1 part that stage 2 trains
    (``freeze_encoder=False`` or ``freeze_qformer=False``) is therefore sharded with the root unit, and a
    frozen part with a trainable parameter is refused (:class:`~amrg.errors.ConfigError`). A LightningModule
    without a :class:`ReportGenerator` (stage 1) is refused as well: it has no LLM to shard, and DDP
    trains it.

    Full-state-dict checkpoints (``state_dict_type="full"``) still hold the replicated weights under
    their usual names, so :func:`amrg.checkpoints.stage2.load_stage2` reads them without FSDP.

    Unlike ``FSDPStrategy``, it also runs on the CPU with the gloo backend (``accelerator: cpu``), which
    the tests use; Lightning refuses only its own class without a GPU.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)  # wrapped by the module itself (configure_model)
        parts = replicated_parts(model)
        for part in parts.values():
            part.to(self.root_device)  # FSDP moves only the parameters it manages
        replicated = sum(p.numel() for part in parts.values() for p in part.parameters())
        total = sum(p.numel() for p in model.parameters())
        rank_zero_info(
            f"Stage2FSDPStrategy: {replicated} of {total} parameters replicated on every rank "
            f"({', '.join(parts)}); the rest sharded"
        )
        kwargs = dict(self.kwargs)
        kwargs["ignored_modules"] = [*kwargs.get("ignored_modules", ()), *parts.values()]
        # As FSDPStrategy._setup_model (Lightning 2.6), but with the device itself as device_id: Lightning
        # passes root_device.index, None on the CPU, and FSDP then refuses a machine without a GPU; with
        # torch.device("cpu") it runs on gloo, which the tests use.
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            **kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped
