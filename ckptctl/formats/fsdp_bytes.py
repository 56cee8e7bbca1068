"""The model tensors of an FSDP2 component as bytes, without torch: what ``export-hf`` reads
when nothing needs converting.

Most FSDP checkpoints SkyRL writes are FSDP2 state dicts whose every parameter is a DTensor
``Shard(0)`` over a one-dimensional mesh of all ranks (buffers: the same plain tensor on every
rank). Each global tensor is then its ranks' local tensors one after the other, so an export
that keeps the dtype is a byte copy, and ``import torch`` (2-3 s, most of an export's start on
an object store) is not needed at all. :func:`byte_copy_reader` gives a reader of those tensors
when the component is of that kind (it looks at rank 0's pickle, unpickled without torch:
:meth:`~ckptctl.formats.torchzip.TorchZipFile.metadata_without_torch`) and None otherwise
(other placements or meshes, FSDP1, single files, legacy or big-endian files, anything its
unpickler does not know): the caller then uses :class:`~ckptctl.formats.fsdp.FsdpReader` as
before. Its :class:`~ckptctl.formats.base.TensorInfo` are :class:`FsdpReader`'s (same names,
shapes, pieces), its reads the same ranged reads, CRC-checked the same way.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from ckptctl.errors import NotFoundError
from ckptctl.formats import safe_load
from ckptctl.formats.base import MODEL, CheckpointReader, Piece, RawTensor, TensorInfo
from ckptctl.formats.fsdp import MODEL_FILE, FsdpReader, Mesh
from ckptctl.formats.safe_load import CorruptCheckpointError, NeedsTorch, StoredDTensor, StoredTensor
from ckptctl.formats.torchzip import TorchZipFile

_SHARD0, _REPLICATE = "Shard(dim=0)", "Replicate()"


def byte_copy_reader(reader: FsdpReader) -> "ByteCopyReader | None":
    """A torch-free reader of ``reader``'s model tensors, or None when the component is not a
    plain FSDP2 one (see the module docstring)."""
    try:
        return ByteCopyReader(reader)
    except NeedsTorch:
        return None


def _one_dim_mesh_ranks(dt: StoredDTensor) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(ranks, dim names) of a DTensor's one-dimensional mesh as torch >= 2.9 pickles it (a
    layout over a flat rank map); NeedsTorch for anything else."""
    mesh = dt.device_mesh
    if not isinstance(mesh, safe_load.PickledObject):
        raise NeedsTorch("a DTensor without a mesh")
    fields = mesh.fields
    rank_map, layout = fields.get("_flatten_rank_map"), fields.get("_layout")
    axes = layout.fields.get("axes") if isinstance(layout, safe_load.PickledObject) else None
    if not isinstance(rank_map, tuple) or not isinstance(axes, tuple) or len(axes) != 1 \
            or not isinstance(axes[0], safe_load.PickledObject):
        raise NeedsTorch("a mesh other than a one-dimensional layout")
    shape, stride = axes[0].fields.get("shape"), axes[0].fields.get("stride")
    if shape == () and stride == ():  # a mesh of one rank
        shape, stride = (1,), (0,)
    if not (isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride) == 1):
        raise NeedsTorch("a mesh layout of more than one dimension")
    try:
        ranks = tuple(int(rank_map[i * stride[0]]) for i in range(shape[0]))
    except (IndexError, TypeError, ValueError):
        raise NeedsTorch("an unreadable mesh layout") from None
    names = fields.get("_mesh_dim_names")
    return ranks, tuple(names) if isinstance(names, tuple) else ()


class ByteCopyReader(CheckpointReader):
    """The model tensors of an FSDP2 component as :class:`RawTensor` (see the module
    docstring); raises NeedsTorch when the component is not of that kind. It reads through
    ``fsdp``'s files (one listing, one TorchZipFile per rank file)."""

    backend = "fsdp"

    def __init__(self, fsdp: FsdpReader):
        super().__init__(fsdp.store)
        self.fsdp = fsdp
        world = fsdp.world_size  # (discovers the files first)
        if fsdp.single_file or world < 1:
            raise NeedsTorch("the documented single files")
        zf = self._model_file(0)
        sd = zf.metadata_without_torch()
        if not isinstance(sd, dict):
            raise NeedsTorch("not a state dict")
        self._infos: dict[str, TensorInfo] = {}
        sharded = any(isinstance(v, StoredDTensor) for v in sd.values())
        for name, value in sd.items():
            if not isinstance(name, str):
                continue
            if isinstance(value, StoredDTensor):
                info = self._dtensor_info(name, value, world)
                local = value._local_tensor
            elif isinstance(value, StoredTensor):
                layout = "replicated" if sharded or world > 1 else "plain"
                info = TensorInfo(name=name, shape=value.shape, dtype=value.dtype, group=MODEL, layout=layout)
                info.pieces.append(Piece(fsdp.file_name(MODEL_FILE, 0), (0,) * len(value.shape), value.shape, rank=0))
                local = value
            else:
                continue  # not a tensor (FsdpReader skips it too)
            if not isinstance(local, StoredTensor) or not local.is_contiguous():
                raise NeedsTorch(f"{name}: a non-contiguous local tensor")
            if local.numel() and info.pieces and info.pieces[0].rank == 0:  # as FsdpReader.tensors() gives it
                loc = zf.stored_location(local)
                info.pieces[0] = dataclasses.replace(info.pieces[0], byte_offset=loc.file_offset,
                                                     byte_length=loc.nbytes)
            self._infos[name] = info

    def _model_file(self, rank: int) -> TorchZipFile:
        return self.fsdp.need_file(MODEL_FILE, rank)

    def _dtensor_info(self, name: str, dt: StoredDTensor, world: int) -> TensorInfo:
        ranks, dim_names = _one_dim_mesh_ranks(dt)
        if ranks != tuple(range(world)):
            raise NeedsTorch(f"{name}: a mesh other than the ranks 0..{world - 1}")
        placements = tuple(repr(p) for p in dt.placements)
        if placements not in ((_SHARD0,), (_REPLICATE,)):
            raise NeedsTorch(f"{name}: placements {placements}")
        local = dt._local_tensor
        if not isinstance(local, StoredTensor) or local.dtype != dt.dtype:
            raise NeedsTorch(f"{name}: an unexpected local tensor")
        mesh = Mesh((world,), dim_names, ranks)
        info = TensorInfo(name=name, shape=dt.shape, dtype=dt.dtype, group=MODEL, layout="dtensor",
                          placements=placements, mesh_shape=mesh.shape, mesh_dim_names=mesh.dim_names)
        info.pieces.extend(self.fsdp.dtensor_pieces(name, dt.shape, dt.placements, mesh, MODEL_FILE))
        return info

    # -- reading -------------------------------------------------------------------------
    def tensors(self) -> Iterator[TensorInfo]:
        """The model tensors (an export's; the optimizer's are not read)."""
        yield from self._infos.values()

    def _local(self, info: TensorInfo, rank: int) -> tuple[TorchZipFile, StoredTensor]:
        """Rank ``rank``'s piece of ``info``, checked against what rank 0's metadata planned."""
        zf = self._model_file(rank)
        try:
            tree = zf.metadata_without_torch()
        except NeedsTorch as exc:
            raise CorruptCheckpointError(f"{zf.name}: not like rank 0's file ({exc})") from None
        value = tree.get(info.name) if isinstance(tree, dict) else None
        if isinstance(value, StoredDTensor):
            saved = value.device_mesh.fields.get("_coordinate_on_dim") \
                if isinstance(value.device_mesh, safe_load.PickledObject) else None
            if saved is not None and tuple(saved) != (rank,):
                raise CorruptCheckpointError(f"{zf.name}: mesh coordinates {tuple(saved)} differ from rank 0's mesh "
                                             f"layout ({(rank,)})")
            value = value._local_tensor
        if not isinstance(value, StoredTensor):
            raise CorruptCheckpointError(f"{zf.name}: no {info.name}")
        return zf, value

    def read_tensor(self, name: str) -> RawTensor:
        info = self._infos.get(name)
        if info is None:
            raise NotFoundError(f"{self.store.url}: no tensor {name!r}")
        parts = []
        row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        size = 0
        for piece in sorted(info.pieces, key=lambda p: p.offsets):  # Shard(0): whole rows, in order
            zf, local = self._local(info, piece.rank)
            if local.shape != piece.sizes or local.dtype != info.dtype or not local.is_contiguous():
                raise CorruptCheckpointError(
                    f"{zf.name}: {name}: rank {piece.rank} holds {local.shape} {local.dtype}, "
                    f"expected {piece.sizes} {info.dtype}")
            if (piece.offsets[0] * row if piece.offsets else 0) != size:
                raise CorruptCheckpointError(f"{self.store.url}: {name}: the pieces do not follow each other")
            parts.append(_owned(zf.read_stored(local, name=name)))
            size += len(parts[-1])
        return RawTensor(info.shape, info.dtype, parts)

    def planned_reads(self, names: Iterable[str]) -> list[tuple[str, int, int]]:
        """``(file, start, end)`` of the ranged reads :meth:`read_tensor` makes for ``names``, in
        order (as :meth:`FsdpReader.planned_reads`). Every rank file's metadata is read first, up to
        eight at a time (two small ranged reads each: W of them one after the other took W round
        trips before the first byte of tensor data)."""
        self._load_rank_metadata()
        plan = []
        for name in names:
            info = self._infos.get(name)
            if info is None:
                continue
            for piece in info.pieces:
                try:
                    zf, local = self._local(info, piece.rank)
                    span = zf.planned_read_stored(local)
                except (CorruptCheckpointError, ValueError):
                    span = None  # read_tensor reports it
                if span is not None:
                    plan.append((zf.rel, *span))
        return plan

    def _load_rank_metadata(self) -> None:
        def load(rank: int) -> None:
            try:
                self._model_file(rank).metadata_without_torch()
            except (NeedsTorch, CorruptCheckpointError):
                pass  # read_tensor reports it, naming the file

        ranks = range(1, self.fsdp.world_size)
        if len(ranks) > 1 and not self.store.is_local:
            with ThreadPoolExecutor(max_workers=min(8, len(ranks)), thread_name_prefix="ckptctl-metadata") as pool:
                list(pool.map(load, ranks))

    def close(self) -> None:
        self.fsdp.close()


def _owned(data: bytes | memoryview) -> bytes | memoryview:
    """``data``, or a copy when it is a view into a much larger buffer (a read-ahead's, holding
    other tensors' bytes): a tensor's parts must not keep more than its own bytes alive."""
    base = data.obj if isinstance(data, memoryview) else None
    if base is not None and len(base) > 2 * len(data) + 4096:
        return bytes(data)
    return data
