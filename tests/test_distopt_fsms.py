"""``fully_sharded_model_space`` distributed-optimizer state (issue #10): a REAL checkpoint written
by megatron-core 0.13.1, committed under ``tests/fixtures/distopt_fsms/`` (megatron-core 0.16.1,
which the project pins, cannot write that format; see its README for the command that wrote it).

* ``list`` / ``inspect`` recognise the format and never count its tensors as model tensors;
  ``export-hf`` never reads them;
* ckptctl's reader presents the N-D flattened pieces as megatron's per-parameter tensors, equal
  to the reference the writer assembled from what megatron handed to its saver;
* ``convert-reshard`` (TP / PP changes and a DP-only change) writes ``fully_reshardable`` state,
  which megatron-core 0.16.1's own DistributedOptimizer loads at the target layout (the step
  oracle of :mod:`realckpt.distopt_writer`): every loaded tensor equals the reference exactly,
  and one more training step from two different targets of the same source agrees;
* what cannot be established is refused in one line naming ``--drop-optimizer``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")

from cli_runner import run, run_json  # noqa: E402

from ckptctl.formats.base import OPTIMIZER  # noqa: E402
from ckptctl.formats.distopt import DistOptReader  # noqa: E402
from ckptctl.formats.flattened import FlattenedState  # noqa: E402
from ckptctl.formats.megatron import MegatronReader  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "distopt_fsms"
VARIANTS = {"dense_tp2dp2": "TP2·PP1", "dense_pp2dp2": "TP1·PP2"}
FORMAT = "fully_sharded_model_space"
LOSS_RTOL = 1e-5
STATE_ATOL = 1e-5


def _reference(variant: str) -> dict:
    return torch.load(FIXTURES / variant / "reference.pt", weights_only=True)


def _per_parameter_name(name: str) -> str:
    """The reference's name of a saved tensor as megatron's fully_reshardable state calls it."""
    return name.replace("optimizer.state.fp32_param.", "optimizer.state.param.")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """A copy of each committed SkyRL tree (the committed files are never touched)."""
    root = tmp_path_factory.mktemp("fsms")
    out = {}
    for v in VARIANTS:
        shutil.copytree(FIXTURES / v / "tree", root / v)
        out[v] = root / v
    return out


def _policy(tree: Path) -> Path:
    return tree / "global_step_2" / "policy"


# -- the fixture is the real format ----------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_fixture_holds_n_d_flattened_state(trees, variant):
    """What megatron-core 0.13.1 wrote: every optimizer tensor stored N-D flattened (one more axis
    than its parameter), and -- in the PP2 fixture -- parameters split between the DP ranks."""
    ref = _reference(variant)
    assert ref["megatron_core"] == "0.13.1"
    infos = MegatronReader(open_store(str(_policy(trees[variant])))).tensor_infos()
    opt = {k: i for k, i in infos.items() if i.group == OPTIMIZER}
    assert len(opt) == 27 and all(".state.fp32_param." in k or ".exp_avg" in k for k in opt)
    for k, i in opt.items():
        model = infos[k.split(".", 3)[3]]
        assert len(i.shape) == len(model.shape) + 1 and i.numel == model.numel, k
    mid_row = [k for k, i in opt.items() if any(p.offsets[-1] > 0 for p in i.pieces)]
    assert bool(mid_row) == (variant == "dense_pp2dp2")


# -- list / inspect / export-hf ----------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_inspect_names_the_format_and_counts_only_the_model(trees, variant):
    ref = _reference(variant)
    doc = run_json("inspect", trees[variant])
    (comp,) = [c for c in doc["components"] if c["name"] == "policy"]
    opt = comp["format"]["optimizer"]
    assert opt["format"] == FORMAT and opt["format_source"] == "common.pt" and opt["step"] == 2
    assert [(c["format_from_keys"], c["format_in_common"]) for c in opt["chains"]] == [(FORMAT, FORMAT)]
    model = {k: t for k, t in ref["tensors"].items() if not k.startswith("optimizer.")}
    assert comp["tensor_count"] == {"model": len(model), "optimizer": 3 * len(model)}
    assert comp["parameters"] == sum(t.numel() for t in model.values())
    assert comp["format"]["parallel"]["layout"] == VARIANTS[variant] and comp["format"]["parallel"]["dp"] == 2
    assert comp["problems"] == [] and comp["format"]["problems"] == [] and doc["complete"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_list_reads_the_old_metadata(trees, variant):
    """megatron-core 0.13.1's .metadata also pickles each rank's MCoreSavePlan: list (no torch) reads it."""
    for deep in ((), ("--deep",)):
        doc = run_json("list", trees[variant], *deep)
        (step,) = doc["steps"]
        (comp,) = step["components"]
        assert step["complete"] and step["problems"] == [] and comp["problems"] == []
        assert comp["layout"] == VARIANTS[variant] and comp["has_optimizer"]


def test_resolve_resume_says_megatron_0_16_cannot_load_it_and_how_to_convert(trees, tmp_path):
    """The run (megatron-core 0.16) loads this format at no layout: not resumable, exit 6, with the
    convert-reshard command for the run's own layout, which then runs."""
    tree = shutil.copytree(trees["dense_pp2dp2"], tmp_path / "ckpts")
    code, out, err = run("resolve-resume", tree, "--json")
    assert code == 6, err
    (fit,) = json.loads(out)["optimizer"]
    assert fit["format"] == FORMAT and fit["loadable"] is False and "flattened_range" in fit["reason"]
    assert fit["convert"].split()[-6:] == ["--tp", "1", "--pp", "2", "--dp", "2"]
    assert "trainer.policy.megatron_config.dist_ckpt_optim_fully_reshardable=true" in fit["overrides"]
    code, _, err = run(*fit["convert"].split()[1:])
    assert code == 0, err
    converted = Path(fit["resume_path"]) / "policy"
    assert run_json("inspect", converted)["components"][0]["format"]["optimizer"]["format"] == "fully_reshardable"


def test_export_hf_is_the_model_weights_and_never_reads_the_optimizer(trees, tmp_path):
    from safetensors.torch import load_file

    variant = "dense_pp2dp2"
    ref = _reference(variant)["tensors"]
    damaged = tmp_path / "damaged"
    shutil.copytree(trees[variant], damaged)
    reader = MegatronReader(open_store(str(_policy(damaged))))
    for t in reader.tensors():
        if t.group == OPTIMIZER:  # every optimizer chunk unreadable
            for p in t.pieces:
                path = _policy(damaged) / p.file
                data = bytearray(path.read_bytes())
                data[p.byte_offset:p.byte_offset + p.byte_length] = bytes(p.byte_length)
                path.write_bytes(bytes(data))
    doc = run_json("export-hf", damaged, "--out", tmp_path / "hf")
    assert doc["verified"]
    out = {}
    for f in sorted((tmp_path / "hf").glob("*.safetensors")):
        out.update(load_file(f))
    assert not any("optimizer" in k or "exp_avg" in k for k in out)
    model_numel = sum(t.numel() for k, t in ref.items() if not k.startswith("optimizer."))
    assert sum(t.numel() for t in out.values()) == model_numel
    ffn = ref["decoder.layers.mlp.linear_fc2.weight"].shape[-1]
    want = {"model.embed_tokens.weight": ref["embedding.word_embeddings.weight"],
            "lm_head.weight": ref["output_layer.weight"], "model.norm.weight": ref["decoder.final_layernorm.weight"]}
    for i in range(2):
        want.update({
            f"model.layers.{i}.self_attn.o_proj.weight": ref["decoder.layers.self_attention.linear_proj.weight"][i],
            f"model.layers.{i}.mlp.down_proj.weight": ref["decoder.layers.mlp.linear_fc2.weight"][i],
            f"model.layers.{i}.mlp.gate_proj.weight": ref["decoder.layers.mlp.linear_fc1.weight"][i][:ffn],
            f"model.layers.{i}.mlp.up_proj.weight": ref["decoder.layers.mlp.linear_fc1.weight"][i][ffn:],
            f"model.layers.{i}.input_layernorm.weight":
                ref["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][i],
            f"model.layers.{i}.post_attention_layernorm.weight":
                ref["decoder.layers.mlp.linear_fc1.layer_norm_weight"][i],
        })
    assert {k: torch.equal(out[k], t) for k, t in want.items()} == {k: True for k in want}


# -- the optimizer state as named full tensors ----------------------------------------------------

@pytest.mark.parametrize("slab", [None, 7])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reader_returns_each_state_as_the_full_named_tensor(trees, variant, slab, monkeypatch):
    if slab:  # element coordinates computed 7 at a time: slabs that cut rows and pieces anywhere
        monkeypatch.setattr(FlattenedState, "SLAB", slab)
    ref = _reference(variant)["tensors"]
    reader = DistOptReader(MegatronReader(open_store(str(_policy(trees[variant])))))
    virtual = reader.per_parameter_state()
    want = {_per_parameter_name(k): t for k, t in ref.items() if k.startswith("optimizer.")}
    assert sorted(virtual) == sorted(want)
    for name, t in want.items():
        assert virtual[name].shape == tuple(t.shape) and virtual[name].group == OPTIMIZER
        assert torch.equal(reader.read_tensor(name), t), name
        # a block that cuts across the saved pieces (the last half of every axis)
        sizes = tuple(max(1, d // 2) for d in t.shape)
        offsets = tuple(d - s for d, s in zip(t.shape, sizes))
        block = t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
        assert torch.equal(reader.read_region(name, offsets, sizes), block), name
    assert all(want[k].abs().sum() > 0 for k in want if ".exp_avg" in k)


def _without_recorded_shapes(tree: Path, dest: Path) -> Path:
    """A copy of ``tree`` whose .metadata lost megatron's record of the original shapes."""
    shutil.copytree(tree, dest)
    path = _policy(dest) / ".metadata"
    md = pickle.loads(path.read_bytes())  # our own committed fixture (megatron + torch classes)
    del md.mcore_data
    path.write_bytes(pickle.dumps(md))
    return dest


def test_unrecorded_shapes_are_refused_naming_drop_optimizer(trees, tmp_path):
    pytest.importorskip("megatron.core")  # to unpickle the fixture's .metadata with its real classes
    src = _without_recorded_shapes(trees["dense_tp2dp2"], tmp_path / "src")
    code, out, err = run("convert-reshard", src / "global_step_2", "-o", tmp_path / "out", "--tp", "1", "--dp", "2")
    assert code != 0 and not (tmp_path / "out").exists()
    (line,) = err.strip().splitlines()
    assert "--drop-optimizer" in line and FORMAT in line and "Traceback" not in err
    doc = run_json("convert-reshard", src / "global_step_2", "-o", tmp_path / "out", "--tp", "1", "--dp", "2",
                   "--drop-optimizer")
    assert doc["optimizer"] == "dropped"


# -- convert-reshard, proved by megatron-core 0.16.1 ------------------------------------------------

class Case(NamedTuple):
    name: str
    source: str
    tp: int
    pp: int
    dp: int


CASES = [
    Case("tp2dp2-to-tp1pp2", "dense_tp2dp2", 1, 2, 2),
    Case("tp2dp2-to-dp1", "dense_tp2dp2", 2, 1, 1),  # DP-only
    Case("pp2dp2-to-tp2", "dense_pp2dp2", 2, 1, 2),
]


@pytest.fixture(scope="module")
def proved(trees, tmp_path_factory):
    """Reshard every case, then ONE step-oracle launcher: megatron-core 0.16.1 builds the model,
    DDP and DistributedOptimizer at each target layout, loads the output and trains one step."""
    pytest.importorskip("megatron.core")
    from ckptctl.ops.reshard import convert_reshard
    from realckpt.distopt_writer import next_step_job, run_next_step

    work = tmp_path_factory.mktemp("fsms_reshard")
    summaries, jobs = {}, []
    for c in CASES:
        t0 = time.monotonic()
        summaries[c.name] = convert_reshard(str(trees[c.source] / "global_step_2" / "policy"),
                                            str(work / c.name / "out"), tp=c.tp, pp=c.pp, dp=c.dp).to_dict()
        summaries[c.name]["seconds"] = round(time.monotonic() - t0, 2)
        job = next_step_job("dense_tp2dp2_fully_reshardable", work / c.name / "out", work / c.name / "next_step",
                            tp=c.tp, pp=c.pp, dp=c.dp)
        written = _reference(c.source)["job"]  # the model, optimizer and batches of the writing job
        job.update({k: written[k] for k in ("model", "optimizer", "seed", "bucket_size", "params_dtype")},
                   first_step=written["steps"])
        jobs.append(job)
    # and the source itself, at its own layout: why even a DP-only change is converted
    source = dict(jobs[0], tp=2, pp=1, world_size=4, ckpt_dir=str(trees["dense_tp2dp2"] / "global_step_2" / "policy"),
                  out_dir=str(work / "source" / "next_step"))
    jobs.append(source)
    t0 = time.monotonic()
    results = run_next_step(jobs)
    print(f"\nreshard {[s['seconds'] for s in summaries.values()]}s; step oracle {time.monotonic() - t0:.1f}s")
    return dict(summaries=summaries, results={c.name: results[str(work / c.name / "next_step")] for c in CASES},
                source=results[source["out_dir"]])


def test_megatron_core_0_16_cannot_load_the_source(proved):
    """megatron-core 0.16.1 refuses fully_sharded_model_space even at the layout that wrote it, so
    ckptctl converts it to fully_reshardable on every convert-reshard, DP-only changes included."""
    errors = proved["source"]["errors"]
    assert errors and all("flattened_range is not supported" in e for e in errors), errors[:1]


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_reshard_writes_fully_reshardable_that_megatron_loads_exactly(proved, case):
    from realckpt.distopt_writer import read_full_tensors

    c = next(x for x in CASES if x.name == case)
    s = proved["summaries"][case]
    assert (s["optimizer"], s["optimizer_format"], s["optimizer_output_format"]) == (
        "resharded", FORMAT, "fully_reshardable")
    assert (s["target_layout"]["tp"], s["target_layout"]["pp"], s["target_layout"]["world_size"]) == (
        c.tp, c.pp, c.tp * c.pp * c.dp)
    res = proved["results"][case]
    assert res["errors"] == [], res["errors"][0]
    assert res["format"] == "fully_reshardable" and res["steps_loaded"] == [2.0] and res["steps_after"] == [3.0]
    truth = {_per_parameter_name(k): t for k, t in _reference(c.source)["tensors"].items()}
    loaded = read_full_tensors(res["loaded"])
    assert sorted(loaded) == sorted(truth)
    differ = [k for k, t in truth.items() if not torch.equal(loaded[k], t)]
    assert differ == [], f"{len(differ)} tensors differ after megatron's load, e.g. {differ[:3]}"


def test_the_next_step_agrees_across_target_layouts(proved):
    """Two targets of the same source (TP1·PP2·DP2 and TP2·DP1) take the same next step."""
    from realckpt.distopt_writer import read_full_tensors

    a, b = (proved["results"][n] for n in ("tp2dp2-to-tp1pp2", "tp2dp2-to-dp1"))
    assert a["errors"] == b["errors"] == []
    assert a["losses"] and b["losses"]
    for loss in a["losses"] + b["losses"]:
        assert loss == pytest.approx(a["losses"][0], rel=LOSS_RTOL)
    got, want = read_full_tensors(a["stepped"]), read_full_tensors(b["stepped"])
    loaded = read_full_tensors(a["loaded"])
    assert sorted(got) == sorted(want)
    off = {k: float((got[k] - want[k]).abs().max()) for k in want
           if not torch.allclose(got[k], want[k], atol=STATE_ATOL, rtol=0)}
    assert off == {}
    assert any(not torch.equal(got[k], loaded[k]) for k in got if ".exp_avg." in k)  # the step really moved
