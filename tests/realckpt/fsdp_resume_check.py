"""Resume a SkyRL FSDP component for real and take ONE more training step (test helper).

What SkyRL's ``FSDPStrategy.load_ckpt`` does, in real gloo processes on CPU: every rank builds
the same tiny model as :mod:`realckpt.fsdp_writer` (its ``_RankWriter._build`` / ``_wrap``:
``fully_shard`` per decoder layer, the untied embedding, the root, on a ``("fsdp",)`` or HSDP
mesh, or no FSDP at all for a plain W=1 run), loads ITS OWN rank files
(``model_world_size_{W}_rank_{R}.pt`` with ``load_state_dict(strict=True)``, the optimizer,
the LR scheduler from ``extra_state``, the RNG state), then takes one AdamW step
(clip_grad_norm 1.0, ``sched.step()``) on a batch that is the SAME on every rank, so the
global gradient does not depend on the world size.

Used to check that a resharded checkpoint resumes exactly like the original: run one job on
the original at its W and one on the resharded copy at the new W, compare the results.

API
---
:func:`resume_steps(jobs)` -- ``jobs`` = list of dicts::

    component   the component directory (per-rank files of world size ``world_size``)
    world_size  W to run at (the files' W)
    model       the writer job that made the checkpoint (``reference_meta.json``): arch,
                sizes, critic, seed, tie, lr, strategy, ...; ``mesh``/``replicas``/``w1_plain``
                say how to wrap at this W (defaults: 1-D "fsdp" mesh; W=1 plain)
    out         a directory for the results (created)

All jobs run in ONE launcher process (``python -m realckpt.fsdp_resume_check JOBFILE``: a
fresh interpreter pays the torch/transformers import once; each job's ranks are forked from
it and meet through a ``file://`` store). Returns, per job, a dict::

    loss, grad_norm             of the extra step (rank 0's; identical on every rank)
    lr, last_epoch              the scheduler after the step
    rng_draws                   per rank: {"cpu": torch.rand(4) drawn right after the RNG state
                                was loaded, "cuda": the saved CUDA RNG state} (which source
                                stream each rank resumed)
    before, after               {state-dict key: full tensor} as loaded / after the step
    optim_after                 {param name + "." + key: full tensor} after the step
    log                         the launcher's output (per-job timings)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from realckpt.fsdp_writer import _TESTS_DIR, _child_env, run_launcher, run_ranks

#: The fixed batch every rank trains on (and the critic's regression target).
BATCH_SEED = 4242
BATCH_SHAPE = (4, 12)


def resume_steps(jobs: list[dict], *, timeout: float = 240) -> list[dict]:
    """Run every job (see the module docstring); raise RuntimeError with the output on failure."""
    from safetensors.torch import load_file

    norm = []
    for job in jobs:
        j = dict(job)
        j["component"] = str(Path(j["component"]).resolve())
        j["out"] = str(Path(j["out"]).resolve())
        Path(j["out"]).mkdir(parents=True, exist_ok=True)
        norm.append(j)
    out = run_launcher("realckpt.fsdp_resume_check", {"jobs": norm}, timeout, "resume check")
    results = []
    for j in norm:
        d = Path(j["out"])
        res = json.loads((d / "result.json").read_text())
        for name in ("before", "after", "optim_after"):
            res[name] = load_file(str(d / f"{name}.safetensors"))
        res["log"] = out
        results.append(res)
    return results


# --------------------------------------------------------------------------------------
# launcher / ranks
# --------------------------------------------------------------------------------------

def _launcher_main(jobfile: str) -> int:
    spec = json.loads(Path(jobfile).read_text())
    os.environ.update(_child_env())
    import torch

    torch.set_num_threads(1)
    import torch.distributed.tensor  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.optimization  # noqa: F401

    from realckpt import tiny_models

    for arch in sorted({j["model"]["arch"] for j in spec["jobs"]}):
        tiny_models._model_classes(arch)
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # a fresh launcher without threads: forking is safe
    for i, job in enumerate(spec["jobs"]):
        t0 = time.perf_counter()
        w = job["world_size"]
        rdv = Path(spec["tmp"]) / f"rdv-{i}"
        rdv.mkdir()
        failed = run_ranks(ctx, _rank_entry, job, w, rdv, job.get("timeout", 120))
        if failed:
            print(f"[resume] job {i} ({job['component']} at W={w}) FAILED: {failed}", flush=True)
            return 1
        print(f"[resume] job {i} W={w} {job['component']}: {time.perf_counter() - t0:.2f}s", flush=True)
    return 0


def _rank_entry(job: dict, rank: int, rdv: str) -> None:
    os.environ.update(_child_env())
    if str(_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(_TESTS_DIR))
    _ResumeRank(job, rank, rdv).run()


class _ResumeRank:
    def __init__(self, job: dict, rank: int, rdv: str):
        from realckpt.fsdp_writer import DEFAULTS, _RankWriter

        self.job = job
        self.rank = rank
        self.w = job["world_size"]
        self.dir = Path(job["component"])
        self.out = Path(job["out"])
        model_job = {k: job["model"].get(k, v) for k, v in DEFAULTS.items()}
        model_job.update(world_size=self.w, mesh=job["model"].get("mesh_at_w", "fsdp"),
                         replicas=job["model"].get("replicas_at_w", DEFAULTS["replicas"]),
                         w1_plain=job["model"].get("w1_plain_at_w", True),
                         out_dir=str(self.out / "unused"), reference_dir=str(self.out / "unused.reference"))
        self.writer = _RankWriter(model_job, rank, rdv)  # the fixture's model building and wrapping
        self.distributed = self.writer.distributed

    def _file(self, kind: str) -> Path:
        return self.dir / f"{kind}_world_size_{self.w}_rank_{self.rank}.pt"

    def run(self) -> None:
        import datetime

        import torch
        from transformers.optimization import get_constant_schedule_with_warmup

        torch.set_num_threads(1)
        t0 = time.perf_counter()
        marks = {}
        j = self.writer.job
        if self.distributed:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"file://{self.writer.rdv}/store", rank=self.rank,
                                    world_size=self.w, timeout=datetime.timedelta(seconds=60))
        marks["pg"] = time.perf_counter() - t0
        model = self.writer._build()
        self.writer.param_names = [n for n, _ in model.named_parameters()]
        model = self.writer._wrap(model)
        opt = torch.optim.AdamW(model.parameters(), lr=j["lr"], betas=(0.9, 0.999), weight_decay=0.01)
        sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=0)

        # SkyRL's load_ckpt, but model and optimizer through the weights-only unpickler.
        msd = torch.load(self._file("model"), map_location="cpu", weights_only=True)
        model.load_state_dict(msd, strict=True)
        if self._file("optim").exists():
            osd = torch.load(self._file("optim"), map_location="cpu", weights_only=True)
            if osd:
                opt.load_state_dict(osd)
        extra = torch.load(self._file("extra_state"), map_location="cpu", weights_only=False)
        sched.load_state_dict(extra.get("lr_scheduler", {}))
        draws = None
        if "rng" in extra:
            import random

            import numpy as np

            rng = extra["rng"]
            torch.set_rng_state(rng["cpu"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["random"])
            draws = {"cpu": torch.rand(4).tolist(),  # the writer's ranks share their CPU stream ...
                     "cuda": rng["cuda"].tolist() if "cuda" in rng else None}  # ... not this one
        marks["load"] = time.perf_counter() - t0
        before = self.writer._full_model_state(model)

        # One more step on the same batch on every rank.
        g = torch.Generator()
        g.manual_seed(BATCH_SEED)
        ids = torch.randint(3, min(j["vocab"], 320), BATCH_SHAPE, generator=g)
        model.train()
        loss = self.writer._forward_loss(model, ids, g)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        opt.step()
        sched.step()
        opt.zero_grad()
        marks["step"] = time.perf_counter() - t0
        after = self.writer._full_model_state(model)
        optim_after = self.writer._full_optim_state(opt)
        all_draws = [draws]
        if self.distributed:
            import torch.distributed as dist

            all_draws = [None] * self.w
            dist.all_gather_object(all_draws, draws)
        if self.rank == 0:
            from safetensors.torch import save_file

            self.out.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in before.items()}, str(self.out / "before.safetensors"))
            save_file({k: v.contiguous() for k, v in after.items()}, str(self.out / "after.safetensors"))
            save_file(optim_after or {}, str(self.out / "optim_after.safetensors"))
            marks["gathered"] = time.perf_counter() - t0
            print(f"[resume] rank 0 timings {marks}", flush=True)
            (self.out / "result.json").write_text(json.dumps({
                "loss": float(loss.detach().item()),
                "grad_norm": float(grad_norm.item()),
                "lr": sched.get_last_lr()[0],
                "last_epoch": sched.last_epoch,
                "rng_draws": all_draws,
                "world_size": self.w,
            }, indent=2))
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m realckpt.fsdp_resume_check JOBFILE", file=sys.stderr)
        sys.exit(2)
    sys.exit(_launcher_main(sys.argv[1]))
