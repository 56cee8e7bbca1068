"""Loading pickled checkpoint files without ever running code from them.

SkyRL loads its ``.pt`` files with ``torch.load(weights_only=False)``: a crafted checkpoint
runs arbitrary code. ckptctl never does. Two entry points:

- :func:`load_pt` — ``torch.load(weights_only=True)`` (torch's restricted unpickler). What
  that unpickler allows (tensors, storages, dtypes) is extended by an explicit allowlist:
  * :data:`SAFE_GLOBALS` — real, side-effect-free globals: numpy's array reconstruction (the
    numpy RNG state in ``extra_state``), plain builtin containers;
  * :data:`STAND_INS` — names whose objects are kept AS DATA: the unpickler builds a
    :class:`PickledObject` that records the constructor arguments and state instead of
    creating the real object (OmegaConf containers in ``trainer_state.pt``, legacy
    ``ShardedTensor`` metadata). :func:`to_plain` turns them into dicts/lists.
  * :data:`TENSOR_STAND_INS` — tensor subclasses kept as data: the unpickler builds an empty
    wrapper tensor of the right global shape and dtype (a :class:`TensorStandIn`) and records
    the pickled state instead of running the class's ``__setstate__`` (legacy ``ShardedTensor``,
    whose ``__setstate__`` needs a live process group);
  * ``builtins.getattr`` — only as :func:`stand_in_getattr`, which resolves attributes of
    stand-in classes to more stand-ins (``ShardedTensor.ProcessGroupState``) and refuses
    everything else.
  * DTensor and the spec and placements its pickle names (:data:`DTENSOR_STAND_INS`) — kept
    as data too (:class:`DTensorData`, with the few attributes ckptctl reads: ``_local_tensor``,
    ``_spec``, ``device_mesh``, ``placements``): the real classes would cost importing
    ``torch.distributed.tensor`` (~0.8 s, sympy with it) at the start of every command that
    reads an FSDP checkpoint. The mesh stays torch's ``DeviceMesh`` (it comes with ``torch``).
  A caller may add stand-ins by name (``extra_stand_ins``, the CLI's ``--allow-global``):
  since a stand-in never calls anything, even a wrong name cannot run code.
  :func:`unpickling` is the one context in which ckptctl unpickles torch data (``load_pt``
  and :mod:`ckptctl.formats.torchzip` both use it).
- :func:`load_pickle` — a plain pickle (torch DCP's ``.metadata``) through a
  ``pickle.Unpickler`` whose ``find_class`` returns only allowlisted globals.

Anything else is refused with :class:`UnsafeCheckpointError`, which names the global.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import re
import struct
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

from ckptctl.errors import CkptctlError
from ckptctl.heavy import import_torch

#: Real globals that are safe to call while unpickling (they build plain data).
SAFE_GLOBAL_NAMES = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "builtins.list",
    "builtins.dict",
    "builtins.int",
    "builtins.set",
    "builtins.frozenset",
    "collections.defaultdict",
)

#: Globals kept as data (never instantiated): OmegaConf containers, typing markers, legacy
#: ShardedTensor metadata.
STAND_INS = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    "omegaconf.nodes.EnumNode",
    "omegaconf.nodes.ValueNode",
    "typing.Any",
    # legacy ShardedTensor (FSDP1 SHARDED_STATE_DICT without a device mesh): its metadata
    "torch.distributed._shard.sharded_tensor.shard.Shard",
    "torch.distributed._shard.metadata.ShardMetadata",
    "torch.distributed._shard.sharded_tensor.metadata.ShardedTensorMetadata",
    "torch.distributed._shard.sharded_tensor.metadata.TensorProperties",
    "torch.distributed._shard.sharded_tensor.metadata.MEM_FORMAT_ENCODING",
    "torch.distributed._shard.sharding_spec.chunk_sharding_spec.ChunkShardingSpec",
    "torch.distributed._shard.sharding_spec.api.EnumerableShardingSpec",
    "torch.distributed.remote_device._remote_device",
    "torch.distributed._shard.sharded_tensor.api.ShardedTensor.ProcessGroupState",  # via getattr
)

#: DTensor (a tensor stand-in, :class:`DTensorData`) and the classes its pickle names, kept as data.
DTENSOR = "torch.distributed.tensor.DTensor"
_SPEC = "torch.distributed.tensor._dtensor_spec."
_PLACEMENT = "torch.distributed.tensor.placement_types."
DTENSOR_PARTS = (_SPEC + "DTensorSpec", _SPEC + "TensorMeta", _SPEC + "ShardOrderEntry", _PLACEMENT + "Shard",
                 _PLACEMENT + "_StridedShard", _PLACEMENT + "Replicate", _PLACEMENT + "Partial")
DTENSOR_STAND_INS = (DTENSOR, *DTENSOR_PARTS)
#: Real classes a DTensor's pickle names that ``import torch`` already brings (the mesh).
MESH_GLOBAL_NAMES = ("torch.distributed.device_mesh.DeviceMesh",)

#: Tensor subclasses kept as data (see :class:`TensorStandIn`).
TENSOR_STAND_INS = (
    "torch.distributed._shard.sharded_tensor.api.ShardedTensor",
)

_UNSUPPORTED_RE = re.compile(
    r"(?:unsupported global: GLOBAL\s+|unsupported GLOBAL\s+|unrecognized function\s+|but got <class ')([\w.<>]+)",
    re.IGNORECASE)


class UnsafeCheckpointError(CkptctlError):
    """A pickle references a global outside the allowlist: loading it could run code."""

    exit_code = 1


class CorruptCheckpointError(CkptctlError):
    exit_code = 1


class PickledObject:
    """An object of a stand-in class, kept as data: what the pickle said, nothing executed."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.kwargs = kwargs
        obj.state = None
        return obj

    def __init__(self, *args, **kwargs):  # the pickle's REDUCE calls the class: record only
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"

    @property
    def fields(self) -> dict:
        """The recorded state as one dict (``__dict__`` state and ``__slots__`` state merged)."""
        return state_fields(self.state)


def state_fields(state: Any) -> dict:
    if isinstance(state, dict):
        return dict(state)
    if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
        return {**(state[0] or {}), **(state[1] or {})}
    return {}


_STAND_IN_CLASSES: dict[str, type] = {}


def stand_in(qualname: str) -> type:
    """The (cached) :class:`PickledObject` subclass standing in for ``qualname``."""
    cls = _STAND_IN_CLASSES.get(qualname)
    if cls is None:
        cls = type(f"StandIn[{qualname}]", (PickledObject,), {"qualname": qualname})
        _STAND_IN_CLASSES[qualname] = cls
    return cls


_TENSOR_STAND_IN_CLASSES: dict[str, type] = {}


def tensor_stand_in(qualname: str) -> type:
    """The (cached) :class:`TensorStandIn` subclass standing in for the tensor class ``qualname``
    (for DTensor a :class:`DTensorData` one).

    torch rebuilds a pickled tensor subclass with ``_rebuild_wrapper_subclass(cls, dtype, size,
    ...)`` then ``obj.__setstate__(state)``: with this class as ``cls`` that gives an empty
    wrapper tensor (no data, the global shape and dtype) whose ``state`` is the pickled state.
    """
    cls = _TENSOR_STAND_IN_CLASSES.get(qualname)
    if cls is None:
        import torch

        def __setstate__(self, state):  # record only: never the real class's __setstate__
            self.state = state

        def __repr__(self):
            return f"<pickled {qualname} {tuple(self.shape)} {self.dtype}>"

        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # a wrapper without data
            raise TypeError(f"{qualname} was kept as data (a stand-in without tensor data): cannot run {func}")

        marker = DTensorData if qualname == DTENSOR else TensorStandIn
        cls = type(f"TensorStandIn[{qualname}]", (torch.Tensor, marker),
                   {"qualname": qualname, "state": None, "__setstate__": __setstate__, "__repr__": __repr__,
                    "__torch_dispatch__": classmethod(__torch_dispatch__)})
        _TENSOR_STAND_IN_CLASSES[qualname] = cls
    return cls


class TensorStandIn:
    """Marker base of the tensor stand-ins built by :func:`tensor_stand_in` (``isinstance`` tests)."""

    qualname = "?"
    state: Any = None


class _PickledSpec(PickledObject):
    """A DTensorSpec kept as data: the mesh, placements and tensor meta its pickle set."""

    mesh = property(lambda self: self.fields.get("mesh"))
    placements = property(lambda self: tuple(self.fields.get("placements") or ()))
    tensor_meta = property(lambda self: self.fields.get("tensor_meta"))


class _PickledPlacement(PickledObject):
    """A DTensor placement kept as data, named and printed as torch prints the real one
    (``Shard(dim=0)`` / ``S(0)``, ``Replicate()`` / ``R``, ...)."""

    kind = "?"
    dim = property(lambda self: self.fields.get("dim"))
    split_factor = property(lambda self: self.fields.get("split_factor"))

    def __repr__(self) -> str:
        f = self.fields
        return {"Shard": f"Shard(dim={f.get('dim')})", "Replicate": "Replicate()",
                "Partial": f"Partial({f.get('reduce_op', 'sum')})",
                "_StridedShard": f"_StridedShard(dim={f.get('dim')}, sf={f.get('split_factor')})"}[self.kind]

    def __str__(self) -> str:
        f = self.fields
        return {"Shard": f"S({f.get('dim')})", "Replicate": "R", "Partial": f"P({f.get('reduce_op', 'sum')})",
                "_StridedShard": f"_S({f.get('dim')}, {f.get('split_factor')})"}[self.kind]

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self.fields == other.fields

    def __hash__(self) -> int:
        return hash(repr(self))


for _qualname in DTENSOR_PARTS:
    _name = _qualname.rpartition(".")[2]
    _base = _PickledSpec if _name == "DTensorSpec" else _PickledPlacement if _qualname.startswith(_PLACEMENT) \
        else PickledObject
    _STAND_IN_CLASSES[_qualname] = type(f"StandIn[{_qualname}]", (_base,), {"qualname": _qualname, "kind": _name})


class DTensorData:
    """Marker base of the DTensor stand-in (:func:`tensor_stand_in`): a wrapper tensor of the
    global shape and dtype, no data, the pickled state recorded; the attributes ckptctl reads of a
    DTensor come from that state."""

    qualname = DTENSOR
    state: Any = None

    @property
    def _local_tensor(self):
        return state_fields(self.state).get("_local_tensor")

    @property
    def _spec(self):
        return state_fields(self.state).get("_spec")

    @property
    def device_mesh(self):
        spec = self._spec
        return spec.mesh if isinstance(spec, _PickledSpec) else None

    @property
    def placements(self) -> tuple:
        spec = self._spec
        return spec.placements if isinstance(spec, _PickledSpec) else ()

    def to_local(self):
        """This rank's shard, as ``DTensor.to_local()`` gives it."""
        return self._local_tensor


def is_dtensor(obj: Any) -> bool:
    """Whether ``obj`` is a DTensor: unpickled by ckptctl (kept as data) or a real one."""
    if isinstance(obj, DTensorData):
        return True
    real = sys.modules.get("torch.distributed.tensor")
    return real is not None and isinstance(obj, real.DTensor)


def placement_kind(placement: Any) -> str:
    """``"Shard"``, ``"Replicate"``, ``"Partial"``, ``"_StridedShard"``, ...: of a placement kept
    as data or a real one (its class name: ``_StridedShard`` is not a ``Shard`` here)."""
    return placement.kind if isinstance(placement, _PickledPlacement) else type(placement).__name__


class _RefusedGetattr(pickle.UnpicklingError):
    pass


def stand_in_getattr(obj: Any, name: Any) -> Any:
    """``builtins.getattr`` as ckptctl's unpickler allows it: only on stand-in classes.

    Returns the stand-in for ``<qualname>.<name>`` (e.g. ``ShardedTensor.ProcessGroupState``)
    when that name is itself on the allowlist; any other target is refused, so a pickle cannot
    reach a real attribute through it.
    """
    if isinstance(obj, type) and issubclass(obj, (PickledObject, TensorStandIn)) and isinstance(name, str):
        qualname = f"{obj.qualname}.{name}"
        if qualname in _STAND_IN_CLASSES:
            return _STAND_IN_CLASSES[qualname]
        raise _RefusedGetattr(f"Unsupported global: GLOBAL {qualname} (reached through getattr)")
    raise _RefusedGetattr(f"Unsupported global: GLOBAL builtins.getattr (called on {type(obj).__name__}, "
                          "not on a stand-in)")


def _import_global(qualname: str) -> Any:
    module, _, name = qualname.rpartition(".")
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name)


def _safe_globals(extra_stand_ins: Iterable[str]) -> list:
    out: list = []
    for qualname in SAFE_GLOBAL_NAMES:
        try:
            out.append((_import_global(qualname), qualname))
        except (ImportError, AttributeError):
            continue  # e.g. numpy 1.x has no numpy._core
    try:  # numpy's per-dtype classes (numpy >= 1.25), needed to BUILD an ndarray's dtype
        import numpy.dtypes

        out += [(getattr(numpy.dtypes, n), f"numpy.dtypes.{n}") for n in dir(numpy.dtypes) if n.endswith("DType")]
    except ImportError:
        pass
    for qualname in MESH_GLOBAL_NAMES:
        try:
            out.append((_import_global(qualname), qualname))
        except (ImportError, AttributeError):
            continue  # a torch built without torch.distributed: no DTensor checkpoint loads anyway
    out.append((tensor_stand_in(DTENSOR), DTENSOR))
    for qualname in DTENSOR_PARTS:
        out.append((_STAND_IN_CLASSES[qualname], qualname))
    for qualname in TENSOR_STAND_INS:
        out.append((tensor_stand_in(qualname), qualname))
    for qualname in (*STAND_INS, *extra_stand_ins):
        if qualname not in TENSOR_STAND_INS and qualname not in DTENSOR_STAND_INS:
            out.append((stand_in(qualname), qualname))
    out.append((stand_in_getattr, "builtins.getattr"))
    return out


#: torch's allowlist is process-global (``safe_globals`` adds on enter and removes on exit), so
#: concurrent loads must not interleave: every ckptctl unpickling holds this lock.
_UNPICKLE_LOCK = threading.RLock()
_MESH_LOG_FILTERED = False


def _quiet_device_mesh_log() -> None:
    """DeviceMesh.__setstate__ logs a warning when no process group exists (always, offline)."""
    global _MESH_LOG_FILTERED
    if not _MESH_LOG_FILTERED:
        logging.getLogger("torch.distributed.device_mesh").addFilter(
            lambda record: "pickling/unpickling of the DeviceMesh" not in record.getMessage())
        _MESH_LOG_FILTERED = True


def _is_torch_own(entry: Any) -> bool:
    """A process-wide safe global torch itself registers (DTensor, DeviceMesh, placements, NJT)."""
    if isinstance(entry, tuple):
        qualname = entry[1] if len(entry) == 2 and isinstance(entry[1], str) else ""
    else:
        qualname = f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', '')}"
    return (qualname.startswith(("torch.distributed.", "torch.nested.")) and not _looks_dangerous(qualname)
            and qualname not in DTENSOR_STAND_INS)  # once torch.distributed.tensor is imported: ours win


@contextmanager
def unpickling(extra_stand_ins: Iterable[str] = ()) -> Iterator[set[str]]:
    """The context every ckptctl torch unpickling runs in; yields the allowed global names.

    Imports torch (:func:`ckptctl.heavy.import_torch`), holds the unpickling lock, and makes
    ckptctl's allowlist (:func:`_safe_globals`, DTensor and its placements as stand-ins) plus
    torch's own registrations torch's ONLY user
    allowlist for the duration: globals other
    code registered process-wide (``import megatron.core`` adds ``argparse.Namespace``,
    ``io.BytesIO``, ``pathlib.PosixPath``, numpy, ...) do not widen what a ckptctl load
    accepts. Every registration is restored afterwards.
    """
    torch = import_torch()
    _quiet_device_mesh_log()
    allowed = _safe_globals(extra_stand_ins)
    serialization = torch.serialization
    with _UNPICKLE_LOCK:
        saved = serialization.get_safe_globals()
        serialization.clear_safe_globals()
        try:
            serialization.add_safe_globals([g for g in saved if _is_torch_own(g)] + allowed)
            yield {q for _, q in allowed}
        finally:
            serialization.clear_safe_globals()
            serialization.add_safe_globals(saved)


def culprits_in_pickle(data: bytes, allowed: Iterable[str]) -> list[str]:
    """The globals a pickle (e.g. a ``data.pkl`` record) references beyond torch's and
    ckptctl's allowlists, read statically (nothing is run)."""
    import torch._weights_only_unpickler as wo

    try:
        found = wo.get_globals_in_pkl(io.BytesIO(data))
    except Exception:
        return []
    known = set(wo._get_allowed_globals()) | set(allowed)
    return sorted(g for g in found if g not in known)


def explain_load_error(exc: Exception, name: str, culprits: list[str] = ()) -> CkptctlError:
    """The ckptctl error for an exception raised while unpickling ``name``."""
    return _explain(exc, name, culprits)


_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil", "socket",
                      "importlib", "runpy", "pickle", "_pickle", "marshal", "ctypes", "code", "pty", "webbrowser",
                      "builtins", "__builtin__", "io", "_io", "pathlib", "tempfile", "multiprocessing",
                      "threading", "_thread", "signal", "asyncio", "urllib", "http", "ftplib", "smtplib",
                      "tarfile", "zipfile", "dill", "cloudpickle", "torch.hub")


def _looks_dangerous(qualnames: str) -> bool:
    return any(q.strip().split(".")[0] in _DANGEROUS_MODULES or q.strip().startswith(("torch.hub.", "torch.load"))
               for q in qualnames.split(","))


def _culprits(source: Any, allowed: set[str]) -> list[str]:
    """The globals a checkpoint references beyond the allowlist (read from its pickle, not run)."""
    import torch

    try:
        if hasattr(source, "seek"):
            source.seek(0)
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(source) if g not in allowed]
    except Exception:
        return []


def _python3_name(qualname: str) -> str:
    """What Python 3's unpickler would resolve a protocol-2 name to (``commands.Popen`` is
    ``subprocess.Popen``, ``__builtin__.eval`` is ``builtins.eval``)."""
    import _compat_pickle

    module, _, name = qualname.rpartition(".")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}" if module else name


def _explain(exc: Exception, name: str, culprits: list[str] = ()) -> CkptctlError:
    text = str(exc)
    match = _UNSUPPORTED_RE.search(text)
    if match or culprits:
        names = list(culprits) if culprits else [match.group(1)]
        names.sort(key=lambda q: not _looks_dangerous(_python3_name(q)))  # the dangerous ones first
        shown = [q if _python3_name(q) == q else f"{q} (= {_python3_name(q)})" for q in names[:3]]
        culprit = ", ".join(shown)
        dangerous = any(_looks_dangerous(_python3_name(q)) for q in names)
        hint = ("" if dangerous else
                f"; if you trust it as plain data, pass --allow-global {', '.join(names[:3])}")
        return UnsafeCheckpointError(
            f"refusing to load {name}: it references {culprit}, which is not on ckptctl's allowlist "
            f"(unpickling it could run code){hint}")
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in text.lower():
        # torch wraps the unpickler's own words in a long explanation: keep those words
        detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
        detail = " ".join(detail.split()) or next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
        if detail.lower().startswith(("unsupported operand", "unsupported persistent")):  # cannot even parse it
            return CorruptCheckpointError(f"cannot read {name}: corrupt, truncated or not a torch checkpoint "
                                          f"({detail[:160]})")
        return UnsafeCheckpointError(f"refusing to load {name}: {detail[:200]}")
    return CorruptCheckpointError(f"cannot read {name}: corrupt or truncated ({type(exc).__name__}: "
                                  f"{' '.join(text.split())[:160]})")


def load_pt(source: str | BinaryIO | bytes, *, name: str | None = None, mmap: bool = False,
            extra_stand_ins: Iterable[str] = ()) -> Any:
    """``torch.load(weights_only=True)`` with ckptctl's allowlist; never runs pickled code.

    ``source`` is a local path (memory-mapped when ``mmap``), a binary file object, or bytes.
    """
    import torch

    label = name or (source if isinstance(source, str) else "checkpoint file")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
        mmap = False
    try:
        with unpickling(extra_stand_ins) as allowed:
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError,
            TypeError, OSError, IndexError, AssertionError, OverflowError, struct.error) as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):  # not damage: the CLI says "not found"/"access denied"
            raise
        culprits = []
        if isinstance(exc, pickle.UnpicklingError):
            with unpickling(extra_stand_ins) as allowed:  # the same allowlist as the load
                culprits = _culprits(source, allowed)
        raise _explain(exc, label, culprits) from exc


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: Mapping[str, Any], name: str):
        super().__init__(file)
        self._allowed = allowed
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        if qualname in self._allowed:
            return self._allowed[qualname]
        raise UnsafeCheckpointError(
            f"refusing to load {self._name}: it references {qualname}, which is not on ckptctl's allowlist")

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"refusing to load {self._name}: unexpected persistent id in a plain pickle")


def load_pickle(data: bytes, allowed: Mapping[str, Any], *, name: str) -> Any:
    """Unpickle ``data`` allowing only the globals in ``allowed`` (qualified name → object)."""
    return _unpickle(_AllowlistUnpickler(io.BytesIO(data), allowed, name), name)


def _unpickle(unpickler: "_AllowlistUnpickler", name: str) -> Any:
    """``unpickler.load()`` with its failures as one-line ckptctl errors naming ``name``."""
    try:
        return unpickler.load()
    except CkptctlError:
        raise
    except _RefusedGetattr as exc:
        raise UnsafeCheckpointError(f"refusing to load {name}: {exc}") from exc
    except Exception as exc:
        raise CorruptCheckpointError(f"cannot read {name}: corrupt or truncated ({type(exc).__name__})") from exc


#: What :func:`load_plain_pickle` builds for real: plain containers (a config's dicts and lists).
PLAIN_GLOBALS: dict[str, Any] = {
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple, "builtins.set": set,
    "builtins.frozenset": frozenset, "builtins.int": int, "collections.OrderedDict": dict,
}


class _PlainUnpickler(_AllowlistUnpickler):
    """:class:`_AllowlistUnpickler` that resolves protocol-2 names as Python 3 does
    (``__builtin__.list``) before the allowlist decides."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(*_python3_name(f"{module}.{name}").rsplit(".", 1))

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(f"cannot read {self._name} without torch: it holds tensors")


def load_plain_pickle(data: bytes, *, name: str, extra_stand_ins: Iterable[str] = ()) -> Any:
    """A ``torch.save`` archive's ``data.pkl`` that holds no tensors (``trainer_state.pt``: the
    step and the training config), unpickled WITHOUT torch, for the light commands: plain
    containers are built, OmegaConf containers and other :data:`STAND_INS` kept as data
    (:func:`to_plain` turns them into dicts), anything else refused (one-line error)."""
    import collections

    allowed = dict(PLAIN_GLOBALS, **{"collections.defaultdict": collections.defaultdict,
                                     "builtins.getattr": stand_in_getattr})
    allowed.update({q: stand_in(q) for q in (*STAND_INS, *extra_stand_ins) if q not in TENSOR_STAND_INS})
    return _unpickle(_PlainUnpickler(io.BytesIO(data), allowed, name), name)


def to_plain(obj: Any) -> Any:
    """Turn stand-ins (OmegaConf containers and nodes, other kept-as-data objects) into plain data."""
    if isinstance(obj, PickledObject):
        state = obj.state
        q = obj.qualname
        if q.startswith("omegaconf.") and isinstance(state, dict) and "_content" in state:
            return to_plain(state["_content"])
        if q.startswith("omegaconf.nodes.") and isinstance(state, dict) and "_val" in state:
            return to_plain(state["_val"])
        fields = state_fields(state)
        if fields:  # __dict__ and/or __slots__ state
            return {"__class__": q, **{k: to_plain(v) for k, v in fields.items() if not k.startswith("_parent")}}
        return {"__class__": q, "args": to_plain(list(obj.args)), "state": to_plain(state)}
    if isinstance(obj, TensorStandIn):
        return {"__class__": obj.qualname, "shape": list(obj.shape), "dtype": str(obj.dtype).replace("torch.", ""),
                "state": to_plain(obj.state)}
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): to_plain(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# without torch: the common FSDP2 state dict, for an export that only copies bytes
# ---------------------------------------------------------------------------------------------
class NeedsTorch(Exception):
    """The pickle holds something :func:`load_without_torch` does not build: read it with torch
    (:func:`unpickling`), which also gives the proper error if the file is unsafe or damaged."""


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a ``torch.save`` archive, unpickled without torch: where its elements are in
    storage ``storage_key`` (``dtype``: a torch dtype name), nothing read."""

    storage_key: str
    dtype: str
    storage_offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in reversed(list(zip(self.shape, self.stride))):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True


class StoredDTensor(DTensorData):
    """A DTensor unpickled without torch: its global ``shape`` and ``dtype`` (a name) and the
    pickled state (its ``_local_tensor`` a :class:`StoredTensor`, the spec kept as data)."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        self.shape = shape
        self.dtype = dtype
        self.state = None

    def __setstate__(self, state):  # record only
        self.state = state


class _StateDict(dict):
    """An ``OrderedDict`` state dict: a dict that takes the ``_metadata`` attribute torch pickles."""


@dataclass(frozen=True)
class _StorageType:
    dtype: str


# torch's typed storage classes, by the dtype they hold (``torch.UntypedStorage``: bytes)
_STORAGE_DTYPES = {"DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
                   "UntypedStorage": "uint8"}
_TORCH_FREE_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                      "bool", "float8_e4m3fn", "float8_e5m2")
_MESH_PARTS = ("torch.distributed.device_mesh.DeviceMesh", "torch.distributed._mesh_layout._MeshLayout",
               "torch.distributed._mesh_layout._FlatLayout", "torch.device")


def _rebuild_wrapper_subclass(*args):  # only ever an argument of _rebuild_from_type_v2
    raise NeedsTorch("a tensor subclass other than DTensor")


def _rebuild_from_type_v2(func, new_type, args, state):
    if func is not _rebuild_wrapper_subclass or new_type is not StoredDTensor or len(args) < 3 \
            or args[0] is not StoredDTensor or not isinstance(args[1], str):
        raise NeedsTorch("a tensor subclass other than DTensor")
    obj = StoredDTensor(tuple(int(s) for s in args[2]), args[1])
    obj.__setstate__(state)
    return obj


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, tuple) or len(storage) != 2:
        raise NeedsTorch("a tensor without a storage record")
    key, dtype = storage
    return StoredTensor(key, dtype, int(storage_offset), tuple(int(s) for s in size), tuple(int(s) for s in stride))


def _torch_free_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        "collections.OrderedDict": _StateDict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_wrapper_subclass": _rebuild_wrapper_subclass,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.serialization._get_layout": str,
        "torch.Size": tuple,
        DTENSOR: StoredDTensor,
    }
    allowed.update({f"torch.{name}": _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()})
    allowed.update({f"torch.{dtype}": dtype for dtype in _TORCH_FREE_DTYPES})
    allowed.update({q: _STAND_IN_CLASSES[q] for q in DTENSOR_PARTS})
    allowed.update({q: stand_in(q) for q in _MESH_PARTS})
    return allowed


class _TorchFreeUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage: Any):
        super().__init__(file, encoding="utf-8")
        self._allowed = _torch_free_globals()
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get(f"{module}.{name}")
        if found is None:
            raise NeedsTorch(f"{module}.{name}")
        return found

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage") \
                or not isinstance(pid[1], _StorageType):
            raise NeedsTorch("an unexpected persistent id")
        _, storage_type, key, location, numel = pid
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        self._storage(key, storage_type.dtype, int(numel))
        return key, storage_type.dtype


def load_without_torch(data: bytes, storage: Any) -> Any:
    """Unpickle a ``data.pkl`` record WITHOUT torch when it holds only what an FSDP2 model state
    dict holds (plain and DTensor tensors, their mesh and placements, containers): tensors become
    :class:`StoredTensor` / :class:`StoredDTensor`; ``storage(key, dtype, numel)`` is called for
    each storage. Like every ckptctl unpickling it only builds data (``find_class`` hands out
    ckptctl's own record-only classes and functions); anything else raises :class:`NeedsTorch`,
    and the caller reads the file with torch instead, whose errors then stand."""
    try:
        return _TorchFreeUnpickler(io.BytesIO(data), storage).load()
    except NeedsTorch:
        raise
    except Exception as exc:  # damaged, or a form this reader does not know: torch's turn
        raise NeedsTorch(f"{type(exc).__name__}: {exc}") from exc
