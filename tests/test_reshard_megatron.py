"""``convert-reshard`` for Megatron torch_dist checkpoints (ckptctl.ops.reshard_megatron).

The oracle is megatron-core itself (:mod:`realckpt.megatron_oracle`): for every resharded output,
``world`` rank processes (gloo, forked from one launcher that imported megatron once) build a real
mcore ``GPTModel`` at the TARGET TP x PP, take its ``sharded_state_dict()`` (model, plus the
optimizer state in the source's format keyed like the params), and

* load it with ``dist_checkpointing.load``: every local tensor must be bit-identical to the
  source's reference tensors (``<dir>.reference/checkpoint_tensors.safetensors``);
* compare the output's ``.metadata``: the chunks (offsets, sizes) and the rank whose file holds
  each must be exactly the main replicas of megatron's own sharded state dict at the target
  layout, i.e. what megatron's save at that layout would write.

Also: the torchrun mode (2 processes writing to S3), S3 -> GCS, a DP=2 target, output safety
(refusals, crash and SIGKILL mid-way leave nothing complete-looking, reruns succeed), ranged
reads, and the layout-bound optimizer formats (a synthetic dp_reshardable checkpoint:
mcore 0.16.1's DistributedOptimizer needs CUDA buffers, so no real one can be written here).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
# not imported here: megatron-core widens torch's safe globals process-wide; it runs in children
if importlib.util.find_spec("megatron.core") is None:  # pragma: no cover
    pytest.skip("megatron-core is not installed", allow_module_level=True)

from ckptctl.errors import UsageError  # noqa: E402
from ckptctl.formats.dcp_writer import DcpFileWriter, build_metadata, metadata_bytes  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.ops import reshard_megatron as rm  # noqa: E402
from ckptctl.ops.reshard_megatron import plan_reshard, reshard_megatron, split_kind, tp_blocks  # noqa: E402
from ckptctl.output_dir import INCOMPLETE_MARKER, OUTPUT_MARKER, TMP_INFIX  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402
from realckpt.megatron_oracle import oracle_job, run_oracle  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
REALCKPT = HERE / "realckpt"
INDEX_FILES = (".metadata", "common.pt", "metadata.json")

#: (name, source fixture, target tp, target pp, target dp, mode)
CASES = [
    ("tp2-to-tp1", "tp2", 1, 1, 1, "one-process"),
    ("tp2-to-tp4", "tp2", 4, 1, 1, "one-process"),
    ("tp1-to-tp2", "dp2_bf16", 2, 1, 1, "one-process"),  # TP1 x DP2 bf16 -> TP2
    ("tp1pp2-to-tp2", "tiepp2_fp32opt", 2, 1, 1, "one-process"),  # tied embeddings, non-distributed optimizer
    ("tp2pp2-to-tp1pp4", "tp2pp2", 1, 4, 1, "one-process"),
    ("perlayer-to-tp1pp2", "perlayer", 1, 2, 1, "one-process"),
    ("tp2-to-tp1dp2", "tp2", 1, 1, 2, "one-process"),  # DP replicas share the writes
    ("tp2-to-tp4-torchrun-s3", "tp2", 4, 1, 1, "torchrun-to-s3"),
    ("qwen2verl-s3-to-gs-tp1", "qwen2_verl", 1, 1, 1, "s3-to-gs"),
]


def output_layout(ckpt_dir: Path) -> list[list]:
    """[key, offsets, sizes, writer rank] of every tensor chunk in the output's .metadata."""
    reader = MegatronReader(open_store(str(ckpt_dir)), nesting="")
    return sorted([t.name, list(p.offsets), list(p.sizes), p.rank] for t in reader.tensors() for p in t.pieces)


def download(backend, url: str, dest: Path) -> None:
    files = backend.list_files(url)
    assert INCOMPLETE_MARKER not in files and {"metadata.json", "dist_ckpt/metadata.json"} & set(files)
    for rel in files:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(backend.get(backend.join(url, rel)))


# ------------------------------------------------------------------------------------------
# the resharded outputs and the oracle's verdicts (one launcher for every case)
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resharded(megatron_ckpts, tmp_path_factory, s3_server, gcs_server):
    from storage_servers import Backend

    work = tmp_path_factory.mktemp("reshard")
    outputs, summaries, seconds = {}, {}, {}
    for name, src_name, tp, pp, dp, mode in CASES:
        src = megatron_ckpts[src_name]
        dest = work / name
        t0 = time.monotonic()
        if mode == "one-process":
            summaries[name] = reshard_megatron(str(src.out_dir), str(dest), tp=tp, pp=pp, dp=dp).to_dict()
        elif mode == "torchrun-to-s3":  # 2 processes, each uploading its rank files; then downloaded
            s3 = Backend("s3", endpoint=s3_server)
            dst_url = s3.new_root()
            proc = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "ckptctl.ops.reshard_worker", str(src.out_dir), "--out", dst_url, "--tp", str(tp),
                 "--pp", str(pp), "--json"],
                cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=180,
                env=dict(os.environ, OMP_NUM_THREADS="1"))
            assert proc.returncode == 0, proc.stderr[-4000:]
            summaries[name] = json.loads(proc.stdout[proc.stdout.index("{"):])
            download(s3, dst_url, dest)
        else:  # S3 source -> GCS destination, checked after downloading the output
            s3, gs = Backend("s3", endpoint=s3_server), Backend("gs", endpoint=gcs_server)
            src_url, dst_url = s3.new_root(), gs.new_root()
            s3.upload_dir(str(src.out_dir), src_url)
            # endpoints from the environment (AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST): two backends
            summaries[name] = reshard_megatron(src_url, dst_url, tp=tp, pp=pp).to_dict()
            download(gs, dst_url, dest)
        seconds[name] = time.monotonic() - t0
        outputs[name] = dest / ("dist_ckpt" if src.params["verl_nesting"] else "")
    jobs = [oracle_job(megatron_ckpts[src_name], name, outputs[name], tp=tp, pp=pp, dp=dp)
            for name, src_name, tp, pp, dp, _ in CASES]
    t0 = time.monotonic()
    verdicts = run_oracle(jobs, work)
    print(f"\nreshard seconds: { {k: round(v, 2) for k, v in seconds.items()} }; "
          f"megatron oracle {time.monotonic() - t0:.1f}s")
    return {"outputs": outputs, "summaries": summaries, "verdicts": verdicts, "ckpts": megatron_ckpts}


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_megatron_loads_output_bit_identical(resharded, case):
    v = resharded["verdicts"][case]
    assert v["errors"] == [], v["errors"][0]
    assert v["compared"] > 0 and v["mismatch"] == []


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_output_is_what_megatron_saves_at_the_target_layout(resharded, case):
    """Chunks and writer ranks equal the main replicas of megatron's sharded state dict (with
    DP > 1: the writer's (TP rank, PP stage); the DP replicas of a stage share its writes)."""
    _, _, tp, pp, dp, _ = next(c for c in CASES if c[0] == case)
    v = resharded["verdicts"][case]
    assert v["errors"] == []

    def coords(rows):
        return sorted([k, o, s, r if dp == 1 else (r % tp, r // (tp * dp))] for k, o, s, r in rows)

    ours = output_layout(resharded["outputs"][case])
    assert coords(ours) == coords(v["layout"])
    if dp > 1:
        assert sorted({r for *_, r in ours}) == list(range(tp * pp * dp))


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_output_files_and_summary(resharded, case):
    name, src_name, tp, pp, dp, mode = next(c for c in CASES if c[0] == case)
    src = resharded["ckpts"][src_name]
    out = resharded["outputs"][case]
    s = resharded["summaries"][case]
    world = tp * pp * dp
    names = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != OUTPUT_MARKER)
    assert names == sorted([*INDEX_FILES, *(f"__{r}_0.distcp" for r in range(world))])
    assert (out / "metadata.json").read_bytes() == (src.ckpt_dir / "metadata.json").read_bytes()
    assert (out / "common.pt").read_bytes() == (src.ckpt_dir / "common.pt").read_bytes()
    comp = out.parent if src.params["verl_nesting"] else out
    marker = json.loads((comp / OUTPUT_MARKER).read_text())  # at the output's root (what --overwrite may replace)
    assert marker["kind"] == "convert-reshard" and "metadata.json" in str(marker["files"])
    assert sorted(p.name for p in (comp / "huggingface").iterdir()) == sorted(
        p.name for p in src.component.hf_dir.iterdir())
    assert s["target_layout"] == {"tp": tp, "pp": pp, "dp": dp, "world_size": world, "writer_ranks": world}
    assert s["source_layout"]["tp"] == src.params["tp"] and s["source_layout"]["pp"] == src.params["pp"]
    assert s["optimizer"] == "resharded"
    assert s["processes"] == (2 if mode.startswith("torchrun") else 1)
    json.dumps(s)  # the --json summary is plain data
    if src.params["rng_format"] == "sharded":
        assert sorted(s["dropped"]) == ["rng_state/shard_0.0_2.1", "rng_state/shard_1.0_2.1"]
    else:
        assert s["dropped"] == {}
    # ckptctl's own reader sees the same tensors as the source
    a = MegatronReader(open_store(str(src.ckpt_dir)), nesting="")
    b = MegatronReader(open_store(str(out)), nesting="")
    assert {k: (t.shape, t.dtype) for k, t in a.tensor_infos().items()} == {
        k: (t.shape, t.dtype) for k, t in b.tensor_infos().items()}
    assert b.summary()["parallel"]["tp"] == tp and b.summary()["problems"] == []


def test_torchrun_s3_output_equals_one_process_output(resharded):
    a = resharded["outputs"]["tp2-to-tp4"]
    b = resharded["outputs"]["tp2-to-tp4-torchrun-s3"]
    assert output_layout(a) == output_layout(b)
    ra, rb = MegatronReader(open_store(str(a)), nesting=""), MegatronReader(open_store(str(b)), nesting="")
    for key in ra.tensor_infos():
        assert torch.equal(ra.read_tensor(key), rb.read_tensor(key)), key


# ------------------------------------------------------------------------------------------
# the plan (no data)
# ------------------------------------------------------------------------------------------
def test_split_rules():
    assert split_kind("decoder.layers.self_attention.linear_qkv.weight") == "column"
    assert split_kind("decoder.layers.3.mlp.linear_fc1.weight") == "gated"
    assert split_kind("optimizer.state.exp_avg.decoder.layers.mlp.linear_fc2.weight") is None  # model keys only
    assert split_kind("decoder.layers.mlp.linear_fc2.weight") == "row"
    assert split_kind("decoder.layers.self_attention.q_layernorm.weight") == "replicated"
    assert split_kind("decoder.final_layernorm.weight") == "replicated"
    assert split_kind("decoder.layers.mlp.experts.linear_fc1.weight") is None
    assert tp_blocks("gated", (8, 4), 2) == [(0, (0, 0), (2, 4)), (1, (2, 0), (2, 4)), (0, (4, 0), (2, 4)),
                                             (1, (6, 0), (2, 4))]
    assert tp_blocks("row", (4, 6), 3) == [(0, (0, 0), (4, 2)), (1, (0, 2), (4, 2)), (2, (0, 4), (4, 2))]
    assert tp_blocks("replicated", (4,), 8) == [(0, (0,), (4,))]
    with pytest.raises(UsageError, match="equal parts"):
        tp_blocks("column", (6, 4), 4, key="x")


def test_plan_refusals(megatron_ckpts):
    reader = MegatronReader(open_store(str(megatron_ckpts["tp2"].out_dir)))
    with pytest.raises(UsageError, match="does not divide the 2 decoder layers"):
        plan_reshard(reader, tp=1, pp=4)
    with pytest.raises(UsageError, match="equal parts"):
        plan_reshard(reader, tp=3, pp=1)  # 2 query groups cannot go to 3 ranks
    with pytest.raises(UsageError, match="positive"):
        plan_reshard(reader, tp=0, pp=1)
    with pytest.raises(UsageError, match="does not divide the model's 4 attention heads"):
        plan_reshard(reader, tp=3, pp=1, hf_config={"num_attention_heads": 4, "num_key_value_heads": 2})
    with pytest.raises(UsageError, match="multiple of the model's 3 query groups"):
        plan_reshard(reader, tp=2, pp=1, hf_config={"num_attention_heads": 6, "num_key_value_heads": 3})
    plan = plan_reshard(reader, tp=1, pp=1, dp=2)  # DP replicas share the writes, balanced
    sizes = [plan.rank_bytes(r) for r in range(2)]
    assert min(sizes) > 0.9 * max(sizes)


def test_vocab_padding_warning():
    from ckptctl.formats.base import TensorInfo

    infos = {"embedding.word_embeddings.weight": TensorInfo("embedding.word_embeddings.weight", (1280, 8), "float32")}
    assert rm._check_hf_config({"vocab_size": 1100}, 2, 2, infos) == []
    (warning,) = rm._check_hf_config({"vocab_size": 1100}, 4, 2, infos)
    assert "keeps its 1280 rows" in warning and "1536 rows at TP=4" in warning


def test_reads_only_the_bytes_a_rank_needs(megatron_ckpts, tmp_path, monkeypatch):
    """TP 2 -> 4 with the size threshold lowered: each target rank reads about half of each
    dim-0 (column) source chunk it draws from, not the whole chunk."""
    monkeypatch.setattr(MegatronReader, "REGION_MIN_BYTES", 0)
    c = megatron_ckpts["tp2"]
    total = sum(p.stat().st_size for p in c.ckpt_dir.glob("*.distcp"))
    s = reshard_megatron(str(c.out_dir), str(tmp_path / "out"), tp=4, pp=1)
    monkeypatch.setattr(MegatronReader, "REGION_MIN_BYTES", 1 << 40)
    s2 = reshard_megatron(str(c.out_dir), str(tmp_path / "out2"), tp=4, pp=1)
    # whole chunks: the row-parallel (dim 1) and column (dim 0) source chunks are each read by
    # the two target ranks that split them; by span, column chunks are read half by each
    assert s2.bytes_read >= 1.9 * total
    assert s.bytes_read < 0.8 * s2.bytes_read  # (tiny chunks: the zip directory reads weigh in)
    assert output_layout(tmp_path / "out") == output_layout(tmp_path / "out2")


# ------------------------------------------------------------------------------------------
# output safety
# ------------------------------------------------------------------------------------------
def test_refuses_non_empty_destination_and_the_source(megatron_ckpts, tmp_path):
    c = megatron_ckpts["tp2"]
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty") as info:
        reshard_megatron(str(c.out_dir), str(dest), tp=1, pp=1)
    assert info.value.exit_code == 2 and sorted(os.listdir(dest)) == ["keep.txt"]
    for inside in (c.out_dir / "resharded", c.out_dir, c.out_dir.parent):
        with pytest.raises(UsageError, match="source"):
            reshard_megatron(str(c.out_dir), str(inside), tp=1, pp=1, overwrite=True)
    assert not (c.out_dir / "resharded").exists()
    with pytest.raises(UsageError, match="refusing to overwrite files that no convert-reshard output has"):
        reshard_megatron(str(c.out_dir), str(dest), tp=1, pp=1, overwrite=True)  # never deletes keep.txt
    assert sorted(os.listdir(dest)) == ["keep.txt"]
    os.remove(dest / "keep.txt")
    reshard_megatron(str(c.out_dir), str(dest), tp=1, pp=1)
    s = reshard_megatron(str(c.out_dir), str(dest), tp=2, pp=1, overwrite=True)  # its own earlier output
    assert s.replaced.startswith("an earlier convert-reshard output") and "__1_0.distcp" in os.listdir(dest)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_crash_mid_way_leaves_nothing_complete_then_rerun(megatron_ckpts, tmp_path, monkeypatch, make_backend, kind):
    c = megatron_ckpts["tp2pp2"]
    backend = make_backend(kind)
    dest = backend.new_root()
    real = rm.write_rank

    def crash_at_rank_2(reader, plan, rank, *a, **kw):
        if rank == 2:
            raise RuntimeError("simulated crash")
        return real(reader, plan, rank, *a, **kw)

    monkeypatch.setattr(rm, "write_rank", crash_at_rank_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        reshard_megatron(str(c.out_dir), dest, tp=1, pp=4, endpoint_url=backend.endpoint)
    assert backend.list_files(dest) == []  # aborted: even the published rank files are gone
    if kind == "local":
        assert not any(n.startswith(f".{os.path.basename(dest)}{TMP_INFIX}") for n in os.listdir(os.path.dirname(dest)))
    monkeypatch.setattr(rm, "write_rank", real)
    s = reshard_megatron(str(c.out_dir), dest, tp=1, pp=4, endpoint_url=backend.endpoint)
    assert "metadata.json" in backend.list_files(dest) and s.chunks > 0


KILLED = textwrap.dedent("""
    import os, signal, sys
    from ckptctl.ops import reshard_megatron as rm
    real = rm.write_rank
    def write_rank(reader, plan, rank, *a, **kw):
        if rank == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(reader, plan, rank, *a, **kw)
    rm.write_rank = write_rank
    rm.reshard_megatron(sys.argv[1], sys.argv[2], tp=1, pp=4, endpoint_url=sys.argv[3] or None)
""")


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_killed_process_leaves_nothing_complete_then_rerun(megatron_ckpts, make_backend, kind, tmp_path,
                                                          monkeypatch):
    c = megatron_ckpts["tp2pp2"]
    backend = make_backend(kind)
    dest = backend.new_root()
    scratch = tmp_path / "tmpdir"  # TMPDIR of both runs
    scratch.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED, str(c.out_dir), dest, ""], cwd=str(REPO_ROOT),
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, TMPDIR=str(scratch)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    left = backend.list_files(dest)
    if kind == "local":
        assert left == []  # the destination never saw a file; the dead run's temp sibling remains
        parent, base = os.path.split(dest)
        assert len([n for n in os.listdir(parent) if n.startswith(f".{base}{TMP_INFIX}")]) == 1
    else:
        assert "metadata.json" not in left and ".metadata" not in left and INCOMPLETE_MARKER in left
        assert "__0_0.distcp" in left  # rank files published before the kill
        assert len(os.listdir(scratch)) == 1  # the dead run's local staging
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    s = reshard_megatron(str(c.out_dir), dest, tp=1, pp=4)  # no --overwrite needed
    assert os.listdir(scratch) == []  # the rerun removed the dead run's staging, and its own
    assert s.replaced == (None if kind == "local" else "interrupted")
    files = backend.list_files(dest)
    assert INCOMPLETE_MARKER not in files and "metadata.json" in files
    assert sorted(f for f in files if f.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    if kind == "local":
        parent, base = os.path.split(dest)
        assert not [n for n in os.listdir(parent) if n.startswith(f".{base}{TMP_INFIX}")]


# ------------------------------------------------------------------------------------------
# layout-bound optimizer formats
# ------------------------------------------------------------------------------------------
DP_KEY = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.float32, torch.float32).bucket_idx_0.exp_avg"


@pytest.fixture(scope="module")
def dp_reshardable(megatron_ckpts, tmp_path_factory):
    """The tp2 checkpoint with its optimizer state replaced by dp_reshardable-style entries:
    a flat per-bucket buffer split over 2 DP ranks and a per-DP-group ShardedObject
    (key names of mcore 0.16.1's sharded_param_state_dp_reshardable), written with ckptctl's
    DCP writer. Synthetic: mcore's DistributedOptimizer cannot be built on CPU."""
    src = megatron_ckpts["tp2"]
    out = tmp_path_factory.mktemp("dpres") / "policy"
    shutil.copytree(src.out_dir, out)
    reader = MegatronReader(open_store(str(out)), nesting="")
    md = reader._load_metadata()
    tensors = {k: (t.dtype, t.shape) for k, t in reader.tensor_infos().items() if not k.startswith("optimizer.")}
    entries = [(k, p.offsets, p.sizes, p.file, p.byte_offset, p.byte_length)
               for k, t in reader.tensor_infos().items() if k in tensors for p in t.pieces]
    objects = [o.name for o in reader.objects()]
    entries += [(o.name, None, None, o.file, o.byte_offset, o.byte_length) for o in reader.objects()]
    assert md is not None
    buf = torch.arange(1000, dtype=torch.float32)
    objects.append("optimizer.distributed.dp_group_idx_0.param_groups/shard_0_1")
    for rank in (0, 1):
        w = DcpFileWriter(str(out / f"__{rank}_9.distcp"), f"__{rank}_9.distcp")
        w.add_tensor(DP_KEY, (rank * 500,), buf[rank * 500:(rank + 1) * 500])
        if rank == 0:
            import io
            b = io.BytesIO()
            torch.save([{"lr": 1e-3}], b)
            w.add_bytes(objects[-1], b.getvalue())
        w.close()
        entries += [e.as_tuple() for e in w.entries]
    tensors[DP_KEY] = ("float32", (1000,))
    (out / ".metadata").write_bytes(metadata_bytes(build_metadata(tensors, objects, entries)))
    common = torch.load(out / "common.pt", weights_only=False)
    common["optimizer"]["param_state_sharding_type"] = "dp_reshardable"
    torch.save(common, out / "common.pt")
    return out


def test_dp_reshardable_needs_drop_optimizer_for_tp_changes(dp_reshardable, tmp_path):
    reader = MegatronReader(open_store(str(dp_reshardable)))
    assert reader.summary()["optimizer"]["format"] == "dp_reshardable"
    with pytest.raises(UsageError, match="--drop-optimizer") as info:
        reshard_megatron(str(dp_reshardable), str(tmp_path / "a"), tp=1, pp=1)
    assert "dp_reshardable" in str(info.value) and not (tmp_path / "a").exists()

    s = reshard_megatron(str(dp_reshardable), str(tmp_path / "b"), tp=1, pp=1, drop_optimizer=True)
    assert s.optimizer == "dropped" and DP_KEY in s.dropped and any("dropped" in w for w in s.warnings)
    out = MegatronReader(open_store(str(tmp_path / "b")))
    assert not any(k.startswith("optimizer.") for k in out.tensor_infos())
    assert not any(o.key.startswith("optimizer.") for o in out.objects())
    ref = MegatronReader(open_store(str(dp_reshardable)))
    for k in out.tensor_infos():
        assert torch.equal(out.read_tensor(k), ref.read_tensor(k)), k


def test_dp_reshardable_dp_change_copies_the_optimizer(dp_reshardable, tmp_path):
    s = reshard_megatron(str(dp_reshardable), str(tmp_path / "c"), tp=2, pp=1, dp=2)
    assert s.optimizer == "copied" and s.target_layout["world_size"] == 4
    out = MegatronReader(open_store(str(tmp_path / "c")))
    assert torch.equal(out.read_tensor(DP_KEY), torch.arange(1000, dtype=torch.float32))
    assert out.read_object("optimizer.distributed.dp_group_idx_0.param_groups/shard_0_1") == [{"lr": 1e-3}]
    # each flat chunk stays with the TP rank (0, 1) of the source file that held it
    assert sorted({p.rank for p in out.tensor_infos()[DP_KEY].pieces}) == [0, 1]


def test_target_checks_need_the_hf_config(megatron_ckpts, tmp_path):
    """A corrupt config.json is an error and a missing one a warning naming what went unchecked;
    an impossible target is refused (exit 2) before anything is written."""
    from cli_runner import run, run_json

    src = tmp_path / "policy"
    shutil.copytree(megatron_ckpts["tp2"].out_dir, src)
    config = src / "huggingface" / "config.json"
    code, _, err = run("convert-reshard", src, "--out", tmp_path / "tp8", "--tp", "8")
    assert code == 2 and "--tp 8 does not divide the model's 4 attention heads" in err
    assert not (tmp_path / "tp8").exists()
    doc = run_json("convert-reshard", src, "--out", tmp_path / "tp4", "--tp", "4")
    assert any("replicated on 2 ranks" in w and "0.16" in w for w in doc["warnings"])

    config.write_text('{"num_attention_heads": 4,')
    code, _, err = run("convert-reshard", src, "--out", tmp_path / "bad", "--tp", "1")
    assert code == 1 and "config.json: corrupt file" in err and not (tmp_path / "bad").exists()

    config.unlink()
    doc = run_json("convert-reshard", src, "--out", tmp_path / "tp1", "--tp", "1")
    assert any("no huggingface/config.json: --tp 1 was not checked" in w for w in doc["warnings"])
