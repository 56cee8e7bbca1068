"""Corrupted tensor bytes are never passed on: every read of tensor data is CRC-checked.

On copies of the real FSDP2 / megatron-core fixtures, 4 bytes in the middle of one tensor's
data (never a header) are overwritten; every command that reads those bytes must exit 1 with
one line naming the file and the tensor, and leave nothing at the destination that looks
complete (no destination, no temp sibling; on S3 no object at all). Putting the bytes back,
the same command succeeds: the failed run left nothing in the way.

torch.load itself does not check zip CRCs (its miniz is built without the check): the
megatron case below is the one that used to export a wrong value and report "verified".
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError  # noqa: E402
from ckptctl.formats.torchzip import RecordCrc, TorchZipFile, check_archive, crc32_combine  # noqa: E402
from ckptctl.output_dir import TMP_INFIX  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402

runner = CliRunner()
FSDP_TENSOR = "model.embed_tokens.weight"
MEGATRON_TENSOR = "embedding.word_embeddings.weight"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------------------------------
# damaging a copy
# ------------------------------------------------------------------------------------------
class Damage:
    """4 bytes of ``file`` at ``offset`` (inside one tensor's data) inverted; ``undo()`` puts
    them back."""

    def __init__(self, file: Path, offset: int, tensor: str):
        self.file, self.offset, self.tensor = file, offset, tensor
        raw = bytearray(file.read_bytes())
        self.original = bytes(raw[offset:offset + 4])
        raw[offset:offset + 4] = bytes(b ^ 0xFF for b in self.original)
        file.write_bytes(bytes(raw))

    def undo(self) -> None:
        raw = bytearray(self.file.read_bytes())
        raw[self.offset:self.offset + 4] = self.original
        self.file.write_bytes(bytes(raw))


def _middle(start: int, length: int) -> int:
    return start + (length // 2) // 4 * 4


def damage_fsdp(comp: Path, tensor: str = FSDP_TENSOR, kind: str = "model", rank: int = 1) -> Damage:
    """Damage the middle of ``tensor``'s shard in rank ``rank``'s ``kind`` file."""
    rel = next(p.name for p in comp.glob(f"{kind}_world_size_*_rank_{rank}.pt"))
    zf = TorchZipFile(open_store(str(comp)), rel)
    local = zf.metadata()[tensor]._local_tensor
    loc = zf.location(local)
    assert loc.nbytes >= 64  # a real shard, not an empty one
    return Damage(comp / rel, _middle(loc.file_offset, loc.nbytes), tensor)


def damage_fsdp_optimizer_step(comp: Path) -> Damage:
    """Damage the optimizer's first ``step`` (a 4-byte float32 scalar: all of its data)."""
    rel = next(p.name for p in comp.glob("optim_world_size_*_rank_0.pt"))
    zf = TorchZipFile(open_store(str(comp)), rel)
    state = zf.metadata()["state"]
    index = next(i for i, st in state.items() if "step" in st)
    loc = zf.location(state[index]["step"])
    assert loc.nbytes == 4
    return Damage(comp / rel, loc.file_offset, f"optimizer state {index}.step")


def chunk_data_span(blob: bytes) -> tuple[int, int]:
    """(start, length) of the tensor data (the ``data/0`` record) inside a DCP chunk's torch.save blob."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def damage_megatron(comp: Path, tensor: str = MEGATRON_TENSOR, chunk: int = 0, where: float = 0.5) -> Damage:
    """Damage the tensor data of one chunk of ``tensor`` in its ``.distcp`` (at ``where`` of it)."""
    reader = MegatronReader(open_store(str(comp)))
    piece = reader.tensor_infos()[tensor].pieces[chunk]
    path = comp / piece.file
    with open(path, "rb") as f:
        f.seek(piece.byte_offset)
        blob = f.read(piece.byte_length)
    start, length = chunk_data_span(blob)
    offset = piece.byte_offset + start + int(length * where) // 4 * 4
    return Damage(path, offset, tensor)


# ------------------------------------------------------------------------------------------
# running the CLI
# ------------------------------------------------------------------------------------------
def cli(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_corrupt_error(code: int, stderr: str, damage: Damage, file_url: str | None = None) -> None:
    """Exit 1 and one line naming the damaged file (as the user gave the path) and the tensor."""
    assert code == 1, (code, stderr)
    assert stderr.startswith("ckptctl: error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert (file_url or str(damage.file)) in stderr, stderr
    assert damage.tensor in stderr and "CRC mismatch" in stderr, stderr


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_INFIX}"))


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert leftovers(out) == []


@pytest.fixture
def fsdp_copy(fsdp_ckpts, tmp_path) -> Path:
    return Path(shutil.copytree(fsdp_ckpts["w2"].path, tmp_path / "src" / "global_step_2" / "policy"))


@pytest.fixture
def megatron_copy(megatron_ckpts, tmp_path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(megatron_ckpts[name].out_dir, tmp_path / "src" / name / "policy"))
    return copy


# ------------------------------------------------------------------------------------------
# FSDP
# ------------------------------------------------------------------------------------------
def test_fsdp_export_hf_refuses_corrupt_shard(fsdp_copy, tmp_path):
    damage = damage_fsdp(fsdp_copy)
    out = tmp_path / "hf"
    code, _, stderr = cli("export-hf", fsdp_copy, "--out", out, "--json")
    assert_corrupt_error(code, stderr, damage)
    assert_nothing_written(out)
    damage.undo()
    code, stdout, stderr = cli("export-hf", fsdp_copy, "--out", out, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["verified"] and (out / "config.json").is_file()


@pytest.mark.parametrize("world_size", [2, 1, 4])
def test_fsdp_reshard_refuses_corrupt_shard(fsdp_copy, tmp_path, world_size):
    """Same W (each shard read whole), fewer ranks, more ranks (each shard read in row ranges
    by two target ranks: the CRC adds up across them)."""
    damage = damage_fsdp(fsdp_copy)
    out = tmp_path / "resharded"
    code, _, stderr = cli("convert-reshard", fsdp_copy, "--out", out, "--world-size", world_size, "--json")
    assert_corrupt_error(code, stderr, damage)
    assert_nothing_written(out)
    damage.undo()
    code, _, stderr = cli("convert-reshard", fsdp_copy, "--out", out, "--world-size", world_size, "--json")
    assert code == 0, stderr
    assert (out / f"model_world_size_{world_size}_rank_0.pt").is_file()


def test_fsdp_reshard_refuses_corrupt_optimizer_state(fsdp_copy, tmp_path):
    """An Adam moment (optimizer file), not only weights."""
    zf = TorchZipFile(open_store(str(fsdp_copy)), next(p.name for p in fsdp_copy.glob("optim_*_rank_1.pt")))
    state = zf.metadata()["state"]
    index = next(i for i, st in state.items() if st["exp_avg"]._local_tensor.numel() >= 64)
    loc = zf.location(state[index]["exp_avg"]._local_tensor)
    damage = Damage(fsdp_copy / zf.rel, _middle(loc.file_offset, loc.nbytes), "optimizer.state.")
    out = tmp_path / "resharded"
    code, _, stderr = cli("convert-reshard", fsdp_copy, "--out", out, "--world-size", 3, "--json")
    assert_corrupt_error(code, stderr, damage)
    assert ".exp_avg: CRC mismatch" in stderr, stderr
    assert_nothing_written(out)


def test_fsdp_inspect_reading_the_optimizer_step(fsdp_copy):
    """inspect reads one tensor's data (the optimizer step, for the summary): checked too."""
    damage = damage_fsdp_optimizer_step(fsdp_copy)
    code, _, stderr = cli("inspect", fsdp_copy)
    assert_corrupt_error(code, stderr, damage)
    damage.undo()
    code, stdout, stderr = cli("inspect", fsdp_copy, "--json")
    assert code == 0, stderr


def test_fsdp_s3_to_s3_reshard(fsdp_copy, make_backend, tmp_path):
    s3 = make_backend("s3")
    damage = damage_fsdp(fsdp_copy)
    src = s3.new_root() + "/global_step_2/policy"
    s3.upload_dir(str(fsdp_copy), src)
    out = s3.new_root()
    code, _, stderr = cli("convert-reshard", src, "--out", out, "--world-size", 1, "--json")
    assert_corrupt_error(code, stderr, damage, file_url=f"{src}/{damage.file.name}")
    assert s3.list_files(out) == []  # aborted: every object this run uploaded is gone
    code, _, stderr = cli("export-hf", src, "--out", tmp_path / "hf", "--json")
    assert_corrupt_error(code, stderr, damage, file_url=f"{src}/{damage.file.name}")
    assert_nothing_written(tmp_path / "hf")


# ------------------------------------------------------------------------------------------
# Megatron
# ------------------------------------------------------------------------------------------
def test_megatron_export_hf_refuses_corrupt_chunk(megatron_copy, tmp_path):
    """The reported case: the export used to succeed, "verified", with a wrong value."""
    comp = megatron_copy("tp2")
    damage = damage_megatron(comp)
    out = tmp_path / "hf"
    code, _, stderr = cli("export-hf", comp, "--out", out, "--json")
    assert_corrupt_error(code, stderr, damage)
    assert_nothing_written(out)
    damage.undo()
    code, stdout, stderr = cli("export-hf", comp, "--out", out, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["verified"]


@pytest.mark.parametrize("layout", [("1", "1", "1"), ("2", "1", "2")], ids=["tp2-to-tp1", "verbatim-dp2"])
def test_megatron_reshard_refuses_corrupt_chunk(megatron_copy, tmp_path, layout):
    """A TP change (chunks decoded and merged) and a DP change (every chunk copied verbatim)."""
    tp, pp, dp = layout
    comp = megatron_copy("tp2")
    damage = damage_megatron(comp)
    out = tmp_path / "resharded"
    args = ("convert-reshard", comp, "--out", out, "--tp", tp, "--pp", pp, "--dp", dp, "--json")
    code, _, stderr = cli(*args)
    assert_corrupt_error(code, stderr, damage)
    assert_nothing_written(out)
    damage.undo()
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert (out / "metadata.json").is_file() and (out / ".metadata").is_file()
    if layout[0] == "2":  # the path this case is about
        assert doc["chunks_copied_verbatim"] == doc["chunks"] > 0


@pytest.mark.parametrize("where", [0.2, 0.8])
def test_megatron_reshard_chunks_read_in_parts(megatron_copy, tmp_path, monkeypatch, where):
    """TP1 -> TP2 with every chunk read by the byte span each target rank needs (read_region's
    partial reads, forced on for these small chunks): the halves read by the two target ranks
    add up to the chunk's CRC, wherever the damage is."""
    monkeypatch.setattr(MegatronReader, "REGION_MIN_BYTES", 0)
    comp = megatron_copy("dp2_bf16")
    damage = damage_megatron(comp, where=where)
    out = tmp_path / "resharded"
    calls = []
    real = TorchZipFile.read_storage_bytes

    def counting(self, *a, **k):
        calls.append(a)
        return real(self, *a, **k)

    monkeypatch.setattr(TorchZipFile, "read_storage_bytes", counting)
    args = ("convert-reshard", comp, "--out", out, "--tp", "2", "--pp", "1", "--json")
    code, _, stderr = cli(*args)
    assert calls  # the partial-read path ran
    assert_corrupt_error(code, stderr, damage)
    assert_nothing_written(out)
    damage.undo()
    code, _, stderr = cli(*args)
    assert code == 0, stderr


def test_megatron_partial_read_is_finished_before_trusting(megatron_ckpts, tmp_path, monkeypatch):
    """A chunk read only in part: the damage lies in bytes no read covered; finish_crc_checks
    reads those (only those) and fails, never skipping the record."""
    monkeypatch.setattr(MegatronReader, "REGION_MIN_BYTES", 0)
    comp = Path(shutil.copytree(megatron_ckpts["dp2_bf16"].out_dir, tmp_path / "policy"))
    damage = damage_megatron(comp, where=0.9)
    reader = MegatronReader(open_store(str(comp)))
    info = reader.tensor_infos()[MEGATRON_TENSOR]
    rows = info.pieces[0].sizes[0]
    part = reader.read_region(MEGATRON_TENSOR, (0, 0), (rows // 4, info.shape[1]))  # the first quarter
    assert part.shape == (rows // 4, info.shape[1])
    with pytest.raises(CorruptCheckpointError, match="CRC mismatch") as err:
        reader.finish_crc_checks()
    assert str(comp / info.pieces[0].file) in str(err.value) and MEGATRON_TENSOR in str(err.value)
    damage.undo()
    reader = MegatronReader(open_store(str(comp)))
    reader.read_region(MEGATRON_TENSOR, (0, 0), (rows // 4, info.shape[1]))
    reader.finish_crc_checks()  # good bytes: passes


# ------------------------------------------------------------------------------------------
# the mechanism
# ------------------------------------------------------------------------------------------
def test_crc32_combine_matches_zlib():
    import random

    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randbytes(rng.randint(0, 5000)), rng.randbytes(rng.randint(0, 5000))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_record_crc_counts_every_byte_once_in_any_order():
    import random

    rng = random.Random(1)
    data = rng.randbytes(50_000)
    bad = bytearray(data)
    bad[31_337] ^= 0x01
    for trial in range(50):
        for source, ok in ((data, True), (bytes(bad), False)):
            rest = []
            check = RecordCrc("f", "archive/data/0", len(data), zlib.crc32(data),
                              read_rest=lambda s, e, src=source: rest.append((s, e)) or src[s:e])
            reads = sorted((rng.randint(0, len(data)), rng.randint(0, len(data))) for _ in range(rng.randint(0, 5)))
            try:
                for s, e in reads:
                    s, e = min(s, e), max(s, e)
                    check.add(s, source[s:e])
                check.complete()
                assert ok
            except CorruptCheckpointError as exc:
                assert not ok and "CRC mismatch" in str(exc)
            covered = sorted((min(s, e), max(s, e)) for s, e in reads)
            for s, e in rest:  # read_rest only asked for bytes no read covered
                assert not any(a < e and s < b for a, b in covered)


def test_check_archive_on_a_torch_save_blob():
    buf = io.BytesIO()
    torch.save(torch.arange(1000, dtype=torch.float32), buf)
    blob = buf.getvalue()
    check_archive(blob, "blob")  # intact
    start, length = chunk_data_span(blob)
    bad = bytearray(blob)
    bad[start + length // 2] ^= 0xFF
    with pytest.raises(CorruptCheckpointError, match=r"cannot read blob: t: CRC mismatch in .*data/0"):
        check_archive(bytes(bad), "blob", tensor="t")
    check_archive(b"raw tensor bytes, no zip", "raw")  # nothing to check


def test_torchzip_partial_reads_are_finished_before_trusting(tmp_path):
    """Row ranges of one record read with partial=True: the damage lies in rows no read covered;
    finish_crc_checks reads exactly those bytes (one ranged read) and fails."""
    from ckptctl.storage import Store

    class CountingStore(Store):
        def __init__(self, url: str):
            super().__init__(url)
            self.reads: list[tuple[int, int]] = []

        def read_range(self, rel, start, end):
            self.reads.append((start, end))
            return super().read_range(rel, start, end)

    path = tmp_path / "model.pt"
    torch.save({"w": torch.randn(64, 32)}, path)
    zf = TorchZipFile(Store(str(tmp_path)), path.name)
    loc = zf.location(zf.metadata()["w"])
    damage = Damage(path, loc.file_offset + 60 * 32 * 4, "w")  # row 60
    store = CountingStore(str(tmp_path))
    zf = TorchZipFile(store, path.name)
    meta = zf.metadata()["w"]
    out = torch.empty(64, 32)
    zf.materialize_into(meta[:20], out[:20], name="w", partial=True)
    zf.materialize_into(meta[10:40], out[10:40], name="w", partial=True)  # overlaps: each byte counted once
    store.reads.clear()
    with pytest.raises(CorruptCheckpointError, match=r"model\.pt: w: CRC mismatch"):
        zf.finish_crc_checks()
    assert store.reads == [(loc.file_offset + 40 * 32 * 4, loc.file_offset + 64 * 32 * 4)]
    damage.undo()
    zf = TorchZipFile(Store(str(tmp_path)), path.name)
    meta = zf.metadata()["w"]
    zf.materialize_into(meta[:40], out[:40], name="w", partial=True)
    zf.finish_crc_checks()  # good bytes: passes
