"""``convert-reshard`` of Megatron MoE checkpoints to a new TP / PP / EP / ETP.

Sources: the real megatron-core MoE fixtures (tests/realckpt, proven by megatron-core's own load).
Each output must hold exactly the source's full tensors (compared through export-hf against the
HF model the weights came from, and chunk-for-chunk through ``diff``), be laid out as the target
asks (the EP/ETP ckptctl reads back from its chunks), and be loadable by megatron-core at the
target layout (test_realckpt_megatron_moe.py loads resharded outputs too, where it can).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402

from cli_runner import run, run_json  # noqa: E402

TARGETS = [  # (source, target options, layout read back)
    ("qwen3moe_tp2ep2", ["--tp", "1"], "TP1·PP1·EP1"),
    ("qwen3moe_tp2ep2", ["--tp", "1", "--dp", "4", "--ep", "4"], "TP1·PP1·EP4"),
    ("qwen3moe_tp2ep2", ["--tp", "2", "--dp", "2", "--ep", "2", "--etp", "1"], "TP2·PP1·EP2·ETP1"),
    ("qwen3moe_pp2ep2", ["--tp", "2", "--pp", "1", "--dp", "1", "--ep", "2", "--etp", "1"], "TP2·PP1·EP2·ETP1"),
    ("mixtral_ep2", ["--tp", "1", "--pp", "2", "--dp", "2", "--ep", "2"], "TP1·PP2·EP2"),
    ("dsv3_ep2", ["--tp", "1", "--dp", "2", "--ep", "1"], "TP1·PP1·EP1"),
]


def load_dir(path: Path) -> dict:
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


@pytest.mark.parametrize("source,options,layout", TARGETS, ids=[f"{s}-{'_'.join(o)}" for s, o, _ in TARGETS])
def test_moe_reshard_keeps_every_tensor(megatron_moe_ckpts, tmp_path, source, options, layout):
    ck = megatron_moe_ckpts[source]
    out = tmp_path / "resharded"
    doc = run_json("convert-reshard", ck.out_dir, "--out", out, "--drop-optimizer", *options)
    target = doc["target_layout"]
    assert target["ep"] == int(dict(zip(options[::2], options[1::2])).get("--ep", 1))
    (comp,) = run_json("inspect", out)["components"]
    assert comp["format"]["parallel"]["layout"] == layout
    assert run_json("diff", ck.out_dir, out)["equal"]
    exported = tmp_path / "hf"
    run_json("export-hf", out, "--out", exported)
    want = load_dir(ck.reference_hf_dir)
    got = load_dir(exported)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_impossible_moe_targets_are_refused_before_anything_is_written(megatron_moe_ckpts, tmp_path):
    ck = megatron_moe_ckpts["qwen3moe_tp2ep2"]
    experts = json.loads((ck.out_dir / "huggingface" / "config.json").read_text())
    count = next(experts[k] for k in ("num_local_experts", "num_experts") if experts.get(k))
    for options, message in [
        (["--tp", "1", "--dp", "3", "--ep", "3"], f"--ep 3 does not divide the model's {count} routed experts"),
        (["--tp", "1", "--ep", "2"], "does not divide the 1 ranks of a pipeline stage"),
        (["--tp", "2", "--etp", "4"], "does not divide the 2 ranks"),
    ]:
        code, _, err = run("convert-reshard", ck.out_dir, "--out", tmp_path / "out", "--drop-optimizer", *options)
        assert code == 2 and message in err, (options, err)
        assert not (tmp_path / "out").exists()


def test_ep_on_a_dense_checkpoint_is_a_usage_error(megatron_ckpts, tmp_path):
    code, _, err = run("convert-reshard", megatron_ckpts["tp2"].out_dir, "--out", tmp_path / "out", "--tp", "1",
                       "--ep", "2")
    assert code == 2 and "mixture-of-experts" in err and not (tmp_path / "out").exists()


def test_expert_count_that_differs_from_the_config_is_an_error(megatron_moe_ckpts, tmp_path):
    src = Path(shutil.copytree(megatron_moe_ckpts["mixtral_ep2"].out_dir, tmp_path / "policy"))
    config_path = src / "huggingface" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_local_experts"] = config["num_local_experts"] * 2
    config_path.write_text(json.dumps(config))
    code, _, err = run("convert-reshard", src, "--out", tmp_path / "out", "--tp", "1", "--drop-optimizer")
    assert code == 1 and "routed experts" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("source,options", [
    ("qwen3moe_tp2ep2", ["--tp", "1", "--dp", "4", "--ep", "4"]),
    ("dsv3_ep2", ["--tp", "2", "--ep", "1", "--etp", "1"]),
    ("mixtral_ep2", ["--tp", "1", "--pp", "2", "--dp", "2", "--ep", "2"]),
])
def test_moe_reshard_with_the_chained_optimizer_state(megatron_moe_ckpts, tmp_path, source, options):
    """Model and optimizer (fully_reshardable, chained_0./chained_1.) tensors: every full tensor of
    the output equals megatron-core's own (the fixture's checkpoint_tensors)."""
    from ckptctl.formats.megatron import MegatronReader
    from ckptctl.storage import open_store

    ck = megatron_moe_ckpts[source]
    out = tmp_path / "resharded"
    doc = run_json("convert-reshard", ck.out_dir, "--out", out, *options)
    assert doc["optimizer"] == "resharded" and not doc["dropped"]
    want = ck.reference_tensors()
    reader = MegatronReader(open_store(str(out)))
    infos = reader.tensor_infos()
    assert set(infos) == set(want)
    assert any(k.startswith("chained_1.optimizer.state.exp_avg.") and "experts" in k for k in infos)
    for key, tensor in want.items():
        assert torch.equal(reader.read_tensor(key), tensor), key
