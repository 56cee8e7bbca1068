"""``reshard_fsdp`` (``ckptctl convert-reshard --world-size``) on REAL FSDP2 checkpoints.

The truth is torch itself: the resharded files are loaded by a real FSDP2 model (the fixture
writer's own construction: ``fully_shard`` on a gloo CPU mesh of the new W) with
``load_state_dict(strict=True)``, then its AdamW optimizer and LambdaLR scheduler load, then it
takes ONE more training step on a fixed batch; the same step is taken from the ORIGINAL
checkpoint at its original W (``realckpt.fsdp_resume_check``). The loaded weights must be
identical, the loss the same, and the parameters and optimizer moments after the step equal up
to float32 summation order.

Why a tolerance after the step at all: every rank trains on the same batch, so the global
gradient does not depend on W mathematically, but its float32 arithmetic does: FSDP2
reduce-scatters (averages) W identical per-rank gradients ((g+g+g)/3 need not round back to g),
and the gradient norm for clipping is summed over differently sized shards. Those are
ulp-level differences (measured: grad norm up to 8e-7 relative); after one Adam step with lr
1e-3 they move parameters by a few 1e-9 (at most one ulp: 1.2e-7 for a norm weight near 1.0)
and the moments by ~1e-6 of their largest element (elementwise relative errors are larger
where 0.9 m + 0.1 g cancels). A misplaced row, a wrong shard or a stale moment changes values
by ~1e-3 or more.

Object stores are the session's emulators (moto S3, gcp-storage-emulator).
"""

from __future__ import annotations

import json
import os
import pickletools
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ckptctl.errors import UsageError  # noqa: E402
from ckptctl.formats.fsdp import FsdpReader  # noqa: E402
from ckptctl.formats.safe_load import load_pt  # noqa: E402
from ckptctl.ops.reshard_fsdp import RNG_RULE, chunk_range, reshard_fsdp  # noqa: E402
from ckptctl.output_dir import INCOMPLETE_MARKER, TMP_INFIX  # noqa: E402
from ckptctl.storage import open_store  # noqa: E402
from ckptctl.tree import classify_component, scan_step  # noqa: E402
from realckpt.fsdp_resume_check import resume_steps  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

#: case -> (fixture variant, target W, how the model is wrapped at the target W, reshard keywords)
CASES = {
    "w2_to_3": ("w2", 3, {}, {}),  # uneven: 1000 rows -> 334/334/332
    "w2_to_1": ("w2", 1, {"w1_plain_at_w": False}, {}),  # fully_shard on one rank (SkyRL on 1 GPU)
    "w2_to_4": ("w2", 4, {}, {}),
    "w3_tied_to_2": ("w3_tied", 2, {}, {}),  # qwen2, tied embeddings, q/k/v biases
    "critic_w3_to_2": ("critic_w3", 2, {}, {}),  # value_head [1, 64]: rows 1/0 (an EMPTY shard)
    # plain single-GPU source -> DTensors (no source mesh to take the device type from)
    "w1_to_2": ("w1", 2, {}, {"device_type": "cpu"}),
    "hsdp_to_2": ("hsdp", 2, {}, {}),  # (ddp=2, fsdp=2) HSDP -> 1-D ("fsdp",) mesh
    # LoRA (PEFT names, optimizer state for the adapter only); lora_A [4, 64] -> rows 2/2/0
    "lora_w2_to_3": ("lora_w2", 3, {}, {}),
}
#: how each source variant is wrapped at its own W
ORIGINAL_WRAP = {"hsdp": {"mesh_at_w": "hsdp", "replicas_at_w": 2}}


def _meta_for(comp, wrap: dict) -> dict:
    return {**comp.meta, **wrap}


@pytest.fixture(scope="module")
def resharded(fsdp_ckpts, tmp_path_factory):
    """Every case resharded once: {case: (summary, output dir)}."""
    root = tmp_path_factory.mktemp("reshard")
    out = {}
    for case, (variant, w, _, kwargs) in CASES.items():
        dest = root / case
        out[case] = (reshard_fsdp(str(fsdp_ckpts[variant].path), str(dest), world_size=w, **kwargs), dest)
    return out


@pytest.fixture(scope="module")
def resumed(fsdp_ckpts, resharded, tmp_path_factory):
    """One extra training step from every original (at its W) and every resharded output (at
    the new W), all in ONE launcher: {"orig": {variant: result}, "case": {case: result}}."""
    root = tmp_path_factory.mktemp("resume")
    variants = sorted({case[0] for case in CASES.values()})
    jobs, keys = [], []
    for v in variants:
        comp = fsdp_ckpts[v]
        jobs.append(dict(component=str(comp.path), world_size=comp.world_size,
                         model=_meta_for(comp, ORIGINAL_WRAP.get(v, {})), out=str(root / f"orig-{v}")))
        keys.append(("orig", v))
    for case, (variant, w, wrap, _) in CASES.items():
        jobs.append(dict(component=str(resharded[case][1]), world_size=w,
                         model=_meta_for(fsdp_ckpts[variant], wrap), out=str(root / case)))
        keys.append(("case", case))
    results = resume_steps(jobs)
    out: dict = {"orig": {}, "case": {}}
    for (group, key), res in zip(keys, results):
        out[group][key] = res
    return out


# ------------------------------------------------------------------------------------------
# the real thing: resume at the new W and train one step
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_resumes_and_trains_like_the_original(case, resumed, fsdp_ckpts):
    variant = CASES[case][0]
    orig, new = resumed["orig"][variant], resumed["case"][case]
    # the state the trainer loaded: bit-identical full tensors
    assert sorted(new["before"]) == sorted(orig["before"])
    for key, value in orig["before"].items():
        assert torch.equal(new["before"][key], value), key
    # ... and the original loaded what the fixture saved
    from safetensors.torch import load_file

    ref = load_file(str(fsdp_ckpts[variant].reference_dir / "reference_full_state.safetensors"))
    for key, value in ref.items():
        assert torch.equal(orig["before"][key], value), key
    # the scheduler was restored (last_epoch = saved steps), then stepped once
    assert new["last_epoch"] == orig["last_epoch"] == fsdp_ckpts[variant].meta["num_steps"] + 1
    assert new["lr"] == orig["lr"]
    # the step: same loss (same weights, same batch), same update up to summation order
    assert new["loss"] == pytest.approx(orig["loss"], rel=1e-6, abs=0)
    assert new["grad_norm"] == pytest.approx(orig["grad_norm"], rel=1e-5)
    meta = fsdp_ckpts[variant].meta
    static = set(meta["buffer_keys"])
    if meta.get("lora"):  # peft froze the base weights: only the adapter trains
        static |= set(orig["after"]) - set(meta["trainable_param_names"])
    for key, value in orig["after"].items():
        torch.testing.assert_close(new["after"][key], value, rtol=1e-6, atol=1e-7, msg=key)
        assert (key in static) == torch.equal(value, orig["before"][key]), f"{key}: trained iff trainable"
    assert sorted(new["optim_after"]) == sorted(orig["optim_after"])
    for key, value in orig["optim_after"].items():
        if key.endswith(".step"):
            assert torch.equal(new["optim_after"][key], value), key  # saved step + 1
        else:
            # moments: 0.9 m + 0.1 g cancels near zero, so the error scales with the tensor, not
            # with each element
            scale = value.abs().max().item()
            torch.testing.assert_close(new["optim_after"][key], value, rtol=1e-5, atol=1e-6 * scale, msg=key)


def test_rng_streams_follow_the_documented_rule(resumed, resharded, fsdp_ckpts):
    """Target rank r resumed source rank r mod W_src's RNG (seen by the trainer's own load),
    and its extra_state is that rank's with world_size / rank rewritten."""
    for case in ("w2_to_3", "w3_tied_to_2", "w2_to_1"):
        variant, w = CASES[case][:2]
        src, w_src = fsdp_ckpts[variant], fsdp_ckpts[variant].world_size
        draws_src = resumed["orig"][variant]["rng_draws"]
        assert resumed["case"][case]["rng_draws"] == [draws_src[r % w_src] for r in range(w)]
        out = resharded[case][1]
        for r in range(w):
            got = load_pt(str(out / f"extra_state_world_size_{w}_rank_{r}.pt"))
            want = load_pt(str(src.file("extra_state", r % w_src)))
            assert (got["world_size"], got["rank"]) == (w, r)
            assert got["lr_scheduler"] == want["lr_scheduler"]
            for k in ("client_state", "tag", "fsdp_strategy"):
                assert got[k] == want[k]
            assert torch.equal(got["rng"]["cpu"], want["rng"]["cpu"])
            assert torch.equal(got["rng"]["cuda"], want["rng"]["cuda"])  # per-rank seed 42 + rank
            assert got["rng"]["random"] == want["rng"]["random"]
            assert all((a == b).all() if hasattr(a, "shape") else a == b
                       for a, b in zip(got["rng"]["numpy"], want["rng"]["numpy"]))
    summary = resharded["w2_to_3"][0]
    assert summary.rng_rule == RNG_RULE
    assert any("share streams" in w for w in summary.warnings)


# ------------------------------------------------------------------------------------------
# the files: exactly what FSDP2 saves
# ------------------------------------------------------------------------------------------
def _globals(path: Path) -> set[str]:
    """The GLOBALs a torch.save file's pickle references (read statically)."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    out, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            out.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            out.add(f"{strings[-2]}.{strings[-1]}")
    return out


def _mesh_state(dt) -> dict:
    state = {k: v for k, v in dt.device_mesh.__getstate__().items() if k != "_hash"}
    state["_rank_map"] = state["_rank_map"].tolist()
    state["_layout"] = repr(state["_layout"])
    return state


def test_files_are_what_fsdp2_saves(resharded, fsdp_ckpts):
    from torch.distributed.tensor import DTensor

    real = fsdp_ckpts["critic_w3"]  # a real FSDP2 save at W=3
    _, out = resharded["w2_to_3"]
    src = fsdp_ckpts["w2"]
    for r in range(3):
        for kind in ("model", "optim"):
            mine = out / f"{kind}_world_size_3_rank_{r}.pt"
            assert _globals(mine) <= _globals(real.file(kind, r)), kind
        sd = torch.load(out / f"model_world_size_3_rank_{r}.pt", weights_only=True)
        real_sd = torch.load(real.file("model", r), weights_only=True)
        assert isinstance(sd, type(real_sd)) and list(sd) == src.meta["state_keys"]
        dt = sd["model.embed_tokens.weight"]
        real_dt = real_sd["model.embed_tokens.weight"]
        assert _mesh_state(dt) == _mesh_state(real_dt)  # rank, coordinates, group names, layout
        assert dt._spec.placements == real_dt._spec.placements
        assert dt._spec.shard_order == real_dt._spec.shard_order
        assert dt._spec.tensor_meta == real_dt._spec.tensor_meta  # global shape, stride, dtype
        assert dt.requires_grad is real_dt.requires_grad is False
        for key, value in sd.items():
            if key in src.meta["buffer_keys"]:
                assert type(value) is torch.Tensor
                continue
            n = src.meta["global_shapes"][key][0]
            start, stop = chunk_range(n, 3, r)
            assert isinstance(value, DTensor) and value._local_tensor.shape[0] == stop - start, key
        osd = torch.load(out / f"optim_world_size_3_rank_{r}.pt", weights_only=True)
        real_osd = torch.load(real.file("optim", r), weights_only=True)
        assert set(osd) == set(real_osd) == {"state", "param_groups"}
        assert sorted(osd["state"]) == list(range(len(src.meta["param_names"])))
        assert osd["param_groups"] == torch.load(src.file("optim", 0), weights_only=True)["param_groups"]
        st = osd["state"][0]
        assert type(st["step"]) is torch.Tensor and isinstance(st["exp_avg"], DTensor)
        assert _mesh_state(st["exp_avg"]) == _mesh_state(real_osd["state"][0]["exp_avg"])
    cfg = json.loads((out / "fsdp_config.json").read_text())
    assert cfg == {"fsdp_strategy": "fsdp2", "world_size": 3}
    for f in (src.path / "huggingface").iterdir():
        assert (out / "huggingface" / f.name).read_bytes() == f.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{k}_world_size_3_rank_{r}.pt" for k in ("model", "optim", "extra_state") for r in range(3)]
        + ["fsdp_config.json", "huggingface", "ckptctl-output.json"])

    # W=1 from a sharded source: a 1-rank mesh, as fully_shard on one GPU saves it
    sd1 = torch.load(resharded["w2_to_1"][1] / "model_world_size_1_rank_0.pt", weights_only=True)
    real1 = torch.load(fsdp_ckpts["w1_mesh"].file("model", 0), weights_only=True)
    assert _mesh_state(sd1["lm_head.weight"]) == _mesh_state(real1["lm_head.weight"])
    # tied weights stay one object (as state_dict() returns them)
    sdt = torch.load(resharded["w3_tied_to_2"][1] / "model_world_size_2_rank_1.pt", weights_only=True)
    assert sdt["lm_head.weight"] is sdt["model.embed_tokens.weight"]
    # empty trailing shard
    sdc = torch.load(resharded["critic_w3_to_2"][1] / "model_world_size_2_rank_1.pt", weights_only=True)
    assert tuple(sdc["value_head.weight"]._local_tensor.shape) == (0, 64)


@pytest.mark.parametrize("case", ["w2_to_3", "critic_w3_to_2", "hsdp_to_2", "w1_to_2", "w2_to_1", "lora_w2_to_3"])
def test_reader_reads_back_the_same_tensors(case, resharded, fsdp_ckpts):
    variant, w = CASES[case][:2]
    summary, out = resharded[case]
    a = FsdpReader(open_store(str(fsdp_ckpts[variant].path)))
    b = FsdpReader(open_store(str(out)))
    infos_a = {t.name: t for t in a.tensors()}
    infos_b = {t.name: t for t in b.tensors()}
    assert list(infos_a) == list(infos_b)
    assert b.world_size == w and b.summary()["world_size"] == w
    for name, info in infos_a.items():
        assert infos_b[name].shape == info.shape and infos_b[name].dtype == info.dtype
        assert torch.equal(a.read_tensor(name), b.read_tensor(name)), name
    mesh = b.summary()["mesh"]
    assert mesh == {"shape": [w], "dim_names": ["fsdp"]}
    comp = summary.components[0]
    assert (comp.source_world_size, comp.world_size, comp.optimizer) == (fsdp_ckpts[variant].world_size, w,
                                                                         "resharded")
    if variant == "hsdp":
        assert any("HSDP" in m for m in summary.warnings)


# ------------------------------------------------------------------------------------------
# variants and refusals
# ------------------------------------------------------------------------------------------
def test_verl_variant_keeps_its_config_and_extra_state(fsdp_ckpts, tmp_path):
    src = fsdp_ckpts["verl"]
    out = tmp_path / "out"
    reshard_fsdp(str(src.path), str(out), world_size=3)
    assert json.loads((out / "fsdp_config.json").read_text()) == {"FSDP_version": 2, "world_size": 3}
    extra = load_pt(str(out / "extra_state_world_size_3_rank_2.pt"))
    assert set(extra) == {"lr_scheduler", "rng"}  # no world_size/rank fields to rewrite


def test_fsdp1_optimizer_is_refused_unless_dropped(fsdp_ckpts, tmp_path):
    src = fsdp_ckpts["fsdp1"]
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="--drop-optimizer"):
        reshard_fsdp(str(src.path), str(out), world_size=3)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing was written
    summary = reshard_fsdp(str(src.path), str(out), world_size=3, drop_optimizer=True)
    assert summary.optimizer == "dropped"
    names = sorted(p.name for p in out.iterdir())
    assert not any(n.startswith("optim_") for n in names)
    assert [n for n in names if n.startswith(("model_", "extra_state_"))] == sorted(
        f"{k}_world_size_3_rank_{r}.pt" for k in ("model", "extra_state") for r in range(3))
    assert json.loads((out / "fsdp_config.json").read_text()) == {"fsdp_strategy": "fsdp", "world_size": 3}
    a, b = FsdpReader(open_store(str(src.path))), FsdpReader(open_store(str(out)))
    model = [t.name for t in a.tensors() if t.group == "model"]
    assert [t.name for t in b.tensors()] == model
    for name in model:
        assert torch.equal(a.read_tensor(name), b.read_tensor(name)), name
    comp = classify_component(open_store(str(tmp_path)), "out", "out", open_store(str(out)).walk())
    assert comp.complete and not comp.has_optimizer and comp.world_size == 3  # model-only, consistent


def test_device_type_of_target_meshes(fsdp_ckpts, resharded, tmp_path):
    """FSDP2 loads a DTensor only into a parameter on an EQUAL mesh, device type included: the
    target meshes take the source mesh's device type ("cpu" for these gloo fixtures, "cuda" for
    a GPU run), "cuda" for a plain source unless told."""
    sd = torch.load(resharded["w2_to_3"][1] / "model_world_size_3_rank_0.pt", weights_only=True)
    assert sd["lm_head.weight"].device_mesh.device_type == "cpu"
    summary = reshard_fsdp(str(fsdp_ckpts["w1"].path), str(tmp_path / "a"), world_size=2)
    assert summary.components[0].target_mesh == {"shape": [2], "dim_names": ["fsdp"], "device_type": "cuda"}
    assert any("device type" in w for w in summary.warnings)
    sd = torch.load(tmp_path / "a" / "model_world_size_2_rank_1.pt", weights_only=True)
    assert sd["lm_head.weight"].device_mesh.device_type == "cuda"
    reshard_fsdp(str(fsdp_ckpts["w2"].path), str(tmp_path / "b"), world_size=2, device_type="cuda")
    osd = torch.load(tmp_path / "b" / "optim_world_size_2_rank_0.pt", weights_only=True)
    assert osd["state"][0]["exp_avg"].device_mesh.device_type == "cuda"
    with pytest.raises(UsageError, match="device type"):
        reshard_fsdp(str(fsdp_ckpts["w2"].path), str(tmp_path / "c"), world_size=2, device_type="cu da")


def test_reshard_runs_with_one_intra_op_thread(fsdp_ckpts, tmp_path, monkeypatch):
    """As export-hf: one intra-op thread while convert-reshard runs, the caller's setting back
    afterwards."""
    from ckptctl.ops.reshard import convert_reshard

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        seen = set()
        convert_reshard(str(fsdp_ckpts["w2"].path), str(tmp_path / "out"), world_size=3,
                        progress=lambda d, t: seen.add(torch.get_num_threads()))
        assert seen == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_refusals(fsdp_ckpts, fsdp_tree, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="ShardedTensor"):
        reshard_fsdp(str(fsdp_ckpts["fsdp1_sharded"].path), str(out), world_size=2, drop_optimizer=True)
    with pytest.raises(UsageError, match="single-file"):
        reshard_fsdp(str(fsdp_ckpts["documented"].path), str(out), world_size=2)
    with pytest.raises(UsageError, match="checkpoint tree"):
        reshard_fsdp(str(fsdp_tree), str(out), world_size=2)
    with pytest.raises(UsageError, match="positive"):
        reshard_fsdp(str(fsdp_ckpts["w2"].path), str(out), world_size=0)
    assert not out.exists()


# ------------------------------------------------------------------------------------------
# output safety
# ------------------------------------------------------------------------------------------
def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}{TMP_INFIX}"))


def test_destination_safety(fsdp_ckpts, tmp_path):
    src = tmp_path / "step" / "policy"
    shutil.copytree(fsdp_ckpts["w2"].path, src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        reshard_fsdp(str(src), str(out), world_size=3)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(UsageError, match="inside the source"):
        reshard_fsdp(str(src), str(src / "w3"), world_size=3)
    with pytest.raises(UsageError, match="contains the source"):
        reshard_fsdp(str(src), str(tmp_path / "step"), world_size=3)
    with pytest.raises(UsageError, match="refusing to overwrite files that no convert-reshard output has"):
        reshard_fsdp(str(src), str(out), world_size=3, overwrite=True)  # --overwrite never deletes keep.txt
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    reshard_fsdp(str(src), str(out), world_size=2)
    summary = reshard_fsdp(str(src), str(out), world_size=3, overwrite=True)  # its own earlier output
    assert summary.replaced.startswith("an earlier convert-reshard output")
    assert (out / "model_world_size_3_rank_0.pt").exists() and leftovers(out) == []


_KILLER = """
import os, signal, sys
from ckptctl.ops.reshard_fsdp import reshard_fsdp
frac = float(os.environ["KILL_AT"])
def progress(done, total):
    if done >= frac * total:
        os.kill(os.getpid(), signal.SIGKILL)
reshard_fsdp(sys.argv[1], sys.argv[2], world_size=int(sys.argv[3]), progress=progress)
"""


def run_killed(src, out, world_size: int, kill_at: float) -> None:
    env = dict(os.environ, KILL_AT=str(kill_at), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(src), str(out), str(world_size)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def test_killed_local_run_leaves_nothing_then_rerun_succeeds(fsdp_ckpts, tmp_path):
    out = tmp_path / "out"
    run_killed(fsdp_ckpts["w2"].path, out, 3, kill_at=0.7)
    assert not out.exists() and len(leftovers(out)) == 1  # a temp sibling naming a dead pid
    summary = reshard_fsdp(str(fsdp_ckpts["w2"].path), str(out), world_size=3)
    assert summary.replaced is None and leftovers(out) == []
    assert FsdpReader(open_store(str(out))).world_size == 3


def test_step_to_s3_killed_rerun_then_s3_to_gcs(fsdp_tree, make_backend):
    """A whole step: local -> S3 at W=3 (killed once: nothing complete-looking, then the rerun
    replaces the leftovers without --overwrite), then S3 -> GCS at W=2; every tensor as in the
    source, data.pt / trainer_state.pt byte-identical."""
    s3, gs = make_backend("s3"), make_backend("gs")
    src = fsdp_tree / "global_step_4"
    mid = s3.new_root() + "/global_step_4"
    run_killed(src, mid, 3, kill_at=0.8)  # in critic/, after policy/'s rank files went up
    left = s3.list_files(mid)
    assert INCOMPLETE_MARKER in left and any(f.startswith("policy/optim_world_size_3") for f in left)
    assert "trainer_state.pt" not in left and "policy/model_world_size_3_rank_0.pt" not in left
    assert not scan_step(open_store(mid)).complete
    summary = reshard_fsdp(str(src), mid, world_size=3)
    assert summary.kind == "step" and summary.replaced == "interrupted" and summary.step == 4
    assert [c.name for c in summary.components] == ["policy", "critic"]
    step = scan_step(open_store(mid))
    assert step.complete and step.components["policy"].world_size == 3
    assert INCOMPLETE_MARKER not in s3.list_files(mid)

    dst = gs.new_root() + "/global_step_4"
    summary = reshard_fsdp(mid + "/critic", dst, world_size=2)
    assert summary.kind == "component"
    a = FsdpReader(open_store(str(src / "critic")))
    b = FsdpReader(open_store(dst))
    assert b.world_size == 2
    for info in a.tensors():
        assert torch.equal(a.read_tensor(info.name), b.read_tensor(info.name)), info.name
    for name in ("data.pt", "trainer_state.pt"):
        assert s3.get(f"{mid}/{name}") == (src / name).read_bytes()
