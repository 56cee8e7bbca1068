"""``list``: every step of a tree with its backend, size and completeness."""

from __future__ import annotations

from ckptctl.storage import open_store
from ckptctl.tree import Tree, scan_tree


def list_checkpoints(url: str, *, endpoint_url: str | None = None) -> Tree:
    """Scan the tree at ``url`` (one recursive listing plus the pointer file)."""
    return scan_tree(open_store(url, endpoint_url=endpoint_url))
