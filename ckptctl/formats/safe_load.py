"""Loading pickled checkpoint files without ever running code from them.

SkyRL loads its ``.pt`` files with ``torch.load(weights_only=False)``: a crafted checkpoint
runs arbitrary code. ckptctl never does. Two entry points:

- :func:`load_pt` — ``torch.load(weights_only=True)`` (torch's restricted unpickler). What
  that unpickler allows (tensors, DTensor and its mesh/placements once
  ``torch.distributed.tensor`` is imported) is extended by an explicit allowlist:
  * :data:`SAFE_GLOBALS` — real, side-effect-free globals: numpy's array reconstruction (the
    numpy RNG state in ``extra_state``), plain builtin containers;
  * :data:`STAND_INS` — names whose objects are kept AS DATA: the unpickler builds a
    :class:`PickledObject` that records the constructor arguments and state instead of
    creating the real object (OmegaConf containers in ``trainer_state.pt``, legacy
    ``ShardedTensor`` metadata). :func:`to_plain` turns them into dicts/lists.
  A caller may add stand-ins by name (``extra_stand_ins``, the CLI's ``--allow-global``):
  since a stand-in never calls anything, even a wrong name cannot run code.
- :func:`load_pickle` — a plain pickle (torch DCP's ``.metadata``) through a
  ``pickle.Unpickler`` whose ``find_class`` returns only allowlisted globals.

Anything else is refused with :class:`UnsafeCheckpointError`, which names the global.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any, BinaryIO, Iterable, Mapping

from ckptctl.errors import CkptctlError

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
)

_UNSUPPORTED_RE = re.compile(
    r"(?:unsupported global: GLOBAL\s+|unrecognized function\s+|but got <class ')([\w.<>]+)", re.IGNORECASE)


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


_STAND_IN_CLASSES: dict[str, type] = {}


def stand_in(qualname: str) -> type:
    """The (cached) :class:`PickledObject` subclass standing in for ``qualname``."""
    cls = _STAND_IN_CLASSES.get(qualname)
    if cls is None:
        cls = type(f"StandIn[{qualname}]", (PickledObject,), {"qualname": qualname})
        _STAND_IN_CLASSES[qualname] = cls
    return cls


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
    for qualname in (*STAND_INS, *extra_stand_ins):
        out.append((stand_in(qualname), qualname))
    return out


_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy",
                      "pickle", "marshal", "ctypes", "code", "pty", "webbrowser", "builtins", "__builtin__")


def _looks_dangerous(qualnames: str) -> bool:
    return any(q.strip().split(".")[0] in _DANGEROUS_MODULES for q in qualnames.split(","))


def _culprits(source: Any, allowed: set[str]) -> list[str]:
    """The globals a checkpoint references beyond the allowlist (read from its pickle, not run)."""
    import torch

    try:
        if hasattr(source, "seek"):
            source.seek(0)
        return [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(source) if g not in allowed]
    except Exception:
        return []


def _explain(exc: Exception, name: str, culprits: list[str] = ()) -> CkptctlError:
    text = str(exc)
    match = _UNSUPPORTED_RE.search(text)
    if match or culprits:
        culprit = ", ".join(culprits[:3]) if culprits else match.group(1)
        hint = ("" if _looks_dangerous(culprit) else
                f"; if you trust it as plain data, pass --allow-global {culprit}")
        return UnsafeCheckpointError(
            f"refusing to load {name}: it references {culprit}, which is not on ckptctl's allowlist "
            f"(unpickling it could run code){hint}")
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in text.lower():
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), text)
        return UnsafeCheckpointError(f"refusing to load {name}: {first[:200]}")
    return CorruptCheckpointError(f"cannot read {name}: corrupt or truncated ({type(exc).__name__}: "
                                  f"{' '.join(text.split())[:160]})")


def load_pt(source: str | BinaryIO | bytes, *, name: str | None = None, mmap: bool = False,
            extra_stand_ins: Iterable[str] = ()) -> Any:
    """``torch.load(weights_only=True)`` with ckptctl's allowlist; never runs pickled code.

    ``source`` is a local path (memory-mapped when ``mmap``), a binary file object, or bytes.
    """
    import torch
    import torch.distributed.tensor  # noqa: F401  (registers DTensor, DeviceMesh, placements as safe)

    label = name or (source if isinstance(source, str) else "checkpoint file")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
        mmap = False
    allowed = _safe_globals(extra_stand_ins)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, AttributeError,
            TypeError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        culprits = _culprits(source, {q for _, q in allowed}) if isinstance(exc, pickle.UnpicklingError) else []
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
    try:
        return _AllowlistUnpickler(io.BytesIO(data), allowed, name).load()
    except CkptctlError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(f"cannot read {name}: corrupt or truncated ({type(exc).__name__})") from exc


def to_plain(obj: Any) -> Any:
    """Turn stand-ins (OmegaConf containers and nodes, other kept-as-data objects) into plain data."""
    if isinstance(obj, PickledObject):
        state = obj.state
        q = obj.qualname
        if q.startswith("omegaconf.") and isinstance(state, dict) and "_content" in state:
            return to_plain(state["_content"])
        if q.startswith("omegaconf.nodes.") and isinstance(state, dict) and "_val" in state:
            return to_plain(state["_val"])
        if isinstance(state, dict):
            return {"__class__": q, **{k: to_plain(v) for k, v in state.items() if not k.startswith("_parent")}}
        return {"__class__": q, "args": to_plain(list(obj.args)), "state": to_plain(state)}
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)): to_plain(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj
