"""megatron-core ``fully_sharded_model_space`` distributed-optimizer state read back as named tensors.

``fully_sharded_model_space`` (megatron-core's default until ``dp_reshardable``; SkyRL's older
checkpoints) saves, per parameter, the part of the fp32 main param and of each Adam moment that
one DP rank's DistributedOptimizer holds: a ``flattened_range`` of the parameter's TP-local
chunk flattened row-major (``distrib_optimizer.sharded_param_state_fs_model_space``), under
``[chained_i.]optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>``.

torch DCP cannot store such ragged pieces of an N-D tensor, so megatron-core's ``torch_dist``
strategy stores them "N-D flattened" (``strategies/torch.py`` ``_mcore_to_torch_sharded_tensor``,
``strategies/resharding.py`` ``nd_flattened_tensor_reformulated_global_shape``; megatron-core
0.13.1, the format's last default): a tensor of global shape ``G = [X, Y, Z]`` whose TP-local
chunks have shape ``L = [x, y, z]`` (leading layer axes count as chunks of size 1) is saved as a
DCP tensor of shape ``[X/x, Y/y, Z/z, x*y*z]`` -- one row per local chunk, indexed by the chunk's
grid position, holding the chunk flattened row-major -- and each DP rank's piece is the DCP
chunk at offsets ``(i, j, k, flattened_range.start)``, sizes ``(1, 1, 1, len)``. The original
shape ``G`` is recorded in ``.metadata`` (``Metadata.mcore_data[name]
['nd_reformulated_orig_global_shape']``, pickled with each rank's ``MCoreSavePlan``).

:class:`FlattenedState` presents that state as megatron's per-parameter ``fully_reshardable``
tensors (``[chained_i.]optimizer.state.{param,exp_avg,exp_avg_sq}.<model key>``, ``fp32_param``
renamed ``param``, the model key's global shape), read region by region: memory is bounded by
one source piece. Anything that does not fit these rules exactly (no recorded original shape,
a shape other than the model weight's, ragged grid, pieces that overlap or leave gaps) raises
:class:`~ckptctl.errors.OptimizerLayoutError`, whose message names ``--drop-optimizer``.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Iterable

from ckptctl.errors import OptimizerLayoutError
from ckptctl.formats.base import MODEL, OPTIMIZER, TensorInfo, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.formats.megatron import MegatronReader

FORMAT = "fully_sharded_model_space"
#: the state names of the saved tensors -> those of megatron's per-parameter fully_reshardable state
STATE_NAMES = {"fp32_param": "param"}
_NAME_RE = re.compile(r"^(?P<chain>(?:chained_\d+\.)?)optimizer\.state\.(?P<state>[^.]+)\.(?P<key>.+)$")
_ORIG_SHAPE = "nd_reformulated_orig_global_shape"


def flattened_error(where: str, reason: str) -> OptimizerLayoutError:
    error = OptimizerLayoutError(f"{where}: cannot read the {FORMAT} optimizer state as parameters: {reason}; "
                                 "pass --drop-optimizer to write the model weights only")
    error.reason = reason
    return error


class FlattenedState:
    """The ``fully_sharded_model_space`` tensors of ``reader`` (a MegatronReader) as per-parameter
    tensors: :meth:`tensor_infos` (virtual: no pieces) and :meth:`read_region`. Built from the
    metadata alone; :class:`~ckptctl.errors.OptimizerLayoutError` when it does not fit."""

    #: elements whose coordinates are computed at once (int64 per axis each)
    SLAB = 1 << 20

    def __init__(self, reader: "MegatronReader"):
        self.reader = reader
        where = reader.store.url
        infos = reader.tensor_infos()
        recorded = getattr(reader._load_metadata(), "mcore_data", None) or {}
        self._sources: dict[str, tuple[TensorInfo, tuple[int, ...]]] = {}  # virtual -> (raw info, chunk shape)
        self._infos: dict[str, TensorInfo] = {}
        for name, info in infos.items():
            m = _NAME_RE.match(name)
            if info.group != OPTIMIZER or not m:
                continue
            model = infos.get(m["key"])
            if model is None or model.group != MODEL:
                raise flattened_error(where, f"{name}: no model tensor {m['key']!r} beside it")
            orig = (recorded.get(name) or {}).get(_ORIG_SHAPE) if isinstance(recorded, dict) else None
            if orig is None:
                raise flattened_error(where, f"{name}: no original shape recorded in .metadata (mcore_data)")
            orig = tuple(int(d) for d in orig)
            if orig != tuple(model.shape):
                raise flattened_error(where, f"{name}: recorded shape {list(orig)} is not the model tensor's "
                                      f"{list(model.shape)}")
            chunk = _chunk_shape(where, name, info, orig)
            virtual = f"{m['chain']}optimizer.state.{STATE_NAMES.get(m['state'], m['state'])}.{m['key']}"
            self._sources[virtual] = (info, chunk)
            self._infos[virtual] = TensorInfo(name=virtual, shape=orig, dtype=info.dtype, group=OPTIMIZER,
                                              layout="virtual")
        if not self._infos:
            raise flattened_error(where, "no optimizer.state.* tensors")

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def _spans(self, name: str, offsets: tuple[int, ...], sizes: tuple[int, ...]):
        """Per saved piece overlapping block ``[offsets, offsets + sizes)`` of ``name``: its chunk's
        grid position and origin, and the flat span ``[first, last)`` (inside the chunk, cut to
        the piece) from the block's first to its last element: one ranged read each."""
        raw, chunk = self._sources[name]
        strides = [math.prod(chunk[d + 1:]) for d in range(len(chunk))]
        for p in raw.pieces:
            grid, start, length = p.offsets[:-1], p.offsets[-1], p.sizes[-1]
            origin = tuple(g * c for g, c in zip(grid, chunk))
            lo = tuple(max(o, b) for o, b in zip(origin, offsets))
            hi = tuple(min(o + c, b + s) for o, c, b, s in zip(origin, chunk, offsets, sizes))
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            first = max(start, sum((a - o) * st for a, o, st in zip(lo, origin, strides)))
            last = min(start + length, sum((b - 1 - o) * st for b, o, st in zip(hi, origin, strides)) + 1)
            if first < last:
                yield tuple(grid), origin, first, last

    def stored_reads(self, name: str, offsets: Iterable[int], sizes: Iterable[int]) -> list[tuple]:
        """The stored regions ``(name, offsets, sizes)`` :meth:`read_region` reads, in its order."""
        raw, _ = self._sources[name]
        offsets, sizes = tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
        return [(raw.name, (*grid, first), (*(1,) * len(grid), last - first))
                for grid, _, first, last in self._spans(name, offsets, sizes)]

    def read_region(self, name: str, offsets: Iterable[int], sizes: Iterable[int]) -> "torch.Tensor":
        """Block ``[offsets, offsets + sizes)`` of per-parameter tensor ``name``: each saved piece
        overlapping it is read over the flat span the block needs (one ranged read), its elements
        placed by their position in their TP-local chunk. Every element must come from exactly
        one piece."""
        import torch

        raw, chunk = self._sources[name]
        offsets, sizes = tuple(int(o) for o in offsets), tuple(int(s) for s in sizes)
        out = torch.empty(sizes, dtype=torch_dtype(raw, self.reader.store.url))
        seen = torch.zeros(sizes, dtype=torch.bool)
        for grid, origin, first, last in self._spans(name, offsets, sizes):
            values = self.reader.read_region(raw.name, (*grid, first), (*(1,) * len(grid), last - first)).reshape(-1)
            shift = (torch.tensor(origin) - torch.tensor(offsets)).unsqueeze(1)
            for a in range(first, last, self.SLAB):  # element coordinates a slab at a time (bounded memory)
                b = min(a + self.SLAB, last)
                where = torch.stack(torch.unravel_index(torch.arange(a, b), chunk)) + shift  # [ndim, n] in the block
                inside = ((where >= 0) & (where < torch.tensor(sizes).unsqueeze(1))).all(0)
                index = tuple(where[:, inside])
                if bool(seen[index].any()):
                    raise flattened_error(self.reader.store.url, f"{raw.name}: saved pieces overlap")
                seen[index] = True
                out[index] = values[a - first:b - first][inside]
        if not bool(seen.all()):
            raise flattened_error(self.reader.store.url, f"{raw.name}: the saved pieces cover {int(seen.sum())} "
                                  f"of {seen.numel()} elements of block {list(offsets)}+{list(sizes)}")
        return out


def _chunk_shape(where: str, name: str, info: TensorInfo, orig: tuple[int, ...]) -> tuple[int, ...]:
    """The TP-local chunk shape of an N-D flattened tensor of original shape ``orig``, checked
    against its stored shape ``[grid..., numel(chunk)]`` and its pieces."""
    shape = tuple(info.shape)
    if len(shape) != len(orig) + 1 or any(g < 1 or o % g for g, o in zip(shape, orig)):
        raise flattened_error(where, f"{name}: stored shape {list(shape)} is not the N-D flattened form of "
                              f"{list(orig)}")
    chunk = tuple(o // g for g, o in zip(shape, orig))
    if math.prod(chunk) != shape[-1]:
        raise flattened_error(where, f"{name}: stored rows of {shape[-1]} elements, chunks of {list(chunk)}")
    for p in info.pieces:
        if any(s != 1 for s in p.sizes[:-1]):
            raise flattened_error(where, f"{name}: a piece {list(p.offsets)}+{list(p.sizes)} spans several chunks")
    return chunk


def is_flattened_state(infos: dict[str, TensorInfo]) -> bool:
    """Whether a checkpoint's optimizer tensors are megatron's N-D flattened ones (the key names
    say ``fp32_param``, which only ``fully_sharded_model_space`` uses)."""
    return any((m := _NAME_RE.match(n)) and m["state"] == "fp32_param"
               for n, i in infos.items() if i.group == OPTIMIZER)


__all__ = ["FORMAT", "FlattenedState", "flattened_error", "is_flattened_state"]
