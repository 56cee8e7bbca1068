"""Local files are written in pieces of at most ``LOCAL_WRITE_PIECE`` bytes (see its comment in
``ckptctl.storage``): the writer itself, ``torch.save`` through it, and every file the export and
the reshards put on local disk."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
import torch

from ckptctl import storage
from ckptctl.storage import LOCAL_WRITE_PIECE, PiecewiseWriter, open_local_for_writing
from cli_runner import run


class RecordingFile(io.FileIO):
    """A real file that records the size of every write() that reaches it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []

    def write(self, data) -> int:
        self.sizes.append(len(memoryview(data).cast("B")))
        return super().write(data)


def test_large_writes_reach_the_file_in_pieces_and_the_bytes_are_kept(tmp_path):
    path = tmp_path / "f.bin"
    raw = RecordingFile(path, "wb")
    big = os.urandom(3 * LOCAL_WRITE_PIECE + 12345)
    floats = memoryview(torch.arange(300_000, dtype=torch.float32).numpy())  # a typed, 1-d view
    with PiecewiseWriter(raw) as f:
        assert f.write(b"header") == 6
        assert f.write(big) == len(big)
        assert f.write(floats) == floats.nbytes
        assert f.write(b"") == 0
        assert f.write(memoryview(torch.zeros(0, 3).numpy())) == 0  # an empty 2-d view
    assert path.read_bytes() == b"header" + big + floats.tobytes()
    assert max(raw.sizes) <= LOCAL_WRITE_PIECE
    assert len(raw.sizes) >= 4 + floats.nbytes // LOCAL_WRITE_PIECE  # split, not written whole


def test_torch_save_through_it_writes_the_same_file(tmp_path):
    obj = {"w": torch.randn(700, 1000), "step": 3, "b": torch.arange(10)}
    plain = io.BytesIO()  # a file object, as through the writer (torch names the archive "archive")
    torch.save(obj, plain)
    raw = RecordingFile(tmp_path / "pieces.pt", "wb")
    with PiecewiseWriter(raw) as f:
        torch.save(obj, f)
    assert (tmp_path / "pieces.pt").read_bytes() == plain.getvalue()
    assert max(raw.sizes) <= LOCAL_WRITE_PIECE < obj["w"].nbytes


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The paths ckptctl opens for writing through :func:`open_local_for_writing`."""
    paths: list[str] = []
    init = PiecewiseWriter.__init__

    def recording_init(self, raw, *args, **kwargs):
        paths.append(os.path.abspath(raw.name))
        init(self, raw, *args, **kwargs)

    monkeypatch.setattr(PiecewiseWriter, "__init__", recording_init)
    return paths


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _assert_all_written_in_pieces(out: Path, opened: list[str], left_out: str = "^$") -> None:
    """Every file of ``out`` but those matching ``left_out``."""
    files = [rel for rel in _files(out) if not re.search(left_out, rel)]
    assert files
    # each was written in the staging directory (a temp sibling), then renamed into place
    missing = [rel for rel in files if not any(p.endswith(os.sep + rel) for p in opened)]
    assert missing == []


def test_export_writes_every_local_file_in_pieces(fsdp_ckpts, tmp_path, opened):
    out = tmp_path / "out"
    code, stdout, stderr = run("export-hf", fsdp_ckpts["w2"].path, "--out", out)
    assert code == 0, (stdout, stderr)
    _assert_all_written_in_pieces(out, opened)


@pytest.mark.parametrize("case", ["fsdp", "megatron"])
def test_reshard_writes_every_local_file_in_pieces(case, fsdp_ckpts, megatron_ckpts, tmp_path, opened):
    if case == "fsdp":
        src, target = fsdp_ckpts["w3_tied"].path, ["--world-size", "2"]
        # torch.save by path, as FSDP checkpoints are saved (torch names the archive inside after the file)
        left_out = r"^(model|optim|extra_state)_world_size_2_rank_\d\.pt$|"
    else:
        src, target, left_out = megatron_ckpts["tp2pp2"].out_dir, ["--tp", "1", "--pp", "1"], ""
    left_out += r"(^|/)(ckptctl-output|fsdp_config)\.json$"  # small JSON records, written as text
    out = tmp_path / "out"
    code, stdout, stderr = run("convert-reshard", src, "--out", out, *target)
    assert code == 0, (stdout, stderr)
    _assert_all_written_in_pieces(out, opened, left_out)


def test_store_write_bytes_on_local_disk_goes_through_it(tmp_path, opened):
    store = storage.open_store(str(tmp_path))
    store.write_bytes("a/b.bin", b"x" * 10)
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"x" * 10
    assert opened == [str(tmp_path / "a" / "b.bin")]
