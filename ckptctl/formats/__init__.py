"""Format readers behind one interface (:mod:`ckptctl.formats.base`).

``open_reader`` picks the reader from the backend the tree layer classified; readers import
torch lazily, so importing this package is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptctl.errors import UsageError
from ckptctl.formats.base import CheckpointReader, Piece, TensorInfo

if TYPE_CHECKING:  # pragma: no cover
    from ckptctl.storage import Store

__all__ = ["CheckpointReader", "Piece", "TensorInfo", "open_reader"]


def open_reader(store: "Store", backend: str, **kwargs) -> CheckpointReader:
    """A reader for the component at ``store`` (rooted at the component directory)."""
    if backend in ("fsdp", "fsdp-single-file"):
        from ckptctl.formats.fsdp import FsdpReader

        return FsdpReader(store, single_file=backend == "fsdp-single-file", **kwargs)
    if backend == "megatron":
        from ckptctl.formats.megatron import MegatronReader

        return MegatronReader(store, **kwargs)
    if backend == "hf":
        from ckptctl.formats.hf import HfReader

        return HfReader(store, **kwargs)
    raise UsageError(f"no reader for backend {backend!r}")
