"""``list``: every step of a tree with its backend, size and completeness."""

from __future__ import annotations

from ckptctl.storage import open_store
from ckptctl.tree import Tree, scan_tree


def list_checkpoints(url: str, *, endpoint_url: str | None = None, deep: bool = False) -> Tree:
    """Scan the tree at ``url`` (one recursive listing plus the pointer file). ``deep``: also
    check every step's files against their own indexes (:mod:`ckptctl.formats.integrity`, about
    one small read per file, concurrently); damage makes a step incomplete, naming the file."""
    store = open_store(url, endpoint_url=endpoint_url)
    tree = scan_tree(store)
    if deep:
        from ckptctl.formats.integrity import deep_check_steps

        deep_check_steps(store, tree.steps)
    return tree
