"""megatron-core ``dp_reshardable`` optimizer buffers mapped back to named parameters (issue #10).

Sources: the REAL DistributedOptimizer fixtures of :mod:`realckpt.distopt_writer` (megatron-core
0.16.1, Adam, 2 training steps; dense TP1/TP2/PP2 x DP2, MoE TP2xEP2 and PP2xEP2 with a chained
optimizer). Each layout was trained twice from the same seed, once saved as ``dp_reshardable`` and
once as ``fully_reshardable``: the twin's per-parameter ``optimizer.state.*`` tensors (written by
megatron-core's own gather) are the truth the mapping of :mod:`ckptctl.formats.distopt` must give,
bit for bit. ``convert-reshard`` of a dp_reshardable source to a new TP/PP/EP must give exactly
what resharding the fully_reshardable twin gives (tensors, chunking, common.pt). Damaged layout
facts (bucket sizes, missing objects, weights that do not match the fp32 params) are refused with
one line naming ``--drop-optimizer``, nothing written.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
# not imported here: megatron-core widens torch's safe globals process-wide; it runs in children
if importlib.util.find_spec("megatron.core") is None:  # pragma: no cover
    pytest.skip("megatron-core is needed to write the fixtures", allow_module_level=True)

from cli_runner import run, run_json  # noqa: E402
from realckpt.distopt_writer import LAYOUTS  # noqa: E402

from ckptctl.errors import OptimizerLayoutError  # noqa: E402
from ckptctl.formats.distopt import DistOptReader, build_layout  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402

NAMES = list(LAYOUTS)


@pytest.fixture(scope="module")
def distopt(distopt_ckpts):
    return distopt_ckpts


def _reader(path: Path) -> MegatronReader:
    return MegatronReader(open_store(str(path)))


def _ckpt(distopt, layout: str, fmt: str) -> Path:
    return distopt[f"{layout}_{fmt}"] / "checkpoint"


@pytest.mark.parametrize("layout", NAMES)
def test_mapped_state_equals_the_fully_reshardable_twin(distopt, layout):
    dp = DistOptReader(_reader(_ckpt(distopt, layout, "dp_reshardable")))
    fr = _reader(_ckpt(distopt, layout, "fully_reshardable"))
    # the twins were trained identically: same model tensors, bit for bit
    model = [k for k, i in fr.tensor_infos().items() if i.group == "model"]
    assert model and all(torch.equal(dp.read_tensor(k), fr.read_tensor(k)) for k in model)
    mapped = dp.per_parameter_state()
    truth = {k: i for k, i in fr.tensor_infos().items() if i.group == "optimizer"}
    assert set(mapped) == set(truth)
    assert {k.split(".optimizer.")[0] for k in mapped if k.startswith("chained_")} == (
        {"chained_0", "chained_1"} if layout.startswith("moe") else set())
    for name, info in mapped.items():
        assert info.shape == truth[name].shape and info.dtype == truth[name].dtype
        got, want = dp.read_tensor(name), fr.read_tensor(name)
        assert torch.equal(got, want), name
        assert name.split(".state.")[1].startswith("param.") or got.abs().sum() > 0  # real moments
    # a region inside a parameter (across TP blocks and layers) reads the same as the twin's
    name = next(k for k, i in mapped.items() if len(i.shape) == 3 and i.shape[1] > 2 and i.shape[2] > 2)
    shape = mapped[name].shape
    offsets, sizes = (shape[0] - 1, 1, 1), (1, shape[1] - 2, shape[2] - 2)
    assert torch.equal(dp.read_region(name, offsets, sizes), fr.read_region(name, offsets, sizes))


@pytest.mark.parametrize("layout", NAMES)
def test_layout_places_params_where_megatron_did(distopt, layout):
    """Every param range megatron recorded on each rank (its ``gbuf_world`` part in the rank's DP
    shard) is the DP-shard part of a slot of the derived layout, bucket by bucket."""
    d = distopt[f"{layout}_dp_reshardable"]
    lay = build_layout(_reader(d / "checkpoint"))
    moe = layout.startswith("moe")
    slots = {}
    for b in lay.buckets:
        slots[(b.chain, b.dp_group_idx, b.gbuf, b.bucket)] = b
    checked = 0
    for r in range(LAYOUTS[layout][3]):
        rec = json.loads((d / "ref" / f"layout_rank_{r}.json").read_text())
        for i, opt in enumerate(rec["optimizers"]):
            for rb in opt["buckets"]:
                b = slots[(f"chained_{i}." if moe else "", opt["data_parallel_group_idx"], rb["gbuf_idx"],
                           rb["bucket_idx"])]
                shard = b.numel // b.dp_size
                lo, hi = opt["dp_rank"] * shard, (opt["dp_rank"] + 1) * shard
                ours = {(max(p.start, lo), min(p.start + p.numel, hi)) for p in b.params
                        if p.start < hi and p.start + p.numel > lo}
                theirs = {tuple(p["gbuf_world"]) for p in rb["params"]}
                assert ours == theirs, (r, i)
                assert b.numel == int(opt["per_bucket_numel"].split("[")[-1].split("]")[0])
                checked += len(theirs)
    assert checked


# -- refusals ------------------------------------------------------------------------------
def _metadata(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(ckpt)).read_metadata()


def _write_metadata(ckpt: Path, md) -> None:
    with open(ckpt / ".metadata", "wb") as f:  # what torch DCP's FileSystemWriter writes
        pickle.dump(md, f)


def _replace_item(ckpt: Path, fqn: str, change, offset: tuple | None = None) -> None:
    """Re-save one DCP item (an object or a tensor chunk) with ``change`` applied, the way
    megatron-core's writer stores items (each its own ``torch.save`` blob): the new blob goes at
    the end of its ``.distcp`` file and ``.metadata`` points to it."""
    md = _metadata(ckpt)
    idx, info = next((i, v) for i, v in md.storage_data.items()
                     if i.fqn == fqn and (offset is None or tuple(i.offset) == offset))
    path = ckpt / info.relative_path
    with open(path, "rb") as f:
        f.seek(info.offset)
        old = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
    buf = io.BytesIO()
    torch.save(change(old), buf)
    start = path.stat().st_size
    with open(path, "ab") as f:
        f.write(buf.getvalue())
    md.storage_data[idx] = dataclasses.replace(info, offset=start, length=len(buf.getvalue()))
    _write_metadata(ckpt, md)


def _bucket_sizes_plus(extra: int):
    def change(obj):
        (per_gbuf,) = obj
        return [[{k: [n + extra for n in v] for k, v in d.items()} for d in per_gbuf]]
    return change


def _drop_object(ckpt: Path, fqn: str) -> None:
    md = _metadata(ckpt)
    del md.state_dict_metadata[fqn]
    for idx in [i for i in md.storage_data if i.fqn == fqn]:
        del md.storage_data[idx]
    _write_metadata(ckpt, md)


OBJ = "optimizer.distributed.dp_group_idx_{}.{}/shard_0_1"
DAMAGE = {  # how the checkpoint is damaged, what the one-line refusal says
    "unpadded_size": (lambda c: _replace_item(c, OBJ.format(0, "per_bucket_numel_unpadded"), _bucket_sizes_plus(64)),
                      "holds 13632 elements, per_bucket_numel_unpadded says 13696"),
    "padded_size": (lambda c: _replace_item(c, OBJ.format(1, "per_bucket_numel"), _bucket_sizes_plus(128)),
                    "per_bucket_numel says 13824, megatron pads 13632 elements over DP 2 to 13696"),
    "missing_object": (lambda c: _drop_object(c, OBJ.format(1, "per_bucket_numel_unpadded")), "no readable"),
    # a parameter the buffers hold is not in the model: no order puts the others where they are
    "param_missing": (lambda c: _drop_object(c, "decoder.final_layernorm.weight"),
                      "no known parameter order fits the buffers"),
    "weights_differ": (lambda c: _replace_item(c, "decoder.final_layernorm.weight", lambda t: t + 1.0),
                       "differs from the model weights"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_layout_facts_are_refused(distopt, tmp_path, damage):
    src = tmp_path / "policy"
    shutil.copytree(_ckpt(distopt, "dense_tp2dp2", "dp_reshardable"), src)
    apply, why = DAMAGE[damage]
    apply(src)
    out = tmp_path / "out"
    code, stdout, err = run("convert-reshard", src, "--out", out, "--tp", "1", "--dp", "2")
    line = err.strip()
    assert code == 2 and "\n" not in line and "Traceback" not in err, err
    assert "--drop-optimizer" in line and "dp_reshardable" in line and why in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # nothing written, no leftovers
    if damage != "weights_differ":
        with pytest.raises(OptimizerLayoutError):
            build_layout(_reader(src))
    # the model weights alone still convert
    doc = run_json("convert-reshard", src, "--out", out, "--tp", "1", "--dp", "2", "--drop-optimizer")
    assert doc["optimizer"] == "dropped"


# -- convert-reshard -------------------------------------------------------------------------
RESHARDS = [
    ("dense_tp2dp2", ["--tp", "1", "--dp", "2"]),
    ("dense_pp2dp2", ["--tp", "2", "--pp", "1", "--dp", "2"]),
    ("moe_tp2ep2dp2", ["--tp", "2", "--dp", "2", "--ep", "1"]),
    ("moe_tp2ep2dp2", ["--tp", "1", "--dp", "4", "--ep", "2"]),
    ("moe_pp2ep2dp2", ["--tp", "1", "--pp", "1", "--dp", "4", "--ep", "4"]),
]


@pytest.mark.parametrize("layout,options", RESHARDS, ids=[f"{n}-{'_'.join(o)}" for n, o in RESHARDS])
def test_convert_reshard_keeps_the_moments(distopt, tmp_path, layout, options):
    """dp_reshardable at a new TP/PP/EP: the output is exactly what resharding the
    fully_reshardable twin gives (same keys, chunks, bytes, common.pt)."""
    got, want = tmp_path / "from_dp", tmp_path / "from_fr"
    doc = run_json("convert-reshard", _ckpt(distopt, layout, "dp_reshardable"), "--out", got, *options)
    assert doc["optimizer"] == "resharded" and doc["optimizer_format"] == "dp_reshardable"
    assert doc["optimizer_output_format"] == "fully_reshardable"
    assert any("fully_reshardable" in w for w in doc["warnings"])
    ref = run_json("convert-reshard", _ckpt(distopt, layout, "fully_reshardable"), "--out", want, *options)
    assert ref["optimizer"] == "resharded" and ref["target_layout"] == doc["target_layout"]
    a, b = _reader(got), _reader(want)
    ia, ib = a.tensor_infos(), b.tensor_infos()
    assert set(ia) == set(ib)
    assert sum(i.group == "optimizer" for i in ia.values()) == 3 * sum(i.group == "model" for i in ia.values())
    for k in ia:
        assert sorted((p.offsets, p.sizes) for p in ia[k].pieces) == sorted((p.offsets, p.sizes) for p in ib[k].pieces)
        assert torch.equal(a.read_tensor(k), b.read_tensor(k)), k
    assert {o.name for o in a.objects()} == {o.name for o in b.objects()}
    common = torch.load(got / "common.pt", weights_only=False)
    assert common == torch.load(want / "common.pt", weights_only=False)
    assert a.summary()["optimizer"]["format"] == "fully_reshardable"


def test_dp_only_change_still_copies_the_buffers(distopt, tmp_path):
    """Same TP/PP/EP: the flat buffers are copied as they are (megatron re-splits them over DP)."""
    src = _ckpt(distopt, "dense_tp2dp2", "dp_reshardable")
    doc = run_json("convert-reshard", src, "--out", tmp_path / "o", "--tp", "2", "--dp", "1")
    assert doc["optimizer"] == "copied" and doc["optimizer_output_format"] is None
    assert torch.load(tmp_path / "o" / "common.pt", weights_only=False) == torch.load(src / "common.pt",
                                                                                     weights_only=False)


def test_layout_reports_the_module_spec_and_expert_order_that_fit(distopt):
    lay = build_layout(_reader(_ckpt(distopt, "moe_tp2ep2dp2", "dp_reshardable")))
    # the fixtures use megatron's local spec (input norm its own module) and SequentialMLP experts
    assert all(spec == "local" for spec, _ in lay.variants["chained_0."])
    assert all(order == "sequential" for _, order in lay.variants["chained_1."])


def test_torchrun_from_s3_equals_one_process(distopt, tmp_path, s3_server):
    """Two torchrun processes reading the dp_reshardable source from S3 by ranged reads (each
    building the layout itself) write what one local process writes."""
    from storage_servers import Backend

    src = _ckpt(distopt, "dense_tp2dp2", "dp_reshardable")
    s3 = Backend("s3", endpoint=s3_server)
    url = s3.new_root()
    s3.upload_dir(str(src), url)
    local, shared = tmp_path / "one", tmp_path / "two"
    run_json("convert-reshard", src, "--out", local, "--tp", "1", "--dp", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "ckptctl.ops.reshard_worker", url, "--out", str(shared), "--tp", "1", "--pp", "1", "--dp", "2",
         "--json"], cwd=str(Path(__file__).resolve().parent.parent), capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert doc["processes"] == 2 and doc["optimizer_output_format"] == "fully_reshardable"
    a, b = _reader(local), _reader(shared)
    assert a.tensor_infos().keys() == b.tensor_infos().keys()
    for k in a.tensor_infos():
        assert torch.equal(a.read_tensor(k), b.read_tensor(k)), k
    assert torch.load(local / "common.pt", weights_only=False) == torch.load(shared / "common.pt",
                                                                             weights_only=False)
