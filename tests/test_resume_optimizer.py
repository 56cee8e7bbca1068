"""resolve-resume: does the chosen step's optimizer state load at the run's parallelism? (issue #10)

On the REAL megatron-core DistributedOptimizer checkpoints (:mod:`realckpt.distopt_writer`:
dense TP1/TP2/PP2 x DP2 and MoE TP2xEP2 / PP2xEP2 x DP2, ``dp_reshardable`` and
``fully_reshardable``), placed in SkyRL trees whose ``trainer_state.pt`` holds SkyRL's config
(``trainer.policy.megatron_config.*_parallel_size``, ``trainer.placement``) -- the layout the job
ran at, or another one. megatron-core reloads ``dp_reshardable`` state only at the TP/PP/EP it
was written at (it asserts its per-bucket sizes), the per-parameter format anywhere.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from cli_runner import run, run_json  # noqa: E402
from distopt_tree import job_of, skyrl_config, skyrl_tree  # noqa: E402
from test_light_imports import heavy_modules_after  # noqa: E402

NAMES = ["dense_tp1dp2", "dense_tp2dp2", "dense_pp2dp2", "moe_tp2ep2dp2", "moe_pp2ep2dp2"]
ALL = [f"{n}_{f}" for n in NAMES for f in ("dp_reshardable", "fully_reshardable")]


@pytest.fixture(scope="module")
def fixtures(distopt_ckpts) -> dict[str, Path]:
    return distopt_ckpts


def _moe(job: dict) -> bool:
    return job["model"].get("moe") is not None


def _other_layout(job: dict) -> dict:
    """A layout that differs from the job's in TP (and EP for MoE), on as many GPUs."""
    tp = 1 if job["tp"] > 1 else 2
    out = dict(tp=tp, pp=job["pp"], gpus=job["world_size"])
    if _moe(job):
        out.update(ep=1 if job["ep"] > 1 else 2, etp=tp)
    return out


@pytest.mark.parametrize("name", ALL)
def test_the_run_s_own_layout_loads(fixtures, name, tmp_path):
    job = job_of(fixtures[name])
    skyrl_tree(fixtures[name], tmp_path / "t")
    doc = run_json("resolve-resume", tmp_path / "t")
    assert doc["resumable"] and doc["problems"] == []
    (fit,) = doc["optimizer"]
    assert fit["component"] == "policy" and fit["format"] == job["format"]
    assert fit["loadable"] is True and fit["convert"] is None
    expected = {"tp": job["tp"], "pp": job["pp"]}
    if _moe(job):
        expected.update(ep=job["ep"], etp=job["etp"])
    run_layout = fit["run"]
    assert {k: run_layout[k] for k in expected} == expected
    assert run_layout["world_size"] == job["world_size"]
    assert run_layout["dp"] == job["world_size"] // (job["tp"] * job["pp"])
    if job["format"] == "dp_reshardable":  # the layout read from the chunks is the one megatron ran at
        assert {k: fit["checkpoint"][k] for k in expected} == expected
        assert fit["checkpoint"]["dp"] == run_layout["dp"]


@pytest.mark.parametrize("name", NAMES)
def test_dp_reshardable_at_another_tp_or_ep_does_not_load(fixtures, name, tmp_path):
    fixture = fixtures[f"{name}_dp_reshardable"]
    job = job_of(fixture)
    other = _other_layout(job)
    step = skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, **other))
    doc = run_json("resolve-resume", tmp_path / "t", expect=6)
    (fit,) = doc["optimizer"]
    assert fit["loadable"] is False and not doc["resumable"]
    assert (fit["run"]["tp"], fit["run"]["pp"]) == (other["tp"], other["pp"])
    # the exact command that rewrites it for the run's layout, into a sibling tree
    dp = other["gpus"] // (other["tp"] * other["pp"])
    suffix = f"tp{other['tp']}pp{other['pp']}" + (f"ep{other['ep']}etp{other['etp']}" if _moe(job) else "")
    target = f"{tmp_path / 't'}-{suffix}/global_step_2"
    args = ["ckptctl", "convert-reshard", f"{step}/policy", "--out", f"{target}/policy", "--tp", str(other["tp"]),
            "--pp", str(other["pp"]), "--dp", str(dp)]
    if _moe(job):
        args += ["--ep", str(other["ep"]), "--etp", str(other["etp"])]
    assert shlex.split(fit["convert"]) == args
    assert shlex.split(fit["drop"]) == args + ["--drop-optimizer"]
    assert fit["resume_path"] == target
    # convert-reshard writes the moved moments as fully_reshardable: the run must load that format
    assert fit["overrides"] == ["trainer.resume_mode=from_path", f"trainer.resume_path={target}",
                                "trainer.policy.megatron_config.dist_ckpt_optim_fully_reshardable=true"]
    assert fit["convert"] in doc["reason"] and "--drop-optimizer" in doc["reason"]
    code, out, err = run("resolve-resume", tmp_path / "t")
    assert code == 6 and "loads with the run's config: no" in out and "not resumable" in err


def test_the_printed_drop_command_runs(fixtures, tmp_path):
    fixture = fixtures["dense_tp2dp2_dp_reshardable"]
    job = job_of(fixture)
    skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, tp=1, gpus=2))
    (fit,) = run_json("resolve-resume", tmp_path / "t", expect=6)["optimizer"]
    args = shlex.split(fit["drop"])
    doc = run_json(*args[1:])
    assert doc["optimizer"] == "dropped"
    assert Path(fit["resume_path"], "policy", ".metadata").is_file()


@pytest.mark.parametrize("name", ["dense_pp2dp2", "moe_tp2ep2dp2"])
def test_dp_only_changes_load(fixtures, name, tmp_path):
    fixture = fixtures[f"{name}_dp_reshardable"]
    job = job_of(fixture)
    skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, gpus=2 * job["world_size"]))
    doc = run_json("resolve-resume", tmp_path / "t")
    (fit,) = doc["optimizer"]
    assert fit["loadable"] is True and doc["resumable"]
    assert f"DP{fit['checkpoint']['dp']} to DP{2 * fit['checkpoint']['dp']}" in fit["reason"]


@pytest.mark.parametrize("name", NAMES)
def test_fully_reshardable_loads_at_any_layout(fixtures, name, tmp_path):
    fixture = fixtures[f"{name}_fully_reshardable"]
    job = job_of(fixture)
    skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, **_other_layout(job)))
    doc = run_json("resolve-resume", "--mode", "from_path", "--resume-path", tmp_path / "t" / "global_step_2")
    (fit,) = doc["optimizer"]
    assert fit["loadable"] is True and fit["format"] == "fully_reshardable" and doc["resumable"]


@pytest.mark.parametrize("name", ["dense_tp2dp2", "moe_pp2ep2dp2"])
def test_the_run_must_load_the_format_the_checkpoint_holds(fixtures, name, tmp_path):
    """megatron-core loads through a template of the format the run is configured for
    (``dist_ckpt_optim_fully_reshardable``): the other format's keys are not there."""
    for fmt, flag in (("fully_reshardable", "true"), ("dp_reshardable", "false")):
        fixture = fixtures[f"{name}_{fmt}"]
        config = skyrl_config(job_of(fixture))
        mc = config["trainer"]["policy"]["megatron_config"]
        mc["dist_ckpt_optim_fully_reshardable"] = not mc["dist_ckpt_optim_fully_reshardable"]
        skyrl_tree(fixture, tmp_path / fmt, config=config)
        doc = run_json("resolve-resume", tmp_path / fmt, expect=6)
        (fit,) = doc["optimizer"]
        override = f"trainer.policy.megatron_config.dist_ckpt_optim_fully_reshardable={flag}"
        assert fit["loadable"] is False and fit["overrides"] == [override] and fit["convert"] is None
        assert fit["run"]["optimizer_format"] != fmt and override in doc["reason"]
        # the name a newer SkyRL config uses instead of the flag
        del mc["dist_ckpt_optim_fully_reshardable"]
        mc["optimizer_checkpoint_sharding_type"] = fmt
        skyrl_tree(fixture, tmp_path / f"{fmt}-named", config=config)
        assert run_json("resolve-resume", tmp_path / f"{fmt}-named")["optimizer"][0]["loadable"] is True


def test_omegaconf_config_of_skyrl_0_3_1(fixtures, tmp_path):
    fixture = fixtures["moe_pp2ep2dp2_dp_reshardable"]
    job = job_of(fixture)
    skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, pp=1, gpus=4), config_kind="omegaconf")
    (fit,) = run_json("resolve-resume", tmp_path / "t", expect=6)["optimizer"]
    assert fit["loadable"] is False and fit["run"]["pp"] == 1 and fit["checkpoint"]["pp"] == 2


def test_unknown_run_parallelism_is_said_not_guessed(fixtures, tmp_path):
    fixture = fixtures["dense_tp2dp2_dp_reshardable"]
    skyrl_tree(fixture, tmp_path / "a", config={"trainer": {"strategy": "megatron"}})
    doc = run_json("resolve-resume", tmp_path / "a")
    (fit,) = doc["optimizer"]
    assert fit["loadable"] is None and fit["run"] is None and doc["resumable"]
    assert "trainer.policy.megatron_config" in fit["reason"]
    # a config ckptctl will not unpickle (a class outside its allowlist): a warning naming it
    step = skyrl_tree(fixture, tmp_path / "b")
    import torch

    torch.save({"global_step": 2, "config": Path("/x")}, step / "trainer_state.pt")
    doc = run_json("resolve-resume", tmp_path / "b")
    assert doc["optimizer"][0]["loadable"] is None and doc["resumable"]
    assert any("parallelism is unknown" in w and "PosixPath" in w for w in doc["warnings"]), doc["warnings"]


def test_stays_light_on_a_megatron_tree(fixtures, tmp_path):
    fixture = fixtures["moe_tp2ep2dp2_dp_reshardable"]
    job = job_of(fixture)
    skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, tp=1), config_kind="omegaconf")
    assert heavy_modules_after(["resolve-resume", str(tmp_path / "t"), "--json"]) == []


def test_in_object_stores(fixtures, store_backend, tmp_path):
    fixture = fixtures["moe_tp2ep2dp2_dp_reshardable"]
    job = job_of(fixture)
    skyrl_tree(fixture, tmp_path / "t", config=skyrl_config(job, ep=1, etp=2), config_kind="omegaconf")
    url = store_backend.new_root().rstrip("/") + "/ckpts"
    store_backend.upload_dir(str(tmp_path / "t"), url)
    doc = run_json("resolve-resume", url, expect=6)
    (fit,) = doc["optimizer"]
    assert fit["loadable"] is False and fit["checkpoint"]["ep"] == 2 and fit["run"]["ep"] == 1
    assert shlex.split(fit["convert"])[2:4] == [f"{url}/global_step_2/policy", "--out"]
    assert fit["resume_path"] == f"{url}-tp2pp1ep1etp2/global_step_2"


def test_fallback_never_names_a_step_whose_optimizer_state_cannot_load(fixtures, tmp_path):
    """The pointer names a damaged step; the older one loads only if its layout fits the run."""
    fixture = fixtures["dense_tp2dp2_dp_reshardable"]
    job = job_of(fixture)
    for config, expect_fallback in ((skyrl_config(job), True), (skyrl_config(job, tp=1, gpus=2), False)):
        root = tmp_path / ("fits" if expect_fallback else "other")
        skyrl_tree(fixture, root, step=1, config=config)
        newest = skyrl_tree(fixture, root, step=2, config=config)
        (newest / "policy" / "__1_0.distcp").unlink()
        doc = run_json("resolve-resume", root, "--fallback", expect=0 if expect_fallback else 6)
        assert doc["fallback"] == ({"resume_path": f"{root}/global_step_1", "step": 1,
                                    "overrides": ["trainer.resume_mode=from_path",
                                                  f"trainer.resume_path={root}/global_step_1"]}
                                   if expect_fallback else None)
