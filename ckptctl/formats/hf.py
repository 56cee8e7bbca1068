"""Hugging Face exports (``save_pretrained``): safetensors weights + ``config.json``.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) + the
data section; ``data_offsets`` are relative to the END of the header (byte ``8 + N``).
Metadata therefore costs one small ranged read per shard (the first ``header_prefetch``
bytes, plus a second read only when the header is larger), never a download of a shard; one
tensor is one ranged read of its byte range. No torch import until a tensor is read.

Sharded exports name their shards in ``model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {tensor: shard}}``); :meth:`HfReader.summary`
checks the index against the shard headers.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from ckptctl.errors import CkptctlError, NotFoundError
from ckptctl.formats.base import MODEL, CheckpointReader, Piece, TensorInfo, dtype_size, read_json, torch_dtype
from ckptctl.formats.safe_load import CorruptCheckpointError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ckptctl.storage import Store

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: Bytes read speculatively for a header in a bucket, so that one request reads it: a tiny
#: model's header is ~2 KB, a dense 24-layer model's ~25 KB, an MoE shard of 1,000 expert
#: tensors ~120 KB. A second request costs a round trip (and on some servers a pass over the
#: whole object); the extra bytes cost nothing next to it.
HEADER_PREFETCH = 256 * 1024
#: On a local disk a second read costs no round trip, so the prefetch stays small.
LOCAL_HEADER_PREFETCH = 16 * 1024
#: The safetensors library refuses headers above 100 MB; so do we (a corrupt length field).
MAX_HEADER = 100 * 1024 * 1024

#: safetensors dtype codes -> torch dtype names (read here, written by :mod:`~ckptctl.formats.hf_writer`).
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
}

CONFIG_FACTS = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "vocab_size", "tie_word_embeddings",
                "torch_dtype", "dtype", "transformers_version")


@dataclass
class SafetensorsHeader:
    """The parsed header of one safetensors file."""

    file: str  # relative to the store
    header_length: int  # N (the JSON part, without the 8-byte length field)
    metadata: dict[str, str]
    tensors: dict[str, dict]  # name -> {"dtype" (torch name), "shape", "begin", "end"} (absolute offsets)
    bytes_read: int = 0

    @property
    def data_start(self) -> int:
        return 8 + self.header_length

    @property
    def data_end(self) -> int:
        return max((t["end"] for t in self.tensors.values()), default=self.data_start)


def parse_safetensors_header(store: "Store", rel: str, *, prefetch: int | None = None,
                             head: bytes | None = None) -> SafetensorsHeader:
    """Read and validate the header of ``rel``: one ranged read, two when the header is larger
    than ``prefetch`` (default: :data:`HEADER_PREFETCH` in a bucket, :data:`LOCAL_HEADER_PREFETCH`
    on disk). ``head``: the file's first bytes (length field and header), when the caller holds
    them -- nothing is read. Raises :class:`CorruptCheckpointError` naming the file."""
    url = store.url_of(rel)
    if prefetch is None:
        prefetch = LOCAL_HEADER_PREFETCH if store.is_local else HEADER_PREFETCH
    given = head is not None
    if not given:
        head = store.read_range(rel, 0, 8 + max(prefetch, 0))
    read = 0 if given else len(head)
    if len(head) < 8:
        raise CorruptCheckpointError(f"cannot read {url}: not a safetensors file (only {len(head)} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > MAX_HEADER:
        raise CorruptCheckpointError(f"cannot read {url}: not a safetensors file (header length field {n})")
    raw = head[8:8 + n]
    if len(raw) < n and not given and len(head) == 8 + max(prefetch, 0):
        rest = store.read_range(rel, len(head), 8 + n)
        read += len(rest)
        raw += rest
    if len(raw) < n:
        raise CorruptCheckpointError(f"cannot read {url}: truncated safetensors header ({len(raw)} of {n} bytes)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpointError(f"cannot read {url}: corrupt safetensors header (not JSON: {exc})") from exc
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"cannot read {url}: corrupt safetensors header (not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, dict] = {}
    for name, entry in doc.items():
        try:
            code = entry["dtype"]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"cannot read {url}: corrupt safetensors header entry {name!r}") from exc
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise CorruptCheckpointError(f"cannot read {url}: tensor {name!r} has unsupported dtype {code!r}")
        numel = 1
        for d in shape:
            if d < 0:
                raise CorruptCheckpointError(f"cannot read {url}: tensor {name!r} has a negative dimension")
            numel *= d
        if begin < 0 or end - begin != numel * dtype_size(dtype):
            raise CorruptCheckpointError(f"cannot read {url}: tensor {name!r} spans bytes [{begin}, {end}) but "
                                         f"{dtype}{shape} needs {numel * dtype_size(dtype)}")
        tensors[name] = {"dtype": dtype, "shape": shape, "begin": data_start + begin, "end": data_start + end}
    return SafetensorsHeader(rel, n, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
                             tensors, read)


def read_safetensors_header(store: "Store", rel: str) -> dict[str, Any]:
    """Plain-data description of one safetensors file (for ``inspect FILE``), header only."""
    h = parse_safetensors_header(store, rel)
    dtypes: dict[str, int] = {}
    params = 0
    for t in h.tensors.values():
        dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + 1
        params += math.prod(t["shape"])
    return {
        "header_bytes": h.header_length, "metadata": h.metadata, "tensor_count": len(h.tensors),
        "parameters": params, "data_bytes": h.data_end - h.data_start, "dtypes": dtypes,
        "tensors": [{"name": k, "dtype": v["dtype"], "shape": v["shape"], "byte_offset": v["begin"],
                     "byte_length": v["end"] - v["begin"]} for k, v in h.tensors.items()],
    }


class HfReader(CheckpointReader):
    """Reader of an HF export directory (store rooted at it)."""

    backend = "hf"

    def __init__(self, store: "Store", *, header_prefetch: int | None = None, max_workers: int = 8):
        super().__init__(store)
        self.header_prefetch = header_prefetch
        self.max_workers = max_workers
        self._index: dict | None = None
        self._index_loaded = False
        self._shards: list[str] | None = None
        self._headers: dict[str, SafetensorsHeader] | None = None
        self._infos: dict[str, TensorInfo] | None = None
        self.problems: list[str] = []

    # -- which files ----------------------------------------------------------------------
    def read_index(self) -> dict | None:
        if not self._index_loaded:
            self._index_loaded = True
            index = read_json(self.store, INDEX_FILE)
            if index is None:
                return None
            if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
                raise CorruptCheckpointError(f"cannot read {self.store.url_of(INDEX_FILE)}: no weight_map")
            self._index = index
        return self._index

    def shard_files(self) -> list[str]:
        """The weight files: the index's shards, else ``model.safetensors``, else any top-level
        ``*.safetensors`` (one listing, only in that last case)."""
        self.headers()
        return list(self._shards)

    def _parse(self, rel: str) -> SafetensorsHeader:
        return parse_safetensors_header(self.store, rel, prefetch=self.header_prefetch)

    def headers(self) -> dict[str, SafetensorsHeader]:
        if self._headers is not None:
            return self._headers
        index = self.read_index()
        if index is None:
            try:  # the common single-file export: its header read doubles as the existence check
                self._headers = {SINGLE_FILE: self._parse(SINGLE_FILE)}
                self._shards = [SINGLE_FILE]
                return self._headers
            except NotFoundError:
                pass
            shards = sorted(f.path for f in self.store.walk() if f.path.endswith(".safetensors") and "/" not in f.path)
            if not shards:
                raise NotFoundError(f"{self.store.url}: no safetensors weights (no {SINGLE_FILE}, no {INDEX_FILE})")
        else:
            shards = sorted({str(v) for v in index["weight_map"].values()})
        self._shards = shards
        if self.store.is_local or len(shards) < 2:
            parsed = [self._parse_or_missing(rel) for rel in shards]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self.max_workers, len(shards))) as pool:
                parsed = list(pool.map(self._parse_or_missing, shards))
        self._headers = {rel: h for rel, h in zip(shards, parsed) if h is not None}
        return self._headers

    def _parse_or_missing(self, rel: str) -> SafetensorsHeader | None:
        try:
            return self._parse(rel)
        except NotFoundError:
            if self.read_index() is None:
                raise
            self.problems.append(f"shard {rel} named in {INDEX_FILE} is missing")
            return None

    @property
    def bytes_read_for_headers(self) -> int:
        return sum(h.bytes_read for h in self.headers().values())

    # -- the reader interface -------------------------------------------------------------
    def _build(self) -> dict[str, TensorInfo]:
        if self._infos is None:
            infos: dict[str, TensorInfo] = {}
            index = self.read_index()
            weight_map = index["weight_map"] if index is not None else None
            for rel, h in self.headers().items():
                for name, t in h.tensors.items():
                    if name in infos:
                        # duplicate across shards: the index (if any) decides which one loaders use
                        if weight_map is None or weight_map.get(name) != rel:
                            continue
                    shape = tuple(t["shape"])
                    infos[name] = TensorInfo(
                        name=name, shape=shape, dtype=t["dtype"], group=MODEL, layout="safetensors",
                        pieces=[Piece(rel, (0,) * len(shape), shape, t["begin"], t["end"] - t["begin"])])
            self._infos = infos
        return self._infos

    def tensors(self) -> Iterator[TensorInfo]:
        return iter(self._build().values())

    def tensor_infos(self) -> dict[str, TensorInfo]:
        return dict(self._build())

    def read_tensor(self, name: str) -> "torch.Tensor":
        import torch

        info = self._build().get(name)
        if info is None:
            raise NotFoundError(f"{self.store.url}: no tensor named {name!r} in this export")
        piece = info.pieces[0]
        dtype = torch_dtype(info, self.store.url)
        data = self.store.read_range(piece.file, piece.byte_offset, piece.byte_offset + piece.byte_length)
        if len(data) != piece.byte_length:
            raise CorruptCheckpointError(f"cannot read {self.store.url_of(piece.file)}: truncated ({name} needs "
                                         f"bytes [{piece.byte_offset}, {piece.byte_offset + piece.byte_length}), "
                                         f"got {len(data)})")
        if not data:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape)

    # -- summary ----------------------------------------------------------------------------
    def read_config(self) -> dict | None:
        config = read_json(self.store, CONFIG_FILE)
        return config if isinstance(config, dict) else None

    def check_index(self) -> list[str]:
        """Problems between ``model.safetensors.index.json`` and the shard headers."""
        index = self.read_index()
        if index is None:
            return []
        problems: list[str] = []
        weight_map: dict[str, str] = index["weight_map"]
        headers = self.headers()
        in_shards: dict[str, list[str]] = {}
        for rel, h in headers.items():
            for name in h.tensors:
                in_shards.setdefault(name, []).append(rel)
        missing = [f"{n} (index: {s})" for n, s in weight_map.items() if s in headers and n not in headers[s].tensors]
        if missing:
            problems.append(f"{len(missing)} tensor(s) in {INDEX_FILE} missing from their shard: "
                            + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        extra = [f"{n} ({', '.join(s)})" for n, s in in_shards.items() if n not in weight_map]
        if extra:
            problems.append(f"{len(extra)} tensor(s) in shards but not in {INDEX_FILE}: "
                            + ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else ""))
        dups = [f"{n} ({', '.join(s)})" for n, s in in_shards.items() if len(s) > 1]
        if dups:
            problems.append(f"{len(dups)} tensor(s) stored in more than one shard: " + ", ".join(dups[:5]))
        total = (index.get("metadata") or {}).get("total_size")
        actual = sum(t.nbytes for t in self._build().values())
        if isinstance(total, (int, float)) and int(total) != actual and not missing:
            problems.append(f"{INDEX_FILE} metadata.total_size is {int(total)}, the tensors hold {actual} bytes")
        return problems

    def summary(self, *, check_files: bool = True) -> dict[str, Any]:
        config = self.read_config()
        headers = self.headers()
        infos = list(self._build().values())
        problems = list(self.problems)
        out: dict[str, Any] = {"backend": self.backend}
        out["config"] = {k: config[k] for k in CONFIG_FACTS if k in config} if config else None
        if config is None:
            problems.append(f"missing {CONFIG_FILE}")
        else:
            archs = config.get("architectures") or []
            if any(str(a).startswith("FSDP") for a in archs):
                problems.append(f"architectures {archs} carry a stray 'FSDP' prefix that breaks HF loaders")
        index = self.read_index()
        shard_files = self.shard_files()
        out["sharded"] = index is not None
        out["shards"] = len(shard_files)
        out["shard_files"] = shard_files
        dtypes: dict[str, int] = {}
        for t in infos:
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + 1
        out["tensors"] = len(infos)
        out["parameters"] = sum(t.numel for t in infos)
        out["tensor_bytes"] = sum(t.nbytes for t in infos)
        out["dtypes"] = dtypes
        out["header_bytes"] = sum(8 + h.header_length for h in headers.values())
        out["metadata"] = {rel: h.metadata for rel, h in headers.items()}
        if index is not None:
            out["index_total_size"] = (index.get("metadata") or {}).get("total_size")
        problems += self.check_index()
        if check_files:
            try:
                sizes = {f.path: f.size for f in self.store.walk()}
            except CkptctlError as exc:
                sizes = None
                problems.append(f"could not list {self.store.url}: {exc}")
            if sizes is not None:
                out["total_bytes"] = sum(sizes.get(rel, 0) for rel in shard_files)
                if index is not None:
                    orphans = sorted(f for f in sizes if f.endswith(".safetensors") and "/" not in f
                                     and f not in shard_files)
                    if orphans:
                        problems.append(f"weight file(s) not named in {INDEX_FILE} (loaders ignore them): "
                                        + ", ".join(orphans[:5]) + (" ..." if len(orphans) > 5 else ""))
                for rel, h in headers.items():
                    if rel in sizes and sizes[rel] < h.data_end:
                        problems.append(f"{rel} is truncated: {sizes[rel]} bytes, its header needs {h.data_end}")
        out["problems"] = problems
        return out


__all__ = ["HfReader", "SafetensorsHeader", "parse_safetensors_header", "read_safetensors_header"]
