"""``list``: every step of a tree with its backend, size and completeness."""

from __future__ import annotations

from ckptctl.formats.integrity import check_megatron_indexes, deep_check_steps
from ckptctl.storage import open_store
from ckptctl.tree import Tree, scan_tree


def list_checkpoints(url: str, *, endpoint_url: str | None = None, deep: bool = False) -> Tree:
    """Scan the tree at ``url`` (one recursive listing plus the pointer file) and read each
    Megatron component's ``.metadata`` (one read per component, concurrently): its parallel
    layout (``TP2·PP2·EP8``), and data files shorter than their chunks. ``deep``: check every
    step's files against their own indexes (:mod:`ckptctl.formats.integrity`, about one small
    read per file, concurrently). Damage makes a step incomplete, naming the file."""
    store = open_store(url, endpoint_url=endpoint_url)
    tree = scan_tree(store)
    (deep_check_steps if deep else check_megatron_indexes)(store, tree.steps)
    return tree
