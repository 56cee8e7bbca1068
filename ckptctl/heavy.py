"""Importing torch, which only the commands that read or write tensors need (``--help``,
``list``, ``prune`` and ``resolve-resume`` never import it)."""

from __future__ import annotations

import gc
import importlib
import sys
from types import ModuleType

# torch alone: the DTensor classes FSDP checkpoints' pickles name are read as data
# (ckptctl.formats.safe_load), not from torch.distributed.tensor, whose import (sympy with it)
# took ~0.8 s of every inspect, export and reshard start
TORCH_MODULES = ("torch",)


def import_torch() -> ModuleType:
    """``torch`` (with :data:`TORCH_MODULES`), imported with the cyclic garbage collector paused.

    The import creates ~260,000 objects, and the collector's 544 passes over them on the way
    cost 0.4-0.75 s of the 2.5-3.2 s it takes (2-core VM, median of five runs 3.23 s -> 2.47 s),
    at the start of every export, reshard and inspect, for no garbage (modules, classes and
    functions live as long as the process). The collector's state is restored afterwards."""
    if all(name in sys.modules for name in TORCH_MODULES):
        return sys.modules["torch"]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name in TORCH_MODULES:
            importlib.import_module(name)
    finally:
        if was_enabled:
            gc.enable()
    return sys.modules["torch"]
