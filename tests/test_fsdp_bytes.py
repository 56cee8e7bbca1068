"""The torch-free byte-copy path of ``export-hf`` (``ckptctl.formats.fsdp_bytes``) on the REAL FSDP
fixtures (tests/realckpt/fsdp_fixtures.py): it must give exactly what :class:`FsdpReader` gives
(names, shapes, pieces, bytes, planned reads), decline every layout it does not copy, never import
torch, never build anything a pickle names beyond its own record-only classes, and an export
through it must be the torch path's export byte for byte (that it imports no torch at all:
test_light_imports)."""

from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest

torch = pytest.importorskip("torch")

from ckptctl.formats import fsdp_bytes  # noqa: E402
from ckptctl.formats.fsdp import FsdpReader  # noqa: E402
from ckptctl.formats.fsdp_bytes import byte_copy_reader  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError, NeedsTorch, load_without_torch  # noqa: E402
from ckptctl.ops.export import export_hf  # noqa: E402
from ckptctl.storage import Store  # noqa: E402
from realckpt.fsdp_fixtures import FSDP_VARIANTS  # noqa: E402

#: what the byte path copies: plain tensors, or DTensors Shard(0) / Replicate() on a 1-D mesh of all ranks
COPIED = {"w1", "w1_mesh", "w2", "w3_tied", "critic_w3", "verl", "fsdp1", "lora_w2", "lora_w1", "qwen3moe_w2"}
#: HSDP's 2-D mesh, the documented single files, FSDP1's legacy ShardedTensor: the torch reader's
DECLINED = {"hsdp", "documented", "fsdp1_sharded"}


def test_every_fixture_is_classified():
    assert COPIED | DECLINED == set(FSDP_VARIANTS) and not COPIED & DECLINED


@pytest.mark.parametrize("name", sorted(COPIED))
def test_same_tensors_bytes_and_reads_as_the_torch_reader(fsdp_ckpts, name):
    path = str(fsdp_ckpts[name].path)
    raw = byte_copy_reader(FsdpReader(Store(path)))
    assert raw is not None
    torch_reader = FsdpReader(Store(path))
    model = [t for t in torch_reader.tensors() if t.group == "model"]
    assert list(raw.tensors()) == model  # names, order, shapes, dtypes, layouts, pieces with byte offsets
    for info in model:
        got = raw.read_tensor(info.name)
        want = torch_reader.read_tensor(info.name).contiguous()
        assert got.shape == tuple(want.shape) and got.dtype == str(want.dtype).removeprefix("torch.")
        assert b"".join(map(bytes, got.parts)) == want.reshape(-1).view(torch.uint8).numpy().tobytes(), info.name
    names = [t.name for t in model]
    assert raw.planned_reads(names) == torch_reader.planned_reads(names)


@pytest.mark.parametrize("name", sorted(DECLINED))
def test_other_layouts_are_left_to_the_torch_reader(fsdp_ckpts, name):
    assert byte_copy_reader(FsdpReader(Store(str(fsdp_ckpts[name].path)))) is None


def _export_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("name", ["w3_tied", "critic_w3", "w1"])
def test_export_is_the_torch_paths_byte_for_byte(fsdp_ckpts, tmp_path, monkeypatch, name):
    src = str(fsdp_ckpts[name].path)
    fast = export_hf(src, str(tmp_path / "fast"), max_shard_size="200KB")
    assert fast.byte_copy
    with monkeypatch.context() as m:
        m.setattr(fsdp_bytes, "byte_copy_reader", lambda reader: None)
        slow = export_hf(src, str(tmp_path / "slow"), max_shard_size="200KB")
    assert not slow.byte_copy
    assert (fast.tensors, fast.shards, fast.skipped) == (slow.tensors, slow.shards, slow.skipped)
    assert _export_files(tmp_path / "fast") == _export_files(tmp_path / "slow")


def test_conversions_take_the_torch_path(fsdp_ckpts, tmp_path):
    assert not export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "bf16"), dtype="bf16").byte_copy
    assert export_hf(str(fsdp_ckpts["w2"].path), str(tmp_path / "fp32"), dtype="fp32").byte_copy  # nothing to cast
    assert not export_hf(str(fsdp_ckpts["lora_w2"].path), str(tmp_path / "lora")).byte_copy  # PEFT names
    assert not export_hf(str(fsdp_ckpts["qwen3moe_w2"].path), str(tmp_path / "moe")).byte_copy  # experts split
    assert not export_hf(str(fsdp_ckpts["hsdp"].path), str(tmp_path / "hsdp")).byte_copy


def test_corrupt_bytes_are_caught_on_the_byte_path(fsdp_ckpts, tmp_path):
    """One flipped byte inside rank 1's storage of a sharded weight: the CRC check names the file
    and the tensor, and nothing is committed."""
    import shutil

    src = tmp_path / "policy"
    shutil.copytree(fsdp_ckpts["w2"].path, src)
    reader = byte_copy_reader(FsdpReader(Store(str(src))))
    info = next(t for t in reader.tensors() if len(t.pieces) == 2)
    zf, local = reader._local(info, 1)
    loc = zf.stored_location(local)
    victim = src / info.pieces[1].file
    data = bytearray(victim.read_bytes())
    data[loc.file_offset + loc.nbytes // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"{victim.name}.*{info.name}|{info.name}.*{victim.name}"):
        export_hf(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class _EvilEval:
    def __reduce__(self):
        return (eval, ("__import__('os').system('touch pwned')",))


@pytest.mark.parametrize("evil", [_Evil(), _EvilEval(), {"model.embed_tokens.weight": _Evil()}])
def test_the_torch_free_unpickler_builds_nothing_it_does_not_know(tmp_path, monkeypatch, evil):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NeedsTorch):
        load_without_torch(pickle.dumps(evil, protocol=2), lambda *a: None)
    assert not (tmp_path / "pwned").exists()


def test_an_unsafe_rank_file_is_refused_as_before(fsdp_ckpts, tmp_path):
    """A rank file whose pickle names a global outside the allowlist: the byte path declines it
    and the torch path refuses it with its usual error (nothing run, nothing written)."""
    import shutil

    from ckptctl.formats.safe_load import UnsafeCheckpointError

    src = tmp_path / "policy"
    shutil.copytree(fsdp_ckpts["w2"].path, src)
    victim = src / "model_world_size_2_rank_0.pt"
    with zipfile.ZipFile(victim) as z:
        members = {i.filename: z.read(i) for i in z.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"model.embed_tokens.weight": _Evil()}, protocol=2)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, data in members.items():
            z.writestr(n, data)
    victim.write_bytes(buf.getvalue())
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        export_hf(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_a_tensors_parts_keep_only_their_own_bytes_alive():
    """A piece read from a read-ahead is a view into a buffer that may hold other tensors' bytes:
    kept as a view it would keep them all alive while the tensor waits to be written; a view
    of (nearly) its own buffer, what a local read returns, is kept without a copy."""
    shared = bytearray(range(256)) * 64  # a read-ahead buffer of 16 KiB holding several records
    part = fsdp_bytes._owned(memoryview(shared)[100:1100].toreadonly())
    assert isinstance(part, bytes) and part == bytes(shared[100:1100])
    record = bytes(range(256)) * 16 + b"\0" * 60  # a whole storage record and its padding
    view = memoryview(record)[:4096]
    assert fsdp_bytes._owned(view) is view
    whole = bytes(8)
    assert fsdp_bytes._owned(whole) is whole
