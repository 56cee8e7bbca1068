"""The one reader interface every checkpoint format implements.

A reader is opened on one model component (``policy/`` or ``critic/`` of a step, or an HF
export directory) through a :class:`~ckptctl.storage.Store` rooted at that component. It
lists every tensor's metadata WITHOUT reading tensor data, and reads one whole tensor on
demand, assembled from its pieces (rank shards, DCP chunks, safetensors shards).

Modelled on torch.distributed.checkpoint's split: the storage layer moves bytes, the
reader decides which bytes, and :class:`TensorInfo` (with its :class:`Piece` list) is the
contract between them. Readers import torch lazily (inside methods), so importing this
module stays cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from ckptctl.errors import CkptctlError, CorruptFileError, NotFoundError
from ckptctl.formats.safe_load import CorruptCheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.storage import Store

# Tensor groups: what a tensor belongs to in the saved state.
MODEL = "model"
OPTIMIZER = "optimizer"
OTHER = "other"


@dataclass(frozen=True)
class Piece:
    """One stored piece of a tensor: where its bytes live and which slice of the global tensor it is."""

    file: str  # path relative to the component directory
    offsets: tuple[int, ...]  # start of the piece in the global tensor, per dim
    sizes: tuple[int, ...]  # extent of the piece, per dim
    byte_offset: int | None = None  # start of its bytes in ``file``, when known without loading
    byte_length: int | None = None
    rank: int | None = None  # the global rank that wrote it, when known

    def to_dict(self) -> dict:
        return {"file": self.file, "offsets": list(self.offsets), "sizes": list(self.sizes),
                "byte_offset": self.byte_offset, "byte_length": self.byte_length, "rank": self.rank}


class TensorSize:
    """``numel`` and ``nbytes`` of anything with a ``shape`` and a ``dtype`` (torch dtype name):
    :class:`TensorInfo` here, :class:`~ckptctl.formats.hf_writer.TensorSpec` in the writer."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


@dataclass
class TensorInfo(TensorSize):
    """Metadata of one global (unsharded) tensor."""

    name: str  # e.g. "model.layers.0.mlp.up_proj.weight" or "optimizer.state.exp_avg.<param>"
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32", "bfloat16"
    group: str = MODEL  # MODEL | OPTIMIZER | OTHER
    # How it is stored: "dtensor" (FSDP DTensor with placements and mesh), "replicated" (the
    # same plain tensor on every rank: take rank 0's), "plain" (one copy), "sharded_tensor"
    # (legacy ShardedTensor), "dcp" (torch DCP / Megatron chunks), "safetensors".
    layout: str = "plain"
    placements: tuple[str, ...] = ()  # e.g. ("Shard(dim=0)",) or ("Replicate()", "Shard(dim=0)")
    mesh_shape: tuple[int, ...] = ()
    mesh_dim_names: tuple[str, ...] = ()
    pieces: list[Piece] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype, "group": self.group,
            "layout": self.layout, "placements": list(self.placements), "mesh_shape": list(self.mesh_shape),
            "mesh_dim_names": list(self.mesh_dim_names), "numel": self.numel, "nbytes": self.nbytes,
            "pieces": len(self.pieces),
        }


@dataclass
class RawTensor:
    """A tensor as bytes (C order, little-endian), for writers that only copy them: what a
    torch-free reader (:mod:`ckptctl.formats.fsdp_bytes`) hands an export. ``parts``: bytes-like
    objects that, one after the other, are the tensor's bytes (its ranks' pieces, never joined:
    the writer copies each where it goes)."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name
    parts: list


_DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1, "complex64": 8, "complex128": 16,
    "uint16": 2, "uint32": 4, "uint64": 8, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "complex32": 4,
}


def dtype_size(dtype: str) -> int:
    """Bytes per element of a torch dtype name; 0 when unknown."""
    return _DTYPE_SIZES.get(dtype, 0)


def torch_dtype(info: TensorInfo, where: str) -> "torch.dtype":
    """The torch dtype of ``info``; a one-line error naming ``where`` when this torch lacks it."""
    import torch

    dtype = getattr(torch, info.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CkptctlError(f"{where}: {info.name} has dtype {info.dtype!r}, which this torch lacks")
    return dtype


def read_json(store: "Store", rel: str) -> Any:
    """The parsed JSON file ``rel`` of ``store`` (:meth:`Store.read_json`); None when it does not exist."""
    try:
        return store.read_json(rel)
    except NotFoundError:
        return None
    except CorruptFileError as exc:  # readers report damage as CorruptCheckpointError
        raise CorruptCheckpointError(str(exc)) from exc


class CheckpointReader:
    """Base class of the per-format readers.

    Subclasses set ``backend`` and implement :meth:`tensors` and :meth:`read_tensor`;
    :meth:`summary` returns format-specific non-tensor facts (optimizer kind and step, param
    groups, LR scheduler state, world size / parallel layout, RNG presence, ...) as plain
    JSON-serialisable data, read without tensor data where the format allows.
    """

    backend = "unknown"

    def __init__(self, store: "Store"):
        self.store = store  # rooted at the component directory

    def tensors(self) -> Iterator[TensorInfo]:
        raise NotImplementedError

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors()}

    def read_tensor(self, name: str) -> "torch.Tensor":
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        """Release cached downloads and open files."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
