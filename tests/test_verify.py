"""``ckptctl verify`` on real checkpoints (torch FSDP2, megatron-core, save_pretrained), damaged in
copies: structural checks, ``--full`` CRC checks, and the SHA-256 manifest, locally and on S3."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from ckptctl.cli import app  # noqa: E402
from ckptctl.formats.base import Piece, TensorInfo  # noqa: E402
from ckptctl.ops import verify as verify_module  # noqa: E402
from ckptctl.formats.hf import parse_safetensors_header  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.formats.torchzip import TorchZipFile  # noqa: E402
from ckptctl.output_dir import HF_EXPORT, INCOMPLETE_MARKER, judge_destination  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402
from ckptctl.tree import MANIFEST_FILE, scan_tree  # noqa: E402
from realckpt.megatron_fixtures import HF_EXPORTS  # noqa: E402

runner = CliRunner()
FSDP_TENSOR = "model.embed_tokens.weight"
MEGATRON_TENSOR = "embedding.word_embeddings.weight"


def run(*args) -> tuple[int, str, str]:
    result = runner.invoke(app, ["verify", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def run_json(*args, expect: int = 0) -> dict:
    code, out, err = run(*args, "--json")
    assert code == expect, (code, out, err)
    return json.loads(out)


def problems_of(doc: dict) -> list[str]:
    return doc["problems"] + [p for t in doc["targets"] for p in t["problems"]]


def flip(path: Path, offset: int) -> None:
    """Invert 4 bytes of ``path`` at ``offset``."""
    raw = bytearray(path.read_bytes())
    raw[offset:offset + 4] = bytes(b ^ 0xFF for b in raw[offset:offset + 4])
    path.write_bytes(bytes(raw))


def middle(start: int, length: int) -> int:
    return start + (length // 2) // 4 * 4


@pytest.fixture
def fsdp_copy(fsdp_tree, tmp_path) -> Path:
    return Path(shutil.copytree(fsdp_tree, tmp_path / "tree"))


@pytest.fixture(params=["default", "small"])
def block(request, monkeypatch):
    """verify's read block: its default, or 4 KiB so that records and DCP chunks span many blocks
    (the streamed path big checkpoints take)."""
    if request.param == "small":
        monkeypatch.setattr(verify_module, "BLOCK", 4096)
    return request.param


def step_with(component: Path, fsdp_tree: Path, root: Path, *, export: bool = False) -> Path:
    """``root/global_step_1`` holding a copy of ``component`` as policy/ (a training step gets the
    FSDP tree's real trainer_state.pt and data.pt)."""
    step = root / "global_step_1"
    shutil.copytree(component, step / "policy")
    if not export:
        for name in ("trainer_state.pt", "data.pt"):
            shutil.copy(fsdp_tree / "global_step_4" / name, step / name)
    return step


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- sound checkpoints verify clean ------------------------------------------------------------------

@pytest.mark.parametrize("full", [False, True])
def test_sound_fsdp_tree(fsdp_copy, full, block):
    doc = run_json(fsdp_copy, *(["--full"] if full else []))
    assert doc["ok"] and doc["kind"] == "tree" and problems_of(doc) == []
    assert [Path(t["path"]).name for t in doc["targets"]] == ["global_step_2", "global_step_4"]
    assert all(t["backend"] == "fsdp" and t["files"] > 10 for t in doc["targets"])
    # --full reads every byte of every .pt (the bytes of the records, nearly the whole files)
    pt_bytes = sum(p.stat().st_size for p in fsdp_copy.rglob("*.pt"))
    assert (doc["bytes_read"] > 0.9 * pt_bytes) if full else doc["bytes_read"] == 0


@pytest.mark.parametrize("name", ["tp2pp2", "qwen2_verl", "dp2_bf16"])
def test_sound_megatron_step(megatron_ckpts, fsdp_tree, tmp_path, name, block):
    step = step_with(megatron_ckpts[name].out_dir, fsdp_tree, tmp_path)
    for flags in ([], ["--full"]):
        doc = run_json(step, *flags)
        assert doc["ok"] and doc["kind"] == "step" and doc["targets"][0]["backend"] == "megatron", problems_of(doc)


@pytest.mark.parametrize("name", sorted(HF_EXPORTS))
def test_sound_hf_export(hf_export, tmp_path, name):
    export = Path(shutil.copytree(hf_export[name].path, tmp_path / name))
    for flags in ([], ["--full"]):
        doc = run_json(export, *flags)
        assert doc["ok"] and doc["kind"] == "component" and doc["targets"][0]["backend"] == "hf"


# -- structural damage -----------------------------------------------------------------------------

def test_truncated_rank_file(fsdp_copy):
    rank_file = fsdp_copy / "global_step_4/policy/model_world_size_2_rank_1.pt"
    os.truncate(rank_file, 100)
    code, out, err = run(fsdp_copy)
    assert code == 1, (out, err)
    assert "policy/model_world_size_2_rank_1.pt: truncated (100 bytes; no zip end record)" in out
    doc = run_json(fsdp_copy, expect=1)
    step2, step4 = doc["targets"]
    assert step2["ok"] and not step4["ok"]
    assert step4["problems"] == ["policy/model_world_size_2_rank_1.pt: truncated (100 bytes; no zip end record)"]


def test_truncated_distcp(megatron_ckpts, fsdp_tree, tmp_path):
    step = step_with(megatron_ckpts["tp2pp2"].out_dir, fsdp_tree, tmp_path)
    distcp = step / "policy/__1_0.distcp"
    os.truncate(distcp, distcp.stat().st_size - 1024)
    doc = run_json(step, "--full", expect=1)
    (problem,) = problems_of(doc)
    assert problem.startswith("policy/__1_0.distcp: truncated (")


def test_rank_file_from_another_world_size_is_found(fsdp_ckpts, fsdp_tree, tmp_path):
    """A rank file swapped for one of another run (a W=3 rank 1 under a W=2 name) has a sound zip
    and sound metadata, but not the shard shapes the mesh promises."""
    step = step_with(fsdp_ckpts["w2"].path, fsdp_tree, tmp_path)
    shutil.copy(fsdp_ckpts["w3_tied"].path / "model_world_size_3_rank_1.pt",
                step / "policy/model_world_size_2_rank_1.pt")
    doc = run_json(step, expect=1)
    assert any(p.startswith("policy/model_world_size_2_rank_1.pt: ") and "its mesh says" in p
               for p in problems_of(doc)), problems_of(doc)


def test_pieces_must_tile_each_tensor_once():
    def info(*pieces):
        return TensorInfo("w", (4, 6), "float32", layout="dcp",
                          pieces=[Piece(f"__{i}_0.distcp", o, z) for i, (o, z) in enumerate(pieces)])

    assert verify_module._tiling_problem(info(((0, 0), (2, 6)), ((2, 0), (2, 6)))) is None
    assert verify_module._tiling_problem(info(((0, 0), (2, 6)))) == "chunks cover 12 of 24 elements"
    # the right element count, but row 1 twice and row 2 never
    assert verify_module._tiling_problem(info(((0, 0), (2, 6)), ((1, 0), (1, 6)), ((3, 0), (1, 6)))) \
        == "chunks at [0, 0] and [1, 0] overlap"
    assert "lies outside" in verify_module._tiling_problem(info(((0, 0), (2, 6)), ((3, 0), (2, 6))))


# -- bit flips: structure passes, --full names file and tensor ---------------------------------------

def test_flipped_bytes_in_fsdp_shard(fsdp_copy, block):
    policy = fsdp_copy / "global_step_4/policy"
    rel = "model_world_size_2_rank_1.pt"
    zf = TorchZipFile(open_store(str(policy)), rel)
    loc = zf.location(zf.metadata()[FSDP_TENSOR]._local_tensor)
    flip(policy / rel, middle(loc.file_offset, loc.nbytes))
    assert run_json(fsdp_copy)["ok"]  # sizes, metadata and pieces are all sound
    doc = run_json(fsdp_copy, "--full", expect=1)
    (problem,) = problems_of(doc)
    assert problem.startswith(f"policy/{rel}: {FSDP_TENSOR}: CRC mismatch in "), problem
    assert doc["targets"][0]["ok"] and not doc["targets"][1]["ok"]


def test_flipped_bytes_in_megatron_chunk(megatron_ckpts, fsdp_tree, tmp_path, block):
    step = step_with(megatron_ckpts["tp2"].out_dir, fsdp_tree, tmp_path)
    reader = MegatronReader(open_store(str(step / "policy")))
    piece = reader.tensor_infos()[MEGATRON_TENSOR].pieces[0]
    assert block == "default" or piece.byte_length > 4096 * 4  # the chunk spans blocks
    # the tensor data is the end of the chunk's torch.save blob, before its zip directory: the
    # middle of the chunk's second half lies inside the data for any tensor of some size
    assert piece.byte_length > 4096
    flip(step / "policy" / piece.file, middle(piece.byte_offset + piece.byte_length // 4, piece.byte_length // 4))
    assert run_json(step)["ok"]
    doc = run_json(step, "--full", expect=1)
    (problem,) = problems_of(doc)
    assert problem.startswith(f"policy/{piece.file}: chunk at bytes ") and MEGATRON_TENSOR in problem
    assert "CRC mismatch" in problem


# -- the manifest ------------------------------------------------------------------------------------

def test_manifest_catches_a_flip_in_safetensors(hf_export, tmp_path):
    export = Path(shutil.copytree(hf_export["sharded"].path, tmp_path / "export"))
    doc = run_json(export, "--write-manifest")
    assert doc["ok"] and doc["targets"][0]["manifest"] == "written"
    manifest = json.loads((export / MANIFEST_FILE).read_text())
    files = sorted(p.relative_to(export).as_posix() for p in export.rglob("*") if p.is_file()
                   and p.name != MANIFEST_FILE)
    assert manifest["version"] == 1 and manifest["algorithm"] == "sha256"
    assert sorted(manifest["files"]) == files
    for rel in files:
        assert manifest["files"][rel] == {"size": (export / rel).stat().st_size, "sha256": sha256(export / rel)}
    assert not [p for p in export.iterdir() if p.name.startswith(".")]  # no temp file left

    shard = "model-00002-of-00005.safetensors"
    header = parse_safetensors_header(open_store(str(export)), shard)
    flip(export / shard, middle(header.data_start, header.data_end - header.data_start))
    doc = run_json(export, expect=1)  # safetensors carry no checksum: only the manifest sees it
    assert doc["targets"][0]["manifest"] == "checked"
    assert problems_of(doc) == [f"{shard}: SHA-256 differs from {MANIFEST_FILE} (contents changed)"]
    (export / MANIFEST_FILE).unlink()
    assert run_json(export, "--full")["ok"]


def test_manifest_names_missing_and_extra_files(fsdp_copy):
    assert run_json(fsdp_copy, "--write-manifest")["ok"]
    step = fsdp_copy / "global_step_2"
    assert (step / MANIFEST_FILE).exists() and (fsdp_copy / "global_step_4" / MANIFEST_FILE).exists()
    # the manifest is not a checkpoint file: the tree reads exactly as before
    tree = scan_tree(open_store(str(fsdp_copy)))
    assert all(s.complete for s in tree.steps) and not any(s.notes for s in tree.steps)
    (step / "data.pt").unlink()
    (step / "policy/notes.txt").write_text("hello")
    with open(step / "critic/extra_state_world_size_2_rank_0.pt", "ab") as f:
        f.write(b"\0")
    doc = run_json(fsdp_copy, expect=1)
    assert doc["targets"][1]["ok"]
    problems = doc["targets"][0]["problems"]
    assert f"data.pt: missing (listed in {MANIFEST_FILE})" in problems
    assert f"policy/notes.txt: extra file (not in {MANIFEST_FILE})" in problems
    assert any(p.startswith("critic/extra_state_world_size_2_rank_0.pt: ") and MANIFEST_FILE in p for p in problems)


def test_manifest_not_written_over_damage(fsdp_copy):
    os.truncate(fsdp_copy / "global_step_4/trainer_state.pt", 200)
    doc = run_json(fsdp_copy, "--write-manifest", expect=1)
    step2, step4 = doc["targets"]
    assert step2["manifest"] == "written" and step4["manifest"] == "not written"
    assert not (fsdp_copy / "global_step_4" / MANIFEST_FILE).exists()


def test_manifest_round_trip_on_s3(fsdp_tree, make_backend):
    backend = make_backend("s3")
    url = backend.new_root()
    backend.upload_dir(str(fsdp_tree), url)
    assert run_json(url, "--write-manifest")["ok"]
    listed = backend.list_files(url)
    assert f"global_step_2/{MANIFEST_FILE}" in listed and f"global_step_4/{MANIFEST_FILE}" in listed
    manifest = json.loads(backend.get(backend.join(url, f"global_step_4/{MANIFEST_FILE}")))
    local = fsdp_tree / "global_step_4/data.pt"
    assert manifest["files"]["data.pt"] == {"size": local.stat().st_size, "sha256": sha256(local)}
    doc = run_json(url)
    assert doc["ok"] and [t["manifest"] for t in doc["targets"]] == ["checked", "checked"]

    # 4 bytes flipped inside tensor data: the structural checks cannot tell, the manifest can
    rel = "global_step_4/policy/model_world_size_2_rank_0.pt"
    zf = TorchZipFile(open_store(str(fsdp_tree)), rel)
    loc = zf.location(zf.metadata()[FSDP_TENSOR]._local_tensor)
    raw = bytearray(backend.get(backend.join(url, rel)))
    offset = middle(loc.file_offset, loc.nbytes)
    raw[offset:offset + 4] = bytes(b ^ 0xFF for b in raw[offset:offset + 4])
    backend.put(backend.join(url, rel), bytes(raw))
    doc = run_json(url, expect=1)
    assert f"policy/model_world_size_2_rank_0.pt: SHA-256 differs from {MANIFEST_FILE} (contents changed)" \
        in doc["targets"][1]["problems"]
    assert doc["targets"][1]["path"] == backend.join(url, "global_step_4")


def test_export_with_a_leftover_marker_is_sound_with_a_note(hf_export, make_backend):
    """A SIGKILL between config.json's upload and the marker's removal leaves a complete export
    beside the in-progress marker: sound (config.json is written last), and verify says why the
    marker is there."""
    backend = make_backend("s3")
    url = backend.new_root()
    backend.upload_dir(str(hf_export["sharded"].path), url)
    assert run_json(url)["targets"][0]["notes"] == []
    backend.put(backend.join(url, INCOMPLETE_MARKER), b'{"tool": "ckptctl", "pid": 1}')
    doc = run_json(url)
    assert doc["ok"] and doc["targets"][0]["backend"] == "hf"
    assert [n for n in doc["targets"][0]["notes"] if n.startswith(f"{INCOMPLETE_MARKER} is left over")]
    code, out, _ = run(url)
    assert code == 0 and f"{INCOMPLETE_MARKER} is left over" in " ".join(out.split())
    open_store(url).delete_many(["config.json"])  # killed before config.json: incomplete, no such note
    doc = run_json(url, expect=1)
    assert not [n for t in doc["targets"] for n in t["notes"] if "is left over" in n]


def test_overwrite_judge_tolerates_the_manifest(hf_export, tmp_path):
    export = Path(shutil.copytree(hf_export["single"].path, tmp_path / "export"))
    assert run_json(export, "--write-manifest")["ok"]
    store = open_store(str(export))
    paths = [f.path for f in store.walk()]
    assert MANIFEST_FILE in paths
    assert judge_destination(store, paths, kind=HF_EXPORT, overwrite=True).startswith("an HF model directory")


# -- output --------------------------------------------------------------------------------------------

def test_json_shape_and_human_output(fsdp_copy):
    doc = run_json(fsdp_copy / "global_step_4" / "policy", "--full")
    assert set(doc) == {"path", "kind", "ok", "full", "write_manifest", "problems", "targets", "bytes_read", "seconds"}
    (target,) = doc["targets"]
    assert set(target) == {"path", "kind", "backend", "files", "bytes", "checks", "manifest", "problems", "notes", "ok"}
    assert target["checks"] == ["structure", "crc"] and target["manifest"] == "absent"
    assert doc["path"] == str(fsdp_copy / "global_step_4" / "policy")
    code, out, err = run(fsdp_copy / "global_step_4")
    assert code == 0 and err == "" and "all 1 checked sound" in out


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    code, out, err = run(tmp_path)
    assert code == 5 and err.startswith("ckptctl: error: ") and "Traceback" not in err


# -- ManifestCheck: what export-hf / convert-reshard can run beside their work ---------------------

def test_manifest_check_of_a_component(fsdp_copy):
    from ckptctl.formats.safe_load import CorruptCheckpointError
    from ckptctl.formats.manifest import ManifestCheck

    store = open_store(str(fsdp_copy))
    policy = scan_tree(store).step(4).components["policy"]
    assert ManifestCheck.start(store, policy) is None  # no manifest yet: nothing to check
    assert run_json(fsdp_copy / "global_step_4", "--write-manifest")["ok"]
    ManifestCheck.start(store, policy).result()  # sound

    zf = TorchZipFile(open_store(str(fsdp_copy / "global_step_4/policy")), "model_world_size_2_rank_0.pt")
    loc = zf.location(zf.metadata()[FSDP_TENSOR]._local_tensor)
    flip(fsdp_copy / "global_step_4/policy/model_world_size_2_rank_0.pt", middle(loc.file_offset, loc.nbytes))
    (fsdp_copy / "global_step_4/policy/extra_state_world_size_2_rank_1.pt").unlink()
    (fsdp_copy / "global_step_4/critic/extra_state_world_size_2_rank_1.pt").unlink()  # not policy's
    check = ManifestCheck.start(store, policy)
    with pytest.raises(CorruptCheckpointError) as err:
        check.result()
    message = str(err.value)
    assert "extra_state_world_size_2_rank_1.pt: missing" in message
    assert "model_world_size_2_rank_0.pt: SHA-256 differs" in message
    assert "critic" not in message and message.count(";") == 1
