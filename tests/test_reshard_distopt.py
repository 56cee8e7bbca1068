"""``convert-reshard`` of REAL megatron-core distributed-optimizer checkpoints (issue #10),
proved by megatron-core itself.

Each case runs ckptctl's library function (:func:`ckptctl.ops.reshard.convert_reshard`) on a copy
of a fixture written by megatron-core 0.16.1's own DDP + DistributedOptimizer
(:mod:`realckpt.distopt_writer`, 2 Adam steps), then the step oracle
(:func:`realckpt.distopt_writer.run_next_step`, one launcher for every case, one forked gloo
process per rank) builds the same model + DDP + DistributedOptimizer at the TARGET layout, loads
the output with ``dist_checkpointing.load`` in the format its ``common.pt`` declares (as a resumed
run does), and:

* the loaded state, gathered by megatron into full per-parameter tensors (a ``fully_reshardable``
  snapshot), must equal the source's ground truth bit for bit: the full tensors megatron wrote
  into the source's ``fully_reshardable`` twin (same run, same layout: the twins train
  bit-identically; the writer's reload check proves each rank's shards);
* ONE more training step on the batch the source run would have used next must match the same
  step taken at the SOURCE layout from the source checkpoint (cached beside the fixture): loss
  within rel 1e-5, every parameter and Adam moment within atol 1e-5.

Cases: (a) DP-only changes of ``dp_reshardable`` (ckptctl copies the flat buckets as is; megatron
re-splits them over the new DP); (b) TP / PP / EP changes of ``fully_reshardable``; (c) TP / PP / EP
changes of ``dp_reshardable`` (ckptctl maps the buckets back to parameters).  MoE targets keep
EP > 1 here; EP > 1 <-> EP 1 (where megatron-core's optimizer chain changes shape) is
``tests/test_reshard_optimizer_chain.py``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from ckptctl.errors import UsageError  # noqa: E402
from ckptctl.ops.reshard import convert_reshard  # noqa: E402
from realckpt.distopt_writer import (DISTOPT_VARIANTS, LAYOUTS, next_step_job,  # noqa: E402
                                     read_full_tensors, run_next_step)

LOSS_RTOL = 1e-5
STATE_ATOL = 1e-5


class Case(NamedTuple):
    name: str
    source: str  # a fixture of realckpt.distopt_writer.DISTOPT_VARIANTS
    tp: int
    pp: int
    dp: int
    ep: int | None = None  # MoE only
    etp: int | None = None

    @property
    def kind(self) -> str:
        layout = LAYOUTS[DISTOPT_VARIANTS[self.source][0]]
        same_mp = (self.tp, self.pp, self.ep or 1, self.etp or 1) == (layout[0], layout[1], layout[2], 1)
        return "dp-only" if same_mp else "fully_reshardable" if "fully" in self.source else "dp_reshardable"


CASES = [
    # (a) DP-only changes of dp_reshardable
    Case("dense-tp2dp2-dpres-to-dp1", "dense_tp2dp2_dp_reshardable", 2, 1, 1),
    Case("dense-tp1dp2-dpres-to-dp4", "dense_tp1dp2_dp_reshardable", 1, 1, 4),
    Case("dense-pp2dp2-dpres-to-dp1", "dense_pp2dp2_dp_reshardable", 1, 2, 1),
    Case("moe-tp2ep2dp2-dpres-to-dp1", "moe_tp2ep2dp2_dp_reshardable", 2, 1, 1, ep=2, etp=1),
    # (b) TP / PP / EP changes of fully_reshardable: two (tests/test_distopt_layout.py shows that a
    # dp_reshardable source and its fully_reshardable twin reshard to the same bytes)
    Case("dense-tp2dp2-full-to-tp1", "dense_tp2dp2_fully_reshardable", 1, 1, 2),
    Case("moe-tp2ep2dp2-full-to-etp2", "moe_tp2ep2dp2_fully_reshardable", 2, 1, 2, ep=2, etp=2),
    # (c) TP / PP / EP changes of dp_reshardable
    Case("dense-tp2dp2-dpres-to-tp1", "dense_tp2dp2_dp_reshardable", 1, 1, 2),
    Case("dense-pp2dp2-dpres-to-pp1", "dense_pp2dp2_dp_reshardable", 1, 1, 2),
    Case("moe-tp2ep2dp2-dpres-to-tp1", "moe_tp2ep2dp2_dp_reshardable", 1, 1, 2, ep=2, etp=1),
    Case("moe-tp2ep2dp2-dpres-to-tp1ep4", "moe_tp2ep2dp2_dp_reshardable", 1, 1, 4, ep=4, etp=1),
    Case("moe-tp2ep2dp2-dpres-to-etp2", "moe_tp2ep2dp2_dp_reshardable", 2, 1, 2, ep=2, etp=2),
    Case("moe-pp2ep2dp2-dpres-to-pp1", "moe_pp2ep2dp2_dp_reshardable", 1, 1, 2, ep=2, etp=1),
]
BY_NAME = {c.name: c for c in CASES}


#: the negative control loads this case's output, then halves its exp_avg
CONTROL_CASE = "dense-tp2dp2-full-to-tp1"


def _twin(source: str) -> str:
    return source.replace("_dp_reshardable", "_fully_reshardable")


@pytest.fixture(scope="module")
def distopt(distopt_ckpts):
    return distopt_ckpts


@pytest.fixture(scope="module")
def proved(distopt, tmp_path_factory):
    """Reshard every case, then ONE oracle launcher: each output at its target layout and each
    source at its own layout (the reference step, cached beside the fixture)."""
    work = tmp_path_factory.mktemp("reshard_distopt")
    summaries, refusals, jobs, reshard_seconds = {}, {}, [], {}
    for c in CASES:
        src = work / c.name / "source"
        shutil.copytree(distopt[c.source] / "checkpoint", src)
        t0 = time.monotonic()
        try:
            summaries[c.name] = convert_reshard(str(src), str(work / c.name / "out"), tp=c.tp, pp=c.pp, dp=c.dp,
                                                ep=c.ep, etp=c.etp).to_dict()
        except UsageError as e:
            refusals[c.name] = str(e)
            continue
        reshard_seconds[c.name] = round(time.monotonic() - t0, 2)
        jobs.append(next_step_job(c.source, work / c.name / "out", work / c.name / "next_step", tp=c.tp, pp=c.pp,
                                  dp=c.dp, ep=c.ep or 1, etp=c.etp or 1))
    control = BY_NAME[CONTROL_CASE]
    jobs.append(next_step_job(control.source, work / control.name / "out", work / "control", tp=control.tp,
                              pp=control.pp, dp=control.dp, control="halve_exp_avg"))
    for source in sorted({c.source for c in CASES}):
        tp, pp, ep, world, _ = LAYOUTS[DISTOPT_VARIANTS[source][0]]
        jobs.append(next_step_job(source, distopt[source] / "checkpoint", distopt[source] / "next_step", tp=tp,
                                  pp=pp, dp=world // (tp * pp), ep=ep, cache=True))
    t0 = time.monotonic()
    results = run_next_step(jobs)
    cached = sum(r["cached"] for r in results.values())
    print(f"\nreshard seconds {reshard_seconds}; step oracle {time.monotonic() - t0:.1f}s for {len(jobs)} jobs "
          f"({cached} reference steps cached); per job (rank 0): "
          f"{ {Path(k).parent.name if 'next_step' in k else k: v['seconds'] for k, v in results.items()} }")
    return dict(summaries=summaries, refusals=refusals, results=results, work=work, distopt=distopt)


def _reference(proved, source: str) -> dict:
    ref = proved["results"][str(proved["distopt"][source] / "next_step")]
    assert ref["errors"] == [], ref["errors"][0]
    return ref


def _target(proved, case: Case) -> dict:
    if case.name in proved["refusals"]:
        pytest.fail(f"convert-reshard refused: {proved['refusals'][case.name]}")
    res = proved["results"][str(proved["work"] / case.name / "next_step")]
    assert res["errors"] == [], res["errors"][0]
    return res


@pytest.mark.parametrize("source", sorted({c.source for c in CASES}))
def test_reference_step_at_the_source_layout(proved, source):
    """The reference itself: megatron reloads the source at its own layout with the fixture's
    ground truth, and the step really trains (loss, params and moments move)."""
    ref = _reference(proved, source)
    assert ref["steps_loaded"] == [2.0] and ref["steps_after"] == [3.0]
    assert ref["losses"] and max(ref["losses"]) - min(ref["losses"]) <= LOSS_RTOL * abs(ref["losses"][0])
    truth = read_full_tensors(proved["distopt"][_twin(source)] / "checkpoint")
    loaded = read_full_tensors(ref["loaded"])
    assert set(loaded) == set(truth)
    for k, t in truth.items():
        assert torch.equal(loaded[k], t), k
    stepped = read_full_tensors(ref["stepped"])
    moved = [k for k in truth if not torch.equal(stepped[k], loaded[k])]
    assert any(".exp_avg." in k for k in moved) and any(".param." in k for k in moved)


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_megatron_loads_the_output_and_the_next_step_matches(proved, case):
    c = BY_NAME[case]
    res = _target(proved, c)
    ref = _reference(proved, c.source)
    s = proved["summaries"][case]
    # megatron loaded the format the output's common.pt declares, the one the summary names
    assert res["format"] == (s.get("optimizer_output_format") or s["optimizer_format"])
    assert res["steps_loaded"] == [2.0] and res["steps_after"] == [3.0]
    # the loaded Adam state and fp32 params equal the source's ground truth exactly
    truth = read_full_tensors(proved["distopt"][_twin(c.source)] / "checkpoint")
    loaded = read_full_tensors(res["loaded"])
    assert set(loaded) == set(truth)
    differ = [k for k, t in truth.items() if not torch.equal(loaded[k], t)]
    assert differ == [], f"{len(differ)} tensors differ from the source after megatron's load, e.g. {differ[:3]}"
    # one more step at the target equals the same step at the source layout
    assert res["losses"] and ref["losses"]
    for loss in res["losses"]:
        assert loss == pytest.approx(ref["losses"][0], rel=LOSS_RTOL)
    got, want = read_full_tensors(res["stepped"]), read_full_tensors(ref["stepped"])
    assert set(got) == set(want)
    worst = {k: float((got[k] - want[k]).abs().max()) for k in want}
    off = {k: d for k, d in worst.items() if not d <= STATE_ATOL}
    assert off == {}, f"after one step, {len(off)} tensors differ beyond {STATE_ATOL}: {sorted(off.items())[:3]}"


def test_negative_control_wrong_moments_are_caught(proved):
    """The same load and step, with exp_avg halved after the load: the loaded-state check and the
    next-step check both see it, while the loss (forward only) does not."""
    c = BY_NAME[CONTROL_CASE]
    res = proved["results"][str(proved["work"] / "control")]
    assert res["errors"] == [], res["errors"][0]
    truth = read_full_tensors(proved["distopt"][_twin(c.source)] / "checkpoint")
    loaded = read_full_tensors(res["loaded"])
    assert sorted(k for k, t in truth.items() if not torch.equal(loaded[k], t)) == sorted(
        k for k in truth if ".exp_avg." in k)
    ref = _reference(proved, c.source)
    assert res["losses"][0] == pytest.approx(ref["losses"][0], rel=LOSS_RTOL)
    got, want = read_full_tensors(res["stepped"]), read_full_tensors(ref["stepped"])
    assert max(float((got[k] - want[k]).abs().max()) for k in want if ".param." in k) > 100 * STATE_ATOL


@pytest.mark.parametrize("case", [c.name for c in CASES])
def test_summary_says_what_happened_to_the_optimizer(proved, case):
    c = BY_NAME[case]
    assert case not in proved["refusals"], proved["refusals"][case]
    s = proved["summaries"][case]
    assert s["target_layout"]["tp"] == c.tp and s["target_layout"]["pp"] == c.pp
    assert s["target_layout"]["world_size"] == c.tp * c.pp * c.dp
    assert s["optimizer_format"] == ("fully_reshardable" if "fully" in c.source else "dp_reshardable")
    assert s["optimizer"] == ("copied" if c.kind == "dp-only" else "resharded")
    assert s["dropped"] == {}
