"""Loading and verifying artifacts: stage-1 and stage-2 checkpoints, memory folders, LLM identities.

Everything here reads files and builds plain ``nn.Module``\\ s; only ``atomic_io`` (the Trainer's checkpoint
writer, imported by nothing else here) imports Lightning, so memory building, prediction and notebooks
load models without a Trainer. It sits below ``amrg.memory`` and
``amrg.modules``, which both import from it.
"""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "ALLOWED_CLASS_PREFIXES": "amrg.checkpoints.safety",
    "UntrustedCheckpointError": "amrg.checkpoints.safety",
    "AtomicCheckpointIO": "amrg.checkpoints.atomic_io",
    "MemoryFolder": "amrg.checkpoints.memory",
    "load_memory_folder": "amrg.checkpoints.memory",
    "write_memory_folder": "amrg.checkpoints.memory",
    "llm_identity": "amrg.checkpoints.llm",
    "load_stage1": "amrg.checkpoints.stage1",
    "read_checkpoint": "amrg.checkpoints.stage1",
    "DecodingConfig": "amrg.checkpoints.stage2",
    "TinyLLMConfig": "amrg.checkpoints.stage2",
    "build_report_generator": "amrg.checkpoints.stage2",
    "load_stage2": "amrg.checkpoints.stage2",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
