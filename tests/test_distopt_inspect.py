"""inspect / list / export-hf on REAL megatron-core DistributedOptimizer checkpoints (issue #10).

The checkpoints are written by megatron-core 0.16.1's own DistributedOptimizer (see
:mod:`realckpt.distopt_writer`): a dense model at TP1xDP2, TP2xDP2, PP2xDP2 and an MoE model
(ChainedOptimizer: dense + expert optimizers) at TP2xEP2xDP2 and PP2xEP2xDP2, each in the
``dp_reshardable`` and ``fully_reshardable`` formats. What ckptctl reports is checked against
what megatron itself recorded while writing them: the bucket layout each rank logged
(``ref/layout_rank_{r}.json``), the torch DCP metadata read by torch, and ``common.pt`` read by
torch -- never against numbers typed here.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from cli_runner import run, run_json  # noqa: E402
from distopt_tree import job_of, skyrl_tree  # noqa: E402

from ckptctl.formats.base import OPTIMIZER  # noqa: E402
from ckptctl.formats.mcore_to_hf import is_model_key  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402
from realckpt.megatron_worker import _te_keys_map  # noqa: E402

NAMES = ["dense_tp1dp2", "dense_tp2dp2", "dense_pp2dp2", "moe_tp2ep2dp2", "moe_pp2ep2dp2"]
FORMATS = ["dp_reshardable", "fully_reshardable"]
ALL = [f"{n}_{f}" for n in NAMES for f in FORMATS]
DP_ONLY = [f"{n}_dp_reshardable" for n in NAMES]
FR_ONLY = [f"{n}_fully_reshardable" for n in NAMES]
DP_KEY = re.compile(r"^(?:(chained_\d+)\.)?optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\."
                    r"dtype_(\(.*?\))\.bucket_idx_(\d+)\.(\w+)$")
FR_KEY = re.compile(r"^(?:(chained_\d+)\.)?optimizer\.state\.(\w+)\.(.+)$")
PER_GBUF = re.compile(r"\{(\(torch\.\w+, torch\.\w+\)): \[([\d, ]*)\]\}")


@pytest.fixture(scope="module")
def fixtures(distopt_ckpts) -> dict[str, Path]:
    return distopt_ckpts


@pytest.fixture(scope="module")
def trees(fixtures, tmp_path_factory) -> dict[str, Path]:
    """A SkyRL tree around a copy of each fixture (read-only: tests that damage one copy it)."""
    root = tmp_path_factory.mktemp("distopt_trees")
    out = {}
    for name in ALL:
        skyrl_tree(fixtures[name], root / name)
        out[name] = root / name
    return out


def _dcp_metadata(fixture: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(fixture / "checkpoint")).read_metadata().state_dict_metadata


def _megatron_buckets(fixture: Path) -> dict:
    """What megatron logged on every rank: {(chain, dp_group_idx): {"ranks", "numel", "unpadded"}},
    numel / unpadded keyed by (gbuf_idx, dtype, bucket_idx)."""
    job = job_of(fixture)
    moe = job["model"].get("moe") is not None
    out: dict = {}
    for r in range(job["world_size"]):
        lay = json.loads((fixture / "ref" / f"layout_rank_{r}.json").read_text())
        for i, o in enumerate(lay["optimizers"]):
            entry = out.setdefault((f"chained_{i}" if moe else None, o["data_parallel_group_idx"]),
                                   {"ranks": set(), "numel": {}, "unpadded": {}})
            entry["ranks"].add(r)
            for field, what in (("numel", "per_bucket_numel"), ("unpadded", "per_bucket_numel_unpadded")):
                for g, (dtype, numels) in enumerate(PER_GBUF.findall(o[what])):
                    for b, n in enumerate(int(x) for x in numels.split(",")):
                        entry[field][(g, dtype, b)] = n
    return out


def _component(doc: dict) -> dict:
    (comp,) = [c for c in doc["components"] if c["name"] == "policy"]
    return comp


# -- format recognition ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_inspect_names_the_format_of_each_optimizer_of_the_chain(trees, fixtures, name):
    doc = run_json("inspect", trees[name])
    comp = _component(doc)
    opt = comp["format"]["optimizer"]
    job = job_of(fixtures[name])
    common = torch.load(fixtures[name] / "checkpoint" / "common.pt", weights_only=True)["optimizer"]
    # what megatron wrote into common.pt, per optimizer of the chain
    written = ({f"chained_{i}": part["param_state_sharding_type"] for i, part in common.items()}
               if job["model"].get("moe") else {None: common["param_state_sharding_type"]})
    assert {c["chain"]: c["format"] for c in opt["chains"]} == written
    assert all(c["format_from_keys"] == c["format_in_common"] == c["format"] for c in opt["chains"])
    assert opt["format"] == job["format"] and opt["format_source"] == "common.pt"
    assert comp["format"]["problems"] == [] and doc["complete"]
    steps = {g["step"] for g in opt["param_groups"]}
    assert opt["step"] == job["steps"] and steps == {job["steps"]}


def test_common_pt_disagreeing_with_the_keys_is_a_problem(fixtures, tmp_path):
    name = "moe_tp2ep2dp2_dp_reshardable"
    step = skyrl_tree(fixtures[name], tmp_path / "t")
    path = step / "policy" / "common.pt"
    common = torch.load(path, weights_only=True)
    common["optimizer"][1]["param_state_sharding_type"] = "fully_reshardable"
    torch.save(common, path)
    opt_doc = _component(run_json("inspect", tmp_path / "t"))["format"]
    chains = {c["chain"]: c for c in opt_doc["optimizer"]["chains"]}
    assert chains["chained_0"]["format"] == "dp_reshardable"
    assert chains["chained_1"]["format_in_common"] == "fully_reshardable"
    assert chains["chained_1"]["format_from_keys"] == "dp_reshardable"
    assert opt_doc["optimizer"]["format"] == "mixed"
    assert any("chained_1" in p and "'fully_reshardable'" in p and "'dp_reshardable'" in p
               for p in opt_doc["problems"]), opt_doc["problems"]
    code, out, _ = run("inspect", tmp_path / "t")
    assert code == 0 and "common.pt says fully_reshardable, keys say dp_reshardable" in " ".join(out.split())


# -- dp_reshardable: buckets as megatron recorded them --------------------------------------------

@pytest.mark.parametrize("name", DP_ONLY)
def test_dp_reshardable_buckets_are_those_megatron_recorded(trees, fixtures, name):
    chains = _component(run_json("inspect", trees[name]))["format"]["optimizer"]["chains"]
    recorded = _megatron_buckets(fixtures[name])
    md = _dcp_metadata(fixtures[name])
    stored = {}
    for key, entry in md.items():
        if m := DP_KEY.match(key):
            assert len(entry.size) == 1
            stored[(m[1], int(m[2]), int(m[3]), m[4], int(m[5]), m[6])] = (
                entry.size[0], entry.size[0] * entry.properties.dtype.itemsize)
    shown = {}
    for chain in chains:
        for group in chain["dp_groups"]:
            rec = recorded[(chain["chain"], group["dp_group_idx"])]
            assert set(group["writer_ranks"]) <= rec["ranks"], (group["writer_ranks"], rec["ranks"])
            for buf in group["buffers"]:
                assert (buf["param_dtype"], buf["grad_dtype"]) == (str(torch.float32)[6:], "float32")
                for bucket in buf["buckets"]:
                    where = (buf["gbuf_idx"], buf["dtype"], bucket["bucket_idx"])
                    shown[(chain["chain"], group["dp_group_idx"], *where)] = bucket
                    assert bucket["numel"] == rec["numel"][where]
                    assert bucket["numel_unpadded"] == rec["unpadded"][where]
                    assert bucket["padding"] == rec["numel"][where] - rec["unpadded"][where]
                    for state in ("param", "exp_avg", "exp_avg_sq"):
                        length, nbytes = stored[(chain["chain"], group["dp_group_idx"], *where, state)]
                        assert bucket["stored_numel"] == length == rec["unpadded"][where]
                        assert bucket["bytes"][state] == nbytes
    # every bucket megatron recorded is shown, and every buffer torch's metadata lists
    assert set(shown) == {(c, k, *w) for (c, k), rec in recorded.items() for w in rec["numel"]}
    assert {key[:5] for key in stored} == set(shown)
    # at least one bucket of these layouts has trailing padding that is not stored
    if name.startswith(("dense_pp2", "moe_")):
        assert any(b["padding"] > 0 for b in shown.values())


@pytest.mark.parametrize("name", FR_ONLY)
def test_fully_reshardable_per_parameter_state(trees, fixtures, name):
    chains = _component(run_json("inspect", trees[name]))["format"]["optimizer"]["chains"]
    md = _dcp_metadata(fixtures[name])
    expected: dict = {}
    for key, entry in md.items():
        if m := FR_KEY.match(key):
            chain = expected.setdefault(m[1], {"params": set(), "states": {}})
            chain["params"].add(m[3])
            numel = 1
            for d in entry.size:
                numel *= d
            fig = chain["states"].setdefault(m[2], {"tensors": 0, "numel": 0, "bytes": 0})
            fig["tensors"] += 1
            fig["numel"] += numel
            fig["bytes"] += numel * entry.properties.dtype.itemsize
    assert {c["chain"] for c in chains} == set(expected)
    for c in chains:
        assert c["parameters"] == len(expected[c["chain"]]["params"])
        assert c["states"] == expected[c["chain"]]["states"]
        assert "dp_groups" not in c


def test_inspect_shows_the_buckets_to_people(trees, fixtures):
    name = "moe_tp2ep2dp2_dp_reshardable"
    recorded = _megatron_buckets(fixtures[name])
    code, out, _ = run("inspect", trees[name])
    assert code == 0
    text = " ".join(out.split())
    assert "optimizer dp_reshardable (from common.pt), step 2" in text
    assert "chained_0: dp_reshardable" in text and "chained_1: dp_reshardable" in text
    for rec in recorded.values():
        for numel in list(rec["numel"].values()) + list(rec["unpadded"].values()):
            assert f"{numel:,}" in out


# -- flat buffers are never model tensors -----------------------------------------------------------

@pytest.mark.parametrize("pair", NAMES)
def test_flat_buffers_are_never_counted_as_model_tensors(trees, fixtures, pair):
    dp, fr = f"{pair}_dp_reshardable", f"{pair}_fully_reshardable"
    dp_comp, fr_comp = (_component(run_json("inspect", trees[n])) for n in (dp, fr))
    # megatron's per-parameter state (fully_reshardable) covers exactly the model's parameters
    fr_params = sum(c["states"]["param"]["numel"] for c in fr_comp["format"]["optimizer"]["chains"])
    assert dp_comp["parameters"] == fr_comp["parameters"] == fr_params
    assert dp_comp["tensor_count"]["model"] == fr_comp["tensor_count"]["model"]
    # (not PP / DP: the fixture writer saves without megatron's fully parallel wrapper, so only DP
    # rank 0 of each stage writes the fully_reshardable twin and the world size is not in its files)
    keys = ("tp", "ep", "etp", "num_experts")
    assert {k: dp_comp["format"]["parallel"].get(k) for k in keys} == {k: fr_comp["format"]["parallel"].get(k)
                                                                       for k in keys}
    reader = MegatronReader(open_store(str(fixtures[dp] / "checkpoint")))
    flat = [t for t in reader.tensors() if DP_KEY.match(t.name)]
    assert flat and all(t.group == OPTIMIZER and not is_model_key(t.name) for t in flat)
    assert dp_comp["tensor_count"]["optimizer"] == len(flat)
    # list infers the layout the job ran at, from the model tensors alone
    job = job_of(fixtures[dp])
    layout = f"TP{job['tp']}·PP{job['pp']}"
    if job["model"].get("moe"):
        layout += f"·EP{job['ep']}" + (f"·ETP{job['etp']}" if job["etp"] != job["tp"] else "")
    (step,) = run_json("list", trees[dp])["steps"]
    (policy,) = [c for c in step["components"] if c["name"] == "policy"]
    assert policy["layout"] == dp_comp["format"]["parallel"]["layout"] == layout, step


# -- export-hf ignores optimizer state --------------------------------------------------------------

def _exported(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("pair", NAMES)
def test_export_is_the_same_model_whatever_the_optimizer_format(trees, pair, tmp_path):
    outs = {}
    for fmt in FORMATS:
        doc = run_json("export-hf", trees[f"{pair}_{fmt}"], "--out", tmp_path / fmt)
        assert doc["verified"], doc
        outs[fmt] = _exported(tmp_path / fmt)
    a, b = outs.values()
    assert a and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("optimizer" in k or "exp_avg" in k for k in a)


def _flip_byte_in_record(path: Path, offset: int, length: int, record: str = "/data/") -> None:
    """Flip one byte in the middle of the zip record whose name contains ``record`` (tensor data by
    default, ``data.pkl`` for a pickled object) of the torch.save blob at (offset, length)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        blob = f.read(length)
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            (info,) = [i for i in zf.infolist() if record in i.filename]
        header = blob[info.header_offset:info.header_offset + 30]
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30],
                                                                                                    "little")
        pos = offset + start + info.compress_size // 2
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("name", ["dense_pp2dp2_dp_reshardable", "moe_tp2ep2dp2_dp_reshardable",
                                  "moe_pp2ep2dp2_fully_reshardable"])
def test_export_never_reads_optimizer_bytes(trees, name, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(trees[name], damaged)
    policy = damaged / "global_step_2" / "policy"
    reader = MegatronReader(open_store(str(policy)))
    files = set()
    for t in reader.tensors():
        if t.group == OPTIMIZER:
            for p in t.pieces:
                _flip_byte_in_record(policy / p.file, p.byte_offset, p.byte_length)
                files.add(p.file)
    assert files
    intact = run_json("export-hf", trees[name], "--out", tmp_path / "a")
    broken = run_json("export-hf", damaged, "--out", tmp_path / "b")
    assert intact["verified"] and broken["verified"]
    a, b = _exported(tmp_path / "a"), _exported(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # ... while the damage is real: verify --full finds it in the optimizer chunks
    doc = run_json("verify", damaged, "--full", expect=1)
    problems = " ".join(p for t in doc["targets"] for p in t["problems"])
    assert "optimizer" in problems and any(f in problems for f in files), problems
    assert run_json("verify", trees[name], "--full")["ok"]


def test_inspect_in_object_stores(fixtures, trees, store_backend):
    """The bucket records are read where the checkpoint lives (concurrent ranged reads on S3/GCS)."""
    name = "moe_pp2ep2dp2_dp_reshardable"
    url = store_backend.new_root().rstrip("/") + "/run"
    store_backend.upload_dir(str(trees[name]), url)
    remote = _component(run_json("inspect", url))["format"]["optimizer"]
    local = _component(run_json("inspect", trees[name]))["format"]["optimizer"]
    assert remote == local and remote["chains"][0]["dp_groups"][0]["buffers"][0]["buckets"][0]["numel"]


def test_a_damaged_bucket_record_is_a_problem_not_a_crash(fixtures, tmp_path):
    name = "dense_pp2dp2_dp_reshardable"
    step = skyrl_tree(fixtures[name], tmp_path / "t")
    policy = step / "policy"
    reader = MegatronReader(open_store(str(policy)))
    (obj,) = [o for o in reader.objects() if o.key == "optimizer.distributed.dp_group_idx_1.per_bucket_numel"]
    _flip_byte_in_record(policy / obj.file, obj.byte_offset, obj.byte_length, "data.pkl")
    doc = run_json("inspect", tmp_path / "t")
    fmt = _component(doc)["format"]
    assert any(p.startswith(f"cannot read {obj.name}") for p in fmt["problems"]), fmt["problems"]
    groups = {g["dp_group_idx"]: g for g in fmt["optimizer"]["chains"][0]["dp_groups"]}
    assert groups[1]["buffers"][0]["buckets"][0]["numel"] is None
    assert groups[0]["buffers"][0]["buckets"][0]["numel"] == _megatron_buckets(fixtures[name])[(None, 0)]["numel"][
        (0, "(torch.float32, torch.float32)", 0)]



# -- which parameters each bucket holds --------------------------------------------------------------

def _megatron_bucket_params(fixture: Path) -> dict:
    """What megatron logged: {(chain, dp_group_idx, gbuf_idx, dtype, bucket_idx): [(start, numel,
    checkpoint key, global layer, global expert)]} in buffer order. Each DP rank logs the parts of
    the params inside its shard of the bucket: a param's span is the union of its parts over the
    DP ranks. Megatron's module names
    (layers numbered within the stage, experts within the EP rank, the local spec's norms) are
    turned into checkpoint keys."""
    job = job_of(fixture)
    moe = job["model"].get("moe")
    per_stage = job["model"]["num_layers"] // job["pp"]
    keys_map = _te_keys_map(mla=False, moe_layer=bool(moe))
    found: dict = {}
    for r in range(job["world_size"]):
        lay = json.loads((fixture / "ref" / f"layout_rank_{r}.json").read_text())
        for i, o in enumerate(lay["optimizers"]):
            dpg = o["data_parallel_group_idx"]
            ep_rank = dpg // job["etp"] % job["ep"] if moe and i == 1 else 0
            local_experts = moe["num_experts"] // job["ep"] if moe and i == 1 else 0
            for b in o["buckets"]:
                rows = found.setdefault((f"chained_{i}" if moe else None, dpg, b["gbuf_idx"], b["dtype"],
                                         b["bucket_idx"]), {})
                for p in b["params"]:
                    layer = re.search(r"\blayers\.(\d+)\.", p["name"])
                    expert = re.search(r"\.local_experts\.(\d+)\.", p["name"])
                    key = re.sub(r"\blayers\.\d+\.", "layers.", p["name"])
                    key = re.sub(r"\.experts\.local_experts\.\d+\.", ".experts.experts.", key)
                    for module, saved_as in keys_map.items():  # the writer's sharded_state_dict_keys_map
                        key = key.replace(f"decoder.layers.{module}", f"decoder.layers.{saved_as}")
                    lo, hi = p["gbuf_world"]
                    (old_lo, old_hi), ident = rows.get(p["name"], ((lo, hi), None))
                    rows[p["name"]] = ((min(lo, old_lo), max(hi, old_hi)), (
                        key, int(layer[1]) + lay["pp_rank"] * per_stage if layer else None,
                        ep_rank * local_experts + int(expert[1]) if expert else None))
    out = {}
    for where, rows in found.items():
        base = min(lo for (lo, _), _ in rows.values())  # a bucket starts with its first param
        out[where] = sorted((lo - base, hi - lo, *ident) for (lo, hi), ident in rows.values())
    return out


@pytest.mark.parametrize("name", DP_ONLY)
def test_each_bucket_lists_the_parameters_megatron_put_in_it(trees, fixtures, name):
    opt = _component(run_json("inspect", trees[name]))["format"]["optimizer"]
    assert "bucket_parameters" not in opt  # the layout could be established: no note
    shown = {}
    for chain in opt["chains"]:
        for group in chain["dp_groups"]:
            for buf in group["buffers"]:
                for bucket in buf["buckets"]:
                    params = bucket["parameters"]
                    assert [p["start"] for p in params] == sorted(p["start"] for p in params)
                    shown[(chain["chain"], group["dp_group_idx"], buf["gbuf_idx"], buf["dtype"],
                           bucket["bucket_idx"])] = [(p["start"], p["numel"], p["key"], p["layer"], p["expert"])
                                                     for p in params]
    assert shown == _megatron_bucket_params(fixtures[name])


def test_bucket_parameters_shown_to_people_and_left_out_with_a_note(trees, fixtures, tmp_path):
    name = "moe_tp2ep2dp2_dp_reshardable"
    code, out, _ = run("inspect", trees[name])
    text = " ".join(out.split())
    assert code == 0 and "parameters" in text
    recorded = _megatron_bucket_params(fixtures[name])
    for rows in recorded.values():  # each bucket's count and layer range
        layers = [r[3] for r in rows if r[3] is not None]
        assert f"{len(rows)}: " in text and f"layers {min(layers)}-{max(layers)}" in text
    # a layout that cannot be established (a bucket record gone): inspect still works, says why
    damaged = tmp_path / "t"
    shutil.copytree(trees[name], damaged)
    step = damaged / "global_step_2" / "policy"
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(str(step)).read_metadata()
    gone = "chained_1.optimizer.distributed.dp_group_idx_1.per_bucket_numel_unpadded/shard_0_1"
    del md.state_dict_metadata[gone]
    for idx in [i for i in md.storage_data if i.fqn == gone]:
        del md.storage_data[idx]
    with open(step / ".metadata", "wb") as f:
        import pickle
        pickle.dump(md, f)
    doc = run_json("inspect", damaged)
    opt = _component(doc)["format"]["optimizer"]
    assert opt["bucket_parameters"].startswith("not derived: ") and "per_bucket_numel_unpadded" in \
        opt["bucket_parameters"]
    assert not any("parameters" in k for c in opt["chains"] for g in c["dp_groups"] for b in g["buffers"]
                   for k in b["buckets"])
    code, out, _ = run("inspect", damaged)
    assert code == 0 and "parameters of each bucket: not derived" in " ".join(out.split())
