"""Checks of the side files ``convert-reshard`` copies unchanged into a new checkpoint.

A reshard rewrites the model files but copies ``common.pt``, ``trainer_state.pt``, ``data.pt``,
``metadata.json``, ``huggingface/config.json``, tokenizer files, ... byte for byte. A damaged
one (truncated, flipped bytes, invalid JSON) would be carried into the new checkpoint and only
fail when training resumes. So every copied file whose format can be checked is checked first,
and the run fails before anything is committed, naming the file:

- ``*.pt``: a readable ``torch.save`` zip archive whose every record's CRC-32 holds
  (:func:`ckptctl.formats.torchzip.check_archive`; the files are small, read whole) that
  unpickles through :func:`ckptctl.formats.safe_load.load_pt` (weights-only, ckptctl's
  allowlist: never plain pickle, nothing executed);
- ``*.json``: parses.

Other files (``tokenizer.model``, ``merges.txt``, templates) have no structure to check and are
copied as they are.
"""

from __future__ import annotations

import json
from typing import Iterable

from ckptctl.formats.safe_load import CorruptCheckpointError
from ckptctl.storage import Store

_ZIP_MAGIC = b"PK\x03\x04"


def is_checked(rel: str) -> bool:
    """Whether :func:`check_side_file` can check this file (by its name)."""
    return rel.endswith((".pt", ".json"))


def check_side_file(data: bytes, name: str, *, extra_stand_ins: Iterable[str] = ()) -> None:
    """Raise :class:`CorruptCheckpointError` (or ``UnsafeCheckpointError``) naming ``name``
    when ``data`` is not an intact file of the kind its name says; other names pass."""
    if name.endswith(".pt"):
        from ckptctl.formats.safe_load import load_pt
        from ckptctl.formats.torchzip import check_archive

        if data[:4] != _ZIP_MAGIC:
            raise CorruptCheckpointError(f"cannot read {name}: not a torch.save zip archive (truncated or damaged); "
                                         "refusing to copy it into the new checkpoint")
        check_archive(data, name)  # every record's CRC-32
        load_pt(data, name=name, extra_stand_ins=extra_stand_ins)  # unpickles safely
    elif name.endswith(".json"):
        try:
            json.loads(data)
        except ValueError as exc:
            raise CorruptCheckpointError(f"cannot read {name}: not valid JSON ({' '.join(str(exc).split())[:120]}); "
                                         "refusing to copy it into the new checkpoint") from exc


def read_side_file(store: Store, rel: str, *, extra_stand_ins: Iterable[str] = ()) -> bytes:
    """The bytes of ``rel``, checked by :func:`check_side_file` (named by its URL)."""
    data = store.read_bytes(rel)
    check_side_file(data, store.url_of(rel), extra_stand_ins=extra_stand_ins)
    return data


__all__ = ["check_side_file", "is_checked", "read_side_file"]
