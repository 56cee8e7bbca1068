"""``convert-reshard`` of MoE distributed-optimizer state between EP > 1 and EP 1, proved by
megatron-core's own DistributedOptimizer.

megatron-core 0.16 chains a dense (``chained_0.``) and an expert (``chained_1.``) optimizer only
when experts are expert-parallel (EP > 1); at EP 1 it builds ONE optimizer, whose keys carry no
prefix and whose ``common.pt`` record is one optimizer's. Each case reshards a real fixture of
:mod:`realckpt.distopt_writer` (written by megatron-core's own DDP + DistributedOptimizer, 2 Adam
steps) to EP 1, or that EP 1 output back to EP > 1, then the step oracle
(:func:`realckpt.distopt_writer.run_next_step`) builds megatron's model + DistributedOptimizer at
the target, loads the output in the format its ``common.pt`` declares, and:

* the loaded fp32 params and Adam moments equal the source's ground truth exactly (the
  fully_reshardable twin's full tensors; keys compared without the chain prefix, which the
  target's optimizer structure decides);
* one more step equals the same step taken at the source layout (loss within rel 1e-5, every
  parameter and moment within 1e-5).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from ckptctl.ops.reshard import convert_reshard  # noqa: E402
from realckpt.distopt_writer import next_step_job, read_full_tensors, run_next_step  # noqa: E402

SOURCES = ("moe_tp2ep2dp2_dp_reshardable", "moe_tp2ep2dp2_fully_reshardable")
#: name -> (source fixture or earlier case, tp, pp, dp, ep, etp)
CASES = {
    "dpres-to-ep1": ("moe_tp2ep2dp2_dp_reshardable", 1, 1, 2, 1, 1),
    "full-to-ep1": ("moe_tp2ep2dp2_fully_reshardable", 1, 1, 2, 1, 1),
    "dpres-to-ep1-then-ep2": ("dpres-to-ep1", 1, 1, 4, 2, 1),  # one optimizer split into the chain again
    "full-to-ep1-then-tp2ep2": ("full-to-ep1", 2, 1, 2, 2, 1),
}


def _fixture_of(name: str) -> str:
    while name in CASES:
        name = CASES[name][0]
    return name


def _bare(tensors: dict) -> dict:
    return {re.sub(r"^chained_\d+\.", "", k): v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def stepped(distopt_ckpts, tmp_path_factory):
    distopt = distopt_ckpts
    work = tmp_path_factory.mktemp("optimizer_chain")
    summaries, jobs = {}, []
    for name, (source, tp, pp, dp, ep, etp) in CASES.items():
        if source in CASES:
            src = work / source / "out"
        else:
            src = Path(shutil.copytree(distopt[source] / "checkpoint", work / name / "source"))
        summaries[name] = convert_reshard(str(src), str(work / name / "out"), tp=tp, pp=pp, dp=dp, ep=ep,
                                          etp=etp).to_dict()
        jobs.append(next_step_job(_fixture_of(name), work / name / "out", work / name / "next_step", tp=tp, pp=pp,
                                  dp=dp, ep=ep, etp=etp))
    for source in SOURCES:  # the reference step at the source layout (cached beside the fixture)
        jobs.append(next_step_job(source, distopt[source] / "checkpoint", distopt[source] / "next_step", tp=2, pp=1,
                                  dp=2, ep=2, cache=True))
    return dict(results=run_next_step(jobs), summaries=summaries, work=work, distopt=distopt)


@pytest.mark.parametrize("name", list(CASES))
def test_megatron_loads_the_restructured_optimizer_and_the_next_step_matches(stepped, name):
    source, _, _, _, ep, _ = CASES[name]
    fixture = _fixture_of(name)
    res = stepped["results"][str(stepped["work"] / name / "next_step")]
    ref = stepped["results"][str(stepped["distopt"][fixture] / "next_step")]
    assert res["errors"] == [] and ref["errors"] == [], (res["errors"] or ref["errors"])[0][-3000:]
    s = stepped["summaries"][name]
    assert s["optimizer"] == "resharded" and s["dropped"] == {}
    assert any(f"optimizer state keyed for EP {ep}" in w for w in s["warnings"])
    assert res["format"] == "fully_reshardable"
    assert res["steps_loaded"] == [2.0] and res["steps_after"] == [3.0]
    truth = read_full_tensors(stepped["distopt"][fixture.replace("_dp_reshardable", "_fully_reshardable")]
                              / "checkpoint")
    loaded = read_full_tensors(res["loaded"])
    # megatron's own save at the target keys its optimizer as the target's chain is
    assert all(k.startswith("chained_") for k in loaded if ".optimizer." in f".{k}") == (ep > 1)
    truth, loaded = _bare(truth), _bare(loaded)
    assert set(loaded) == set(truth)
    assert [k for k, t in truth.items() if not torch.equal(loaded[k], t)] == []
    for loss in res["losses"]:
        assert loss == pytest.approx(ref["losses"][0], rel=1e-5)
    got, want = _bare(read_full_tensors(res["stepped"])), _bare(read_full_tensors(ref["stepped"]))
    assert set(got) == set(want)
    off = {k: float((got[k] - want[k]).abs().max()) for k in want}
    assert {k: d for k, d in off.items() if not d <= 1e-5} == {}
