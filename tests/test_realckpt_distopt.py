"""REAL megatron-core DistributedOptimizer checkpoints (issue #10, fixtures part).

:mod:`realckpt.distopt_writer` writes, with megatron-core 0.16.1's own ``DistributedDataParallel``
+ ``DistributedOptimizer`` (Adam, 2 real training steps) and ``dist_checkpointing.save``, a tiny
dense model at TP1xDP2, TP2xDP2, PP2xDP2 and a tiny MoE model (ChainedOptimizer) at TP2xEP2xDP2 and
PP2xEP2xDP2, each in the ``dp_reshardable`` and ``fully_reshardable`` formats.  As part of the
write, megatron-core reloads each checkpoint at the same layout into a freshly built
DistributedOptimizer (different init, ``dist_checkpointing.load`` + ``optimizer.load_state_dict``)
and compares every rank's inner Adam state (exp_avg, exp_avg_sq, fp32 main param shard, step) with
what it held when saving: those per-rank results are asserted here, plus the key layout of each
format as plain torch DCP metadata shows it.

``fully_sharded_model_space`` is not written here: megatron-core 0.16.1 refuses it (see the writer);
its committed megatron-core 0.13.1 fixture is tested in ``test_distopt_fsms.py``.

Set ``CKPTCTL_REALCKPT_CACHE`` to keep the fixtures between sessions (~35 s to write all).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from realckpt.distopt_writer import DISTOPT_VARIANTS, LAYOUTS  # noqa: E402

DP_KEY = re.compile(
    r"^(?P<chain>chained_\d+\.)?optimizer\.distributed\.dp_group_idx_(?P<dpg>\d+)\."
    r"gbuf_idx_(?P<g>\d+)\.dtype_\(torch\.float32, torch\.float32\)\.bucket_idx_(?P<b>\d+)\."
    r"(?P<state>param|exp_avg|exp_avg_sq)$"
)
DP_OBJ = re.compile(
    r"^(chained_\d+\.)?optimizer\.distributed\.dp_group_idx_\d+\."
    r"(optimizer|per_bucket_numel|per_bucket_numel_unpadded)/shard_0_1$"
)
FR_KEY = re.compile(r"^(?P<chain>chained_\d+\.)?optimizer\.state\.(?P<state>param|exp_avg|exp_avg_sq)\.(?P<key>.+)$")


@pytest.fixture(scope="module")
def distopt(distopt_ckpts):
    return distopt_ckpts


def _metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _world(name: str) -> int:
    return LAYOUTS[DISTOPT_VARIANTS[name][0]][3]


@pytest.mark.parametrize("name", list(DISTOPT_VARIANTS))
def test_megatron_reloads_the_saved_optimizer_state(distopt, name):
    d = distopt[name]
    rec = json.loads((d / "params.json").read_text())
    assert rec["verified"] and rec["versions"]["megatron-core"] == "0.16.1"
    for r in range(_world(name)):
        res = json.loads((d / "ref" / f"load_rank_{r}.json").read_text())
        assert res["problems"] == [], (r, res)
        assert res["nonzero_exp_avg"] > 0
        ref = torch.load(d / "ref" / f"rank_{r}.pt", weights_only=False)
        assert ref["__steps__"] == [2.0]
        moments = [t for k, v in ref.items() if not k.startswith("__") for kk, t in v.items() if kk != "param"]
        assert moments and any(t.abs().sum() > 0 for t in moments)


@pytest.mark.parametrize("name", [n for n, (_, f) in DISTOPT_VARIANTS.items() if f == "dp_reshardable"])
def test_dp_reshardable_key_layout(distopt, name):
    d = distopt[name]
    md = _metadata(d / "checkpoint")
    opt_keys = [k for k in md if "optimizer" in k.split(".")[:2]]
    tensors = {k: md[k] for k in opt_keys if DP_KEY.match(k)}
    objects = [k for k in opt_keys if DP_OBJ.match(k)]
    assert set(tensors) | set(objects) == set(opt_keys)
    is_moe = DISTOPT_VARIANTS[name][0].startswith("moe")
    chains = {DP_KEY.match(k)["chain"] for k in tensors}
    assert chains == ({"chained_0.", "chained_1."} if is_moe else {None})
    for k, v in tensors.items():
        assert len(v.size) == 1 and v.properties.dtype == torch.float32
    # every flat buffer's global length is the bucket's UNPADDED numel of the model-parallel rank
    # that owns that dp_group_idx (megatron's own per_bucket_numel_unpadded)
    unpadded = {}
    for r in range(_world(name)):
        lay = json.loads((d / "ref" / f"layout_rank_{r}.json").read_text())
        for i, o in enumerate(lay["optimizers"]):
            m = re.search(r"\[(\d+)\]", o["per_bucket_numel_unpadded"])
            unpadded[(i if is_moe else None, o["data_parallel_group_idx"])] = int(m[1])
    for k, v in tensors.items():
        m = DP_KEY.match(k)
        chain = int(m["chain"][8:-1]) if m["chain"] else None
        assert v.size[0] == unpadded[(chain, int(m["dpg"]))], k
    common = torch.load(d / "checkpoint" / "common.pt", weights_only=False)
    parts = [common["optimizer"][0], common["optimizer"][1]] if is_moe else [common["optimizer"]]
    assert all(p["param_state_sharding_type"] == "dp_reshardable" for p in parts)


@pytest.mark.parametrize("name", [n for n, (_, f) in DISTOPT_VARIANTS.items() if f == "fully_reshardable"])
def test_fully_reshardable_key_layout(distopt, name):
    d = distopt[name]
    md = _metadata(d / "checkpoint")
    opt_keys = [k for k in md if "optimizer" in k.split(".")[:2]]
    assert opt_keys and all(FR_KEY.match(k) for k in opt_keys), [k for k in opt_keys if not FR_KEY.match(k)][:5]
    is_moe = DISTOPT_VARIANTS[name][0].startswith("moe")
    by_model_key = {}
    for k in opt_keys:
        m = FR_KEY.match(k)
        by_model_key.setdefault((m["chain"], m["key"]), set()).add(m["state"])
        # same global shape as the model tensor (reshardable like the weights)
        assert tuple(md[k].size) == tuple(md[m["key"]].size), k
    assert all(s == {"param", "exp_avg", "exp_avg_sq"} for s in by_model_key.values())
    if is_moe:
        experts = {c for c, key in by_model_key if ".experts." in key}
        dense = {c for c, key in by_model_key if ".experts." not in key}
        assert experts == {"chained_1."} and dense == {"chained_0."}
    common = torch.load(d / "checkpoint" / "common.pt", weights_only=False)
    parts = [common["optimizer"][0], common["optimizer"][1]] if is_moe else [common["optimizer"]]
    assert all(p["param_state_sharding_type"] == "fully_reshardable" for p in parts)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", [n for n, (_, f) in DISTOPT_VARIANTS.items() if f == "dp_reshardable"])
def test_dp_reshardable_buffers_map_back_to_params_with_plain_dcp(distopt, name):
    """One process, no process group, plain torch DCP: each flat dp_reshardable buffer, sliced at
    megatron's ``gbuf_world`` range of a param (the bucket layout megatron built, recorded per rank
    by the worker), equals the param's saved fp32 main shard / exp_avg / exp_avg_sq on that rank.
    (Padding between params is stored as its own chunks; the bucket's trailing padding is not.)"""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    d = distopt[name]
    md = _metadata(d / "checkpoint")
    is_moe = DISTOPT_VARIANTS[name][0].startswith("moe")
    wanted = {k: torch.empty(v.size, dtype=torch.float32) for k, v in md.items() if DP_KEY.match(k)}
    dcp.load(wanted, storage_reader=FileSystemReader(str(d / "checkpoint")), no_dist=True)
    checked = 0
    for r in range(_world(name)):
        lay = json.loads((d / "ref" / f"layout_rank_{r}.json").read_text())
        ref = torch.load(d / "ref" / f"rank_{r}.pt", weights_only=False)
        for i, o in enumerate(lay["optimizers"]):
            prefix = f"chained_{i}." if is_moe else ""
            for b in o["buckets"]:
                for p in b["params"]:
                    start, end = p["gbuf_world"]
                    for state in ("param", "exp_avg", "exp_avg_sq"):
                        key = (f"{prefix}optimizer.distributed.dp_group_idx_{o['data_parallel_group_idx']}."
                               f"gbuf_idx_{b['gbuf_idx']}.dtype_{b['dtype']}.bucket_idx_{b['bucket_idx']}.{state}")
                        assert torch.equal(wanted[key][start:end], ref[f"{i}:{p['name']}"][state]), (r, key, p)
                        checked += 1
    assert checked > 0
