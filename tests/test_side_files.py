"""``convert-reshard`` checks the side files it copies unchanged (``common.pt``,
``trainer_state.pt``, ``data.pt``, ``huggingface/config.json``, ``fsdp_config.json``,
``metadata.json``): on copies of REAL checkpoints (``fsdp_tree``, ``fsdp_ckpts``,
``megatron_ckpts``), each damaged the way the reports describe (truncated, bytes flipped inside
a zip record, invalid JSON), is refused with a one-line error naming the file and nothing is
committed (no destination, no temp sibling); the undamaged source reshards.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.formats.safe_load import CorruptCheckpointError  # noqa: E402
from ckptctl.formats.side_files import check_side_file, is_checked  # noqa: E402
from ckptctl.output_dir import TMP_INFIX  # noqa: E402

runner = CliRunner()


def flip_inside_record(path: Path, member_suffix: str) -> None:
    """Flip one byte in the middle of the stored zip record ``*member_suffix`` (its CRC-32 no
    longer matches; the archive structure stays intact)."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, size: int = 100) -> None:
    path.write_bytes(path.read_bytes()[:size])


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_INFIX}"))


def reshard(src: Path, out: Path, *layout: str) -> tuple[int, str]:
    result = runner.invoke(app, ["convert-reshard", str(src), "--out", str(out), *layout])
    return result.exit_code, result.stderr


def assert_refused(src: Path, out: Path, layout: tuple[str, ...], damaged: Path, what: str) -> None:
    code, err = reshard(src, out, *layout)
    assert code == 1, (code, err)
    assert err.startswith("ckptctl: error: ") and err.count("\n") == 1, err  # one line
    assert str(damaged) in err and what in err, err  # names the file
    assert not out.exists() and leftovers(out) == []  # nothing committed, nothing left


FSDP_DAMAGE = {
    # step file -> (damage, words in the error)
    "trainer_state.pt": (lambda p: flip_inside_record(p, "data.pkl"), "CRC"),
    "data.pt": (truncate, "cannot read"),
    "policy/huggingface/config.json": (lambda p: p.write_text('{"architectures": ["LlamaForCausalLM"], '),
                                       "not valid JSON"),
    "critic/fsdp_config.json": (lambda p: p.write_text("{world_size: 2"), "not valid JSON"),
}


@pytest.mark.parametrize("rel", list(FSDP_DAMAGE))
def test_fsdp_step_with_a_damaged_side_file_refused(rel, fsdp_tree, tmp_path):
    step = tmp_path / "global_step_2"
    shutil.copytree(fsdp_tree / "global_step_2", step)
    damage, what = FSDP_DAMAGE[rel]
    damage(step / rel)
    assert_refused(step, tmp_path / "out", ("--world-size", "3"), step / rel, what)


def test_fsdp_undamaged_step_reshards(fsdp_tree, tmp_path):
    code, err = reshard(fsdp_tree / "global_step_2", tmp_path / "out", "--world-size", "3")
    assert code == 0, err
    for rel in ("trainer_state.pt", "data.pt", "policy/huggingface/config.json"):
        assert (tmp_path / "out" / rel).read_bytes() == (fsdp_tree / "global_step_2" / rel).read_bytes()


MEGATRON_DAMAGE = {
    "common.pt": (lambda p: flip_inside_record(p, "data.pkl"), "CRC"),
    "metadata.json": (lambda p: p.write_text('{"sharded_backend": "torch_dist"'), "not valid JSON"),
    "huggingface/config.json": (truncate, "not valid JSON"),
}


@pytest.mark.parametrize("rel", list(MEGATRON_DAMAGE))
def test_megatron_with_a_damaged_side_file_refused(rel, megatron_ckpts, tmp_path):
    comp = tmp_path / "policy"
    shutil.copytree(megatron_ckpts["tp2"].out_dir, comp)
    damage, what = MEGATRON_DAMAGE[rel]
    damage(comp / rel)
    if rel == "metadata.json":  # the reader parses it first: refused before anything is written
        what = "metadata.json"
    assert_refused(comp, tmp_path / "out", ("--tp", "1", "--pp", "1"), comp / rel, what)


def test_megatron_truncated_common_pt_refused(megatron_ckpts, tmp_path):
    comp = tmp_path / "policy"
    shutil.copytree(megatron_ckpts["tp2"].out_dir, comp)
    truncate(comp / "common.pt", 2000)
    assert_refused(comp, tmp_path / "out", ("--tp", "1", "--pp", "1"), comp / "common.pt", "cannot read")


# ------------------------------------------------------------------------------------------
# the check itself, on real files
# ------------------------------------------------------------------------------------------
def test_check_side_file_on_real_files(fsdp_tree, tmp_path):
    state = (fsdp_tree / "global_step_2" / "trainer_state.pt").read_bytes()
    check_side_file(state, "trainer_state.pt")  # intact: passes (OmegaConf config kept as data)
    for bad in (state[:-30], state[:100], b"", b"garbage" * 10):
        with pytest.raises(CorruptCheckpointError, match="trainer_state.pt"):
            check_side_file(bad, "trainer_state.pt")
    check_side_file(b'{"a": 1}', "x/config.json")
    with pytest.raises(CorruptCheckpointError, match="x/config.json: not valid JSON"):
        check_side_file(b'{"a": 1', "x/config.json")
    check_side_file(b"anything", "tokenizer.model")  # no structure to check
    assert is_checked("common.pt") and is_checked("a/b.json") and not is_checked("merges.txt")


def test_pickle_with_code_refused(tmp_path):
    """A side file whose pickle would run code is refused through the safe loader, never loaded."""
    import pickle

    import torch

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "trainer_state.pt"
    torch.save({"global_step": 2}, path)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = pickle.dumps({"global_step": 2, "x": Evil()}, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    with pytest.raises(Exception, match="builtins.print"):
        check_side_file(path.read_bytes(), "trainer_state.pt")


# ------------------------------------------------------------------------------------------
# convert-reshard's other input check: --device-type
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device_type", ["gpu", "cuda:0", "CUDA", "", "meta"])
def test_unknown_device_type_refused(device_type, fsdp_ckpts, tmp_path):
    out = tmp_path / "out"
    code, err = reshard(fsdp_ckpts["w2"].path, out, "--world-size", "2", "--device-type", device_type)
    assert code == 2 and err.count("\n") == 1, err
    assert "--device-type must be a DeviceMesh device type (cuda, cpu, xpu, hpu, npu, mtia)" in err
    assert not out.exists() and leftovers(out) == []


def test_known_device_type_written_into_the_meshes(fsdp_ckpts, tmp_path):
    import torch

    out = tmp_path / "out"
    code, err = reshard(fsdp_ckpts["w2"].path, out, "--world-size", "2", "--device-type", "xpu")
    assert code == 0, err
    sd = torch.load(out / "model_world_size_2_rank_0.pt", weights_only=True)
    assert {t.device_mesh.device_type for t in sd.values() if hasattr(t, "device_mesh")} == {"xpu"}
