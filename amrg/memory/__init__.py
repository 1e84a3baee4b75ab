"""Associative memories: Grad-CAM ROI mining, report memory and MemoryBank I/O."""

from amrg._lazy import lazy_getattr

_EXPORTS = {
    "MemoryBank": "amrg.memory.bank",
}

__all__ = [
    "MemoryBank",
]

__getattr__ = lazy_getattr(__name__, _EXPORTS)
