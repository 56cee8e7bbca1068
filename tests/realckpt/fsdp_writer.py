"""Write REAL SkyRL-layout FSDP checkpoints with the real libraries (test-fixture generator).

Nothing here hand-fakes a state dict: every ``.pt`` is what ``torch.save`` writes for a tiny
transformers model wrapped with FSDP2 ``fully_shard`` (or FSDP1), after real AdamW steps,
in real multi-process gloo groups on CPU.

Public API
----------
- :func:`write_fsdp_component` -- one ``policy/`` or ``critic/`` directory.
- :func:`write_fsdp_components` -- several at once (one launcher process: pays the
  multi-second torch/transformers import once).
- :func:`write_step_files` -- ``trainer_state.pt`` + ``data.pt`` of a ``global_step_N/``.
- :func:`write_fsdp_tree` -- a whole SkyRL tree (pointer file, steps, policy[/critic]);
  :func:`fsdp_tree_jobs` + :func:`finish_fsdp_tree` do the same in two halves, so a tree's
  components can share one ``write_fsdp_components`` call with other jobs.
- :func:`cached` -- build a fixture once per session (or persistently, see below).

Process model
-------------
``write_fsdp_components`` runs ``python -m realckpt.fsdp_writer JOBFILE`` (a fresh
interpreter, never a fork of the caller, whose threads -- e.g. a moto server -- would make
forking unsafe).  That launcher imports torch/transformers once, then per job starts
``world_size`` rank processes (``fork`` by default: they inherit the imports; ``spawn`` is
available via ``start_method``), which rendezvous through a ``file://`` store (no ports),
use gloo on CPU and one intra-op thread each.  A hung or failed rank kills the job and the
call raises ``RuntimeError`` with the launcher's output.

Reference data (for later tests) goes to the sibling directory ``out_dir + ".reference"``
(or ``reference_dir``), so the component directory holds exactly what SkyRL writes:

- ``reference_full_state.safetensors`` -- the full (gathered) model state dict after the
  last step, same keys as the checkpoint (tied tensors are stored under both keys).
- ``reference_full_optim.safetensors`` -- for FSDP2 / W=1: ``{name}.exp_avg``,
  ``{name}.exp_avg_sq``, ``{name}.step`` gathered per parameter (absent for FSDP1, whose
  optimizer state is flat-parameter shards).
- ``reference_logits.safetensors`` -- ``input_ids`` [2, 10] and ``logits`` (policy,
  [2, 10, vocab]) or ``values`` (critic, [2, 10]) of a plain (unsharded) model loaded with the
  reference state; checked in the writer against the FSDP model's own forward.
- LoRA jobs (``lora=...``) also get, besides ``lora_adapter/`` in the component directory:
  ``reference_merged_state.safetensors`` (``merge_and_unload()`` of the trained PEFT model: plain
  HF names, LoRA deltas folded in, ``modules_to_save`` copies in place of the originals),
  ``reference_base_state.safetensors`` (the frozen base weights -- ``base_layer`` /
  ``original_module`` of the checkpoint -- under plain HF names; note peft's ``unload()`` would
  keep the TRAINED ``modules_to_save`` copy instead).  The writer checks that
  ``lora_adapter/adapter_model.safetensors`` equals the gathered adapter tensors, every adapter
  tensor is non-zero and trained, and the merge changes exactly the LoRA-targeted (and
  ``modules_to_save``) weights.  Meta gains ``adapter_keys``, ``trainable_param_names``,
  ``lora_targets`` (HF weight names), ``modules_to_save_keys``, ``merged_changed_keys``.
  ``reference_full_state`` keeps the checkpoint's PEFT names (``base_model.model.`` prefix) and
  ``reference_logits`` is the PEFT model's output, checked equal (atol 1e-5) to the merged model's.
- ``reference_meta.json`` -- the job parameters plus ``param_names`` (the order of
  ``module.parameters()``, i.e. the optimizer's integer keys), ``buffer_keys``,
  ``state_keys``, ``global_shapes``, ``local_shapes`` (per rank, from the rank files as
  written), ``empty_shards`` ({key: [ranks]}), ``mesh_shape``/``mesh_dim_names``,
  ``placements``, ``files`` (the component's file list), ``timings``.

MoE (``arch="qwen3_moe"``, variant ``qwen3moe_w2``)
-------------------------------------------------
What the FSDP2 rank files really hold for a transformers 5.24 ``Qwen3MoeForCausalLM``
(checked by ``tests/test_realckpt_fsdp_moe.py``): the routed experts stay FUSED as in memory,
one parameter per layer each, ``model.layers.{i}.mlp.experts.gate_up_proj`` ``[E, 2F, H]`` and
``model.layers.{i}.mlp.experts.down_proj`` ``[E, H, F]`` (no per-expert keys, no ``.weight``
suffix), DTensors ``Shard(0)`` on the EXPERT axis (W=2, E=4: experts 0-1 on rank 0, 2-3 on rank
1). Rows ``[:F]`` of ``gate_up_proj[e]`` are expert e's ``gate_proj``, rows ``[F:]`` its
``up_proj`` (``Qwen3MoeExperts.forward``: ``gate, up = linear(x, gate_up_proj[e]).chunk(2)``;
``save_pretrained`` splits them into ``mlp.experts.{e}.gate_proj.weight`` /
``up_proj.weight`` / ``down_proj.weight`` the same way).  The router is
``model.layers.{i}.mlp.gate.weight`` ``[E, H]`` (an ``nn.Parameter``, sharded on E too); q/k
norms ``self_attn.{q,k}_norm.weight`` ``[head_dim]``.  The optimizer state is keyed by parameter
index like the dense models (``exp_avg`` of ``gate_up_proj`` is a ``[E/W, 2F, H]`` local shard).

Cache
-----
:func:`cached` builds into ``$CKPTCTL_TEST_CACHE/<hash>/<name>`` when that variable is set
(``<hash>`` covers every ``realckpt/*.py`` and the torch/transformers versions, so stale fixtures
are never reused), else into one temporary directory per Python process (removed at exit).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

_HERE = Path(__file__).resolve().parent
_TESTS_DIR = _HERE.parent

#: Defaults of one component job (every key is a keyword of ``write_fsdp_component``).
DEFAULTS: dict[str, Any] = dict(
    arch="llama",             # "llama" | "qwen2" | "qwen3_moe" (tiny_models.make_moe_model: 4 experts, top-2,
                              # moe_intermediate 32; ``intermediate`` is unused by every layer being MoE)
    world_size=2,
    mesh="fsdp",              # "fsdp" (1-D ("fsdp",)) | "hsdp" (2-D ("ddp", "fsdp"))
    replicas=2,               # hsdp only: size of the "ddp" dim; fsdp dim = world_size // replicas
    critic=False,             # SkyRL critic: model.* + value_head.weight [1, hidden], no lm_head
    layout="skyrl",           # "skyrl" (per-rank files) | "documented" (single files, W=1 only)
    config_variant="skyrl",   # fsdp_config.json: "skyrl" | "verl" | "none" (file absent)
    extra_variant=None,       # extra_state: "skyrl" | "skyrl_global_step" | "verl"; None = from config_variant
    strategy="fsdp2",         # "fsdp2" (fully_shard) | "fsdp" (FSDP1, use_orig_params=False)
    fsdp1_tensor="dtensor",   # FSDP1 SHARDED_STATE_DICT values: "dtensor" (device_mesh passed) | "sharded_tensor"
    w1_plain=True,            # W=1: plain tensors, no FSDP (SkyRL single GPU); False: fully_shard on a 1-rank mesh
    seed=0,
    vocab=1000,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=128,
    tie=False,
    persistent_buffers=True,  # rotary inv_freq (and critic mean/std) saved as persistent buffers
    num_steps=1,              # optimizer steps before saving (lr_scheduler last_epoch == num_steps)
    lr=1e-3,
    include_cuda_rng=True,    # rng["cuda"]: a synthetic 16-byte uint8 tensor, as a GPU run would save
    global_step=None,         # only stored by extra_variant "skyrl_global_step" (default: num_steps)
    hf_architectures=None,    # override config.json "architectures" (e.g. ["FSDPLlamaForCausalLM"])
    lora=None,                # LoRA (PEFT): dict of peft.LoraConfig keywords (JSON values; lists for sets);
                              # the model is peft.get_peft_model(hf_model, LoraConfig(**lora)) as in SkyRL;
                              # init_lora_weights defaults to False (random, non-zero lora_B) unless given
    reference_dir=None,       # where reference data goes; None = out_dir + ".reference"
    timeout=120,              # seconds for this job's rank processes
)

_CHOICES = dict(
    arch=("llama", "qwen2", "qwen3_moe"),
    mesh=("fsdp", "hsdp"),
    layout=("skyrl", "documented"),
    config_variant=("skyrl", "verl", "none"),
    extra_variant=(None, "skyrl", "skyrl_global_step", "verl"),
    strategy=("fsdp2", "fsdp"),
    fsdp1_tensor=("dtensor", "sharded_tensor"),
)

_REF_INPUT_SHAPE = (2, 10)


@dataclasses.dataclass(frozen=True)
class FsdpComponent:
    """What :func:`write_fsdp_component` wrote."""

    path: Path            # the component directory (policy/ or critic/)
    reference_dir: Path   # path + ".reference" unless reference_dir was given
    meta: dict            # reference_meta.json

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]

    def file(self, kind: str, rank: int) -> Path:
        """``kind`` in model/optim/extra_state -> that rank's file (skyrl layout)."""
        return self.path / f"{kind}_world_size_{self.world_size}_rank_{rank}.pt"


# --------------------------------------------------------------------------------------
# Parent-side API
# --------------------------------------------------------------------------------------

def _normalize_job(out_dir, kw: dict) -> dict:
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown argument(s): {sorted(unknown)}")
    job = dict(DEFAULTS)
    job.update(kw)
    for key, allowed in _CHOICES.items():
        if job[key] not in allowed:
            raise ValueError(f"{key}={job[key]!r}; expected one of {allowed}")
    w = int(job["world_size"])
    if w < 1:
        raise ValueError("world_size must be >= 1")
    if job["layout"] == "documented" and w != 1:
        raise ValueError("layout='documented' holds single files: world_size must be 1")
    if job["mesh"] == "hsdp":
        r = int(job["replicas"])
        if w % r or w // r < 1 or r < 1:
            raise ValueError(f"hsdp: world_size {w} not divisible by replicas {r}")
    if job["strategy"] == "fsdp" and job["mesh"] == "hsdp" and job["fsdp1_tensor"] != "dtensor":
        raise ValueError("FSDP1 hybrid sharding is only supported with fsdp1_tensor='dtensor'")
    if job["extra_variant"] is None:
        job["extra_variant"] = "verl" if job["config_variant"] == "verl" else "skyrl"
    if job["lora"] is not None:
        if not isinstance(job["lora"], dict):
            raise TypeError("lora must be a dict of peft.LoraConfig keyword arguments (or None)")
        if job["critic"]:
            raise ValueError("lora: only policy (causal-LM) components are supported")
        if job["strategy"] != "fsdp2":
            raise ValueError("lora: only strategy='fsdp2' (FSDP1 with use_orig_params=False cannot mix "
                             "frozen and trainable parameters in one flat parameter)")
        try:
            json.dumps(job["lora"])
        except TypeError as e:
            raise TypeError(f"lora must be JSON-serialisable (lists, not sets): {e}") from None
    if job["arch"] == "qwen3_moe" and (job["critic"] or job["lora"] is not None or job["strategy"] != "fsdp2"):
        raise ValueError("arch='qwen3_moe': FSDP2 policy without LoRA only")
    if job["global_step"] is None:
        job["global_step"] = job["num_steps"]
    job["out_dir"] = str(Path(out_dir).resolve())
    job["reference_dir"] = str(Path(job["reference_dir"] or job["out_dir"] + ".reference").resolve())
    return job


def write_fsdp_components(jobs: Sequence[tuple[str | os.PathLike, dict]], *, start_method: str = "fork",
                          timeout: float | None = None) -> list[FsdpComponent]:
    """Write several components in ONE launcher process.  ``jobs`` = [(out_dir, kwargs)],
    kwargs as for :func:`write_fsdp_component`.  Existing ``out_dir`` / reference
    directories are DELETED and rewritten (fixture directories only!)."""
    norm = [_normalize_job(out, dict(kw)) for out, kw in jobs]
    if not norm:
        return []
    dirs = [j["out_dir"] for j in norm] + [j["reference_dir"] for j in norm]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two jobs share an out_dir / reference_dir")
    for job in norm:
        for d in (Path(job["out_dir"]), Path(job["reference_dir"])):
            if d.exists():
                shutil.rmtree(d)
        Path(job["out_dir"]).parent.mkdir(parents=True, exist_ok=True)
    if start_method not in ("fork", "spawn", "forkserver"):
        raise ValueError(f"start_method={start_method!r}")
    total_timeout = timeout if timeout is not None else 30 + sum(j["timeout"] for j in norm)
    run_launcher("realckpt.fsdp_writer", {"jobs": norm, "start_method": start_method}, total_timeout,
                 "FSDP fixture launcher")
    result = []
    for job in norm:
        ref = Path(job["reference_dir"])
        meta = json.loads((ref / "reference_meta.json").read_text())
        result.append(FsdpComponent(Path(job["out_dir"]), ref, meta))
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_launcher(module: str, spec: dict, timeout: float, what: str) -> str:
    """Run ``python -m MODULE JOBFILE`` (a fresh interpreter with ``tests/`` on its path) on
    ``spec`` plus ``"tmp"``, a scratch directory that lives as long as the launcher; returns its
    output. Its own session/process group: on timeout the launcher AND its rank processes are
    killed. Raises RuntimeError with the output's tail on failure."""
    with tempfile.TemporaryDirectory(prefix="realckpt-launch-") as tmp:
        jobfile = Path(tmp) / "jobs.json"
        jobfile.write_text(json.dumps({**spec, "tmp": tmp}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_TESTS_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(_child_env())
        proc = subprocess.Popen([sys.executable, "-m", module, str(jobfile)], env=env, cwd=tmp,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            raise RuntimeError(f"{what} timed out after {timeout}s:\n{out[-8000:]}") from None
        except BaseException:
            _kill_group(proc)
            proc.communicate()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed (rc={proc.returncode}):\n{out[-12000:]}")
    return out


def freeze_before_fork(ctx) -> None:
    """Move the launcher's objects (torch, megatron-core, transformers: millions) out of the
    garbage collector's reach before forking ranks. A full collection in a forked rank otherwise
    walks all of them and copies every page it touches -- megatron-core's
    ``DistributedOptimizer.sharded_state_dict`` runs ``gc.collect()`` on each call, which made up
    ~60% of the distributed-optimizer oracle's CPU time. The launcher never frees them anyway."""
    if ctx.get_start_method() == "fork":
        gc.freeze()


def run_ranks(ctx, target, job: dict, world_size: int, rdv: Path, timeout: float) -> str | None:
    """Start ``target(job, rank, rdv)`` in ``world_size`` processes of ``ctx`` and wait for all;
    None when every rank exited 0, else why not (the survivors are killed)."""
    procs = [ctx.Process(target=target, args=(job, r, str(rdv)), name=f"rank{r}", daemon=False)
             for r in range(world_size)]
    freeze_before_fork(ctx)
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    failed = None
    while True:
        alive = [p for p in procs if p.exitcode is None]
        bad = [p for p in procs if p.exitcode not in (None, 0)]
        if bad:
            failed = f"{bad[0].name} exited with {bad[0].exitcode}"
            break
        if not alive:
            break
        if time.monotonic() > deadline:
            failed = f"timeout after {timeout}s (alive: {[p.name for p in alive]})"
            break
        alive[0].join(0.05)
    if failed:
        for p in procs:
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(5)
    return failed


def write_fsdp_component(out_dir: str | os.PathLike, **kwargs) -> FsdpComponent:
    """Write one SkyRL FSDP component directory (``policy/`` or ``critic/``) for real.

    Keywords and defaults: see :data:`DEFAULTS`.  ``layout="skyrl"`` writes, per rank R of W,
    ``model_world_size_{W}_rank_{R}.pt`` (``module.state_dict()``: DTensors for FSDP2, plain
    tensors at W=1 with ``w1_plain``), ``optim_world_size_{W}_rank_{R}.pt``
    (``optimizer.state_dict()``), ``extra_state_world_size_{W}_rank_{R}.pt``, plus
    ``fsdp_config.json`` (unless ``config_variant="none"``) and ``huggingface/``; with ``lora``
    also ``lora_adapter/`` (``adapter_config.json`` + ``adapter_model.safetensors``, rank 0, last).
    ``layout="documented"`` (W=1) writes ``model_state.pt``, ``optimizer_state.pt``,
    ``lr_scheduler_state.pt``, ``fsdp_config.json``, ``huggingface/``.
    Reference data goes to ``out_dir + ".reference"`` (see the module docstring)."""
    start_method = kwargs.pop("start_method", "fork")
    return write_fsdp_components([(out_dir, kwargs)], start_method=start_method)[0]


# ---- trainer_state.pt / data.pt -------------------------------------------------------

@dataclasses.dataclass
class TrainerConfigDataclass:
    """Stand-in for a trainer config pickled as a dataclass (``config_kind="dataclass"``)."""

    trainer: dict
    generator: dict


def skyrl_config_dict(ckpt_path: str = "/tmp/ckpts") -> dict:
    """A small but realistically nested SkyRL-style config (plain dict)."""
    return {
        "data": {"train_data": ["/data/gsm8k/train.parquet"], "val_data": ["/data/gsm8k/validation.parquet"]},
        "trainer": {
            "strategy": "fsdp2",
            "epochs": 2,
            "train_batch_size": 16,
            "policy_mini_batch_size": 8,
            "micro_train_batch_size_per_gpu": 2,
            "ckpt_path": ckpt_path,
            "ckpt_interval": 2,
            "max_ckpts_to_keep": -1,
            "resume_mode": "latest",
            "resume_path": None,
            "export_path": "/tmp/exports",
            "seed": 42,
            "placement": {"colocate_all": True, "policy_num_gpus_per_node": 2, "critic_num_gpus_per_node": 2},
            "policy": {
                "model": {"path": "tiny/llama-64"},
                "optimizer_config": {"lr": 1.0e-6, "adam_betas": [0.9, 0.999], "weight_decay": 0.01,
                                     "max_grad_norm": 1.0, "num_warmup_steps": 0, "offload_after_step": True},
                "fsdp_config": {"cpu_offload": False, "reshard_after_forward": True, "fsdp_size": -1},
            },
            "algorithm": {"advantage_estimator": "grpo", "use_kl_loss": True, "kl_loss_coef": 0.001},
        },
        "generator": {"backend": "vllm", "n_samples_per_prompt": 4, "sampling_params": {"temperature": 1.0, "max_generate_length": 512}},
    }


def write_step_files(step_dir: str | os.PathLike, *, global_step: int, config_kind: str = "dict",
                     with_data: bool = True, saved_global_step: int | None = None,
                     batches_consumed: int = 3) -> Path:
    """Write ``trainer_state.pt`` (``{"global_step", "config"}``; config a plain nested dict,
    an OmegaConf ``DictConfig`` (``config_kind="omegaconf"``, as 0.3.1) or a pickled dataclass
    (``"dataclass"``)) and, if ``with_data``, ``data.pt`` = a real
    ``torchdata.stateful_dataloader.StatefulDataLoader.state_dict()`` after ``batches_consumed``
    batches of a 32-item dataset (batch size 2, shuffled with a seeded generator).
    ``saved_global_step`` overrides the stored step (default ``global_step``).  Runs in-process."""
    import torch

    d = Path(step_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg_dict = skyrl_config_dict()
    if config_kind == "dict":
        cfg: Any = cfg_dict
    elif config_kind == "omegaconf":
        from omegaconf import OmegaConf

        cfg = OmegaConf.create(cfg_dict)
    elif config_kind == "dataclass":
        cfg = TrainerConfigDataclass(trainer=cfg_dict["trainer"], generator=cfg_dict["generator"])
    else:
        raise ValueError(f"config_kind={config_kind!r}; expected dict|omegaconf|dataclass")
    if with_data:
        import warnings

        from torchdata.stateful_dataloader import StatefulDataLoader

        gen = torch.Generator()
        gen.manual_seed(1234 + global_step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dl = StatefulDataLoader([{"prompt": f"q{i}", "answer": i} for i in range(32)], batch_size=2,
                                    shuffle=True, generator=gen, num_workers=0, collate_fn=lambda b: b)
            it = iter(dl)
            for _ in range(batches_consumed):
                next(it)
            state = dl.state_dict()
        torch.save(state, d / "data.pt")
    torch.save({"global_step": global_step if saved_global_step is None else saved_global_step, "config": cfg},
               d / "trainer_state.pt")
    return d


def fsdp_tree_jobs(root: str | os.PathLike, steps: Iterable[int] = (2, 4), *, with_critic: bool = False,
                   **component_kwargs) -> list[tuple[Path, dict]]:
    """The component jobs of :func:`write_fsdp_tree` (for batching several trees/variants into
    one :func:`write_fsdp_components` call; finish with :func:`finish_fsdp_tree`)."""
    root = Path(root)
    ref_root = Path(str(root) + ".reference")
    jobs = []
    for n in steps:
        kw = dict(component_kwargs)
        kw.setdefault("num_steps", n)
        kw.pop("reference_dir", None)
        jobs.append((root / f"global_step_{n}" / "policy",
                     dict(kw, critic=False, reference_dir=ref_root / f"global_step_{n}" / "policy")))
        if with_critic:
            jobs.append((root / f"global_step_{n}" / "critic",
                         dict(kw, critic=True, seed=kw.get("seed", DEFAULTS["seed"]) + 1,
                              reference_dir=ref_root / f"global_step_{n}" / "critic")))
    return jobs


def finish_fsdp_tree(root: str | os.PathLike, steps: Iterable[int] = (2, 4), pointer: int | None = 4, *,
                     config_kind: str = "dict", with_data: bool = True, pointer_newline: bool = False) -> Path:
    """Write the step files and the pointer of a tree whose components exist."""
    root = Path(root)
    for n in steps:
        write_step_files(root / f"global_step_{n}", global_step=n, config_kind=config_kind, with_data=with_data)
    if pointer is not None:
        (root / "latest_ckpt_global_step.txt").write_text(f"{pointer}\n" if pointer_newline else str(pointer))
    return root


def write_fsdp_tree(root: str | os.PathLike, steps: Iterable[int] = (2, 4), pointer: int | None = 4, *,
                    with_critic: bool = False, config_kind: str = "dict", with_data: bool = True,
                    pointer_newline: bool = False, start_method: str = "fork",
                    **component_kwargs) -> Path:
    """Write a whole SkyRL FSDP tree under ``root`` and return ``root``::

        latest_ckpt_global_step.txt   str(pointer), no newline (unless pointer_newline); absent if pointer is None
        global_step_{N}/policy/       write_fsdp_component(..., num_steps=N, **component_kwargs)
        global_step_{N}/critic/       only if with_critic (critic=True, seed+1)
        global_step_{N}/data.pt       unless with_data=False
        global_step_{N}/trainer_state.pt   {"global_step": N, "config": <config_kind>}

    Each ``global_step_N`` component holds the state after N optimizer steps
    (lr_scheduler ``last_epoch == N``) unless ``num_steps`` is passed explicitly.  Every
    component of every step is written by ONE launcher call.  Reference data goes OUTSIDE the
    tree, to ``root + ".reference/global_step_N/{policy,critic}/"``, so the tree is exactly
    SkyRL's.  Components are written before the step files and the pointer file last (SkyRL's
    write order)."""
    steps = list(steps)
    write_fsdp_components(fsdp_tree_jobs(root, steps, with_critic=with_critic, **component_kwargs),
                          start_method=start_method)
    return finish_fsdp_tree(root, steps, pointer, config_kind=config_kind, with_data=with_data,
                            pointer_newline=pointer_newline)


# ---- cache ----------------------------------------------------------------------------

_SESSION_CACHE: Path | None = None


def _cache_key() -> str:
    h = hashlib.sha256()
    for f in sorted(_HERE.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    try:
        from importlib.metadata import version

        for pkg in ("torch", "transformers", "tokenizers", "torchdata", "omegaconf"):
            try:
                h.update(f"{pkg}={version(pkg)}".encode())
            except Exception:
                pass
    except Exception:
        pass
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """``$CKPTCTL_TEST_CACHE/<source+version hash>`` if set, else one temp dir per process."""
    global _SESSION_CACHE
    env = os.environ.get("CKPTCTL_TEST_CACHE")
    if env:
        p = Path(env) / _cache_key()
        p.mkdir(parents=True, exist_ok=True)
        return p
    if _SESSION_CACHE is None or not _SESSION_CACHE.exists():
        import atexit

        _SESSION_CACHE = Path(tempfile.mkdtemp(prefix="ckptctl-realckpt-"))
        atexit.register(shutil.rmtree, str(_SESSION_CACHE), True)
    return _SESSION_CACHE


def cached(name: str, builder: Callable[[Path], Any]) -> Path:
    """Return ``cache_root()/name``, calling ``builder(dir)`` once to fill it.

    ``builder`` gets an existing empty directory and writes anything inside it (e.g.
    ``write_fsdp_component(dir / "policy")``, whose ``.reference`` sibling then lands in
    the same directory).  The build goes to a temporary sibling renamed into place when the
    builder returns, under an exclusive file lock (safe with pytest-xdist).  Treat the
    result as read-only: copy it (``shutil.copytree``) before mutating."""
    import fcntl

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad cache name {name!r}")
    root = cache_root()
    final = root / name
    if final.is_dir():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if final.is_dir():
                return final
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
            try:
                builder(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


# --------------------------------------------------------------------------------------
# Launcher / rank processes
# --------------------------------------------------------------------------------------

def _child_env() -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
    }
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def _launcher_main(jobfile: str) -> int:
    spec = json.loads(Path(jobfile).read_text())
    os.environ.update(_child_env())
    t0 = time.perf_counter()
    # Warm every heavy import once; fork-started ranks inherit them.
    import numpy  # noqa: F401
    import torch

    torch.set_num_threads(1)
    import torch.distributed  # noqa: F401
    import torch.distributed.tensor  # noqa: F401
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.optimization  # noqa: F401
    from realckpt import tiny_models

    for arch in sorted({j["arch"] for j in spec["jobs"]}):
        if arch in tiny_models.MOE_ARCHS:
            import transformers

            getattr(transformers, tiny_models.MOE_ARCHS[arch])
        else:
            tiny_models._model_classes(arch)
    if any(j["strategy"] == "fsdp" for j in spec["jobs"]):
        from torch.distributed.fsdp import FullyShardedDataParallel  # noqa: F401
    if any(j["lora"] for j in spec["jobs"]):
        import peft  # noqa: F401
        import peft.tuners.lora  # noqa: F401
    import_s = time.perf_counter() - t0
    print(f"[realckpt] launcher imports: {import_s:.2f}s", flush=True)

    import multiprocessing as mp

    ctx = mp.get_context(spec["start_method"])
    for i, job in enumerate(spec["jobs"]):
        t1 = time.perf_counter()
        w = job["world_size"]
        rdv = Path(spec["tmp"]) / f"rdv-{i}"
        rdv.mkdir()
        failed = run_ranks(ctx, _rank_entry, job, w, rdv, job["timeout"])
        if failed:
            print(f"[realckpt] job {i} ({job['out_dir']}) FAILED: {failed}", flush=True)
            return 1
        dt = time.perf_counter() - t1
        meta_path = Path(job["reference_dir"]) / "reference_meta.json"
        meta = json.loads(meta_path.read_text())
        meta["timings"]["job_s"] = round(dt, 3)
        meta["timings"]["launcher_import_s"] = round(import_s, 3)
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
        print(f"[realckpt] job {i} W={w} {job['strategy']} {job['mesh']} critic={job['critic']} "
              f"layout={job['layout']}: {dt:.2f}s", flush=True)
    return 0


def _rank_entry(job: dict, rank: int, rdv: str) -> None:
    """Rank process entry (importable top-level function: works with spawn too)."""
    os.environ.update(_child_env())
    if str(_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(_TESTS_DIR))
    _RankWriter(job, rank, rdv).run()


def _jsonable(v):
    """Sets (e.g. peft's ``target_modules``) -> sorted lists, recursively; enums -> values."""
    import enum

    if isinstance(v, (set, frozenset)):
        return sorted(_jsonable(x) for x in v)
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _drop_adapter_name(key: str, adapter: str = "default") -> str:
    """peft's adapter-file naming: ``....lora_A.default.weight`` -> ``....lora_A.weight``,
    ``lora_embedding_A.default`` -> ``lora_embedding_A``, ``lm_head.modules_to_save.default.weight``
    -> ``lm_head.weight``."""
    key = key.replace(f".modules_to_save.{adapter}.", ".")
    key = key.replace(f".{adapter}.", ".")
    return key[: -len(f".{adapter}")] if key.endswith(f".{adapter}") else key


def _chunk_sizes(n: int, parts: int) -> list[int]:
    """Local dim-0 sizes under ``torch.chunk`` semantics (what FSDP2/DTensor Shard(0) use)."""
    if n == 0:
        return [0] * parts
    size = -(-n // parts)
    return [max(0, min(size, n - i * size)) for i in range(parts)]


class _RankWriter:
    def __init__(self, job: dict, rank: int, rdv: str):
        self.job = job
        self.rank = rank
        self.rdv = rdv
        self.w = job["world_size"]
        self.out = Path(job["out_dir"])
        self.ref = Path(job["reference_dir"])
        self.timings: dict[str, float] = {}
        self.distributed = not (self.w == 1 and job["w1_plain"])
        self.mesh = None

    # -- helpers ---------------------------------------------------------------------
    def _tick(self, name: str, t: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(now - t, 3)
        return now

    def _barrier(self):
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def _build(self):
        from realckpt import tiny_models as tm

        j = self.job
        if j["arch"] in tm.MOE_ARCHS:
            model = tm.make_moe_model(j["arch"], j["seed"], vocab=j["vocab"], hidden=j["hidden"], layers=j["layers"],
                                      heads=j["heads"], kv_heads=j["kv_heads"], ffn=j["intermediate"], tie=j["tie"])
            if j["persistent_buffers"]:
                tm.make_persistent_buffers(model)
            return model
        kw = dict(vocab=j["vocab"], hidden=j["hidden"], layers=j["layers"], heads=j["heads"],
                  kv_heads=j["kv_heads"], intermediate=j["intermediate"], tie=j["tie"])
        maker = tm.make_critic if j["critic"] else tm.make_model
        model = maker(j["arch"], j["seed"], persistent_buffers=j["persistent_buffers"], **kw)
        if j["lora"] is None:
            return model
        return self._peftify(model)

    def _peftify(self, model):
        """SkyRL's LoRA policy: ``get_peft_model(hf_model, LoraConfig(...))``.  The adapter weights
        are drawn from a seeded RNG (the same in every rank process and in the reference rebuild)."""
        import warnings

        import torch
        from peft import LoraConfig, get_peft_model

        kw = dict(self.job["lora"])
        kw.setdefault("init_lora_weights", False)  # random lora_B: a merge is never a no-op
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(1_000_003 + self.job["seed"])
            return get_peft_model(model, LoraConfig(**kw))

    # -- main ------------------------------------------------------------------------
    def run(self):
        import datetime

        import torch

        torch.set_num_threads(1)
        t = time.perf_counter()
        j = self.job
        if self.distributed:
            import torch.distributed as dist

            dist.init_process_group("gloo", init_method=f"file://{self.rdv}/store", rank=self.rank,
                                    world_size=self.w, timeout=datetime.timedelta(seconds=j["timeout"]))
        t = self._tick("init_pg_s", t)
        model = self._build()
        self.param_names = [n for n, _ in model.named_parameters()]
        self.buffer_keys = [k for k in model.state_dict().keys()
                            if k not in dict(model.named_parameters(remove_duplicate=False))]
        t = self._tick("build_s", t)
        model = self._wrap(model)
        t = self._tick("wrap_s", t)
        opt, sched = self._train(model)
        t = self._tick("train_s", t)
        self._save(model, opt, sched)
        t = self._tick("save_s", t)
        self._reference(model, opt)
        t = self._tick("reference_s", t)
        self._barrier()
        if self.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()

    def _wrap(self, model):
        import torch
        from torch import nn

        from realckpt import tiny_models as tm

        j = self.job
        if not self.distributed:
            return model
        from torch.distributed.device_mesh import init_device_mesh

        if j["mesh"] == "hsdp":
            shape = (j["replicas"], self.w // j["replicas"])
            names = ("ddp", "fsdp")
        else:
            shape, names = (self.w,), ("fsdp",)
        self.mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        layer_cls = tm.decoder_layer_class_name(j["arch"])
        if j["strategy"] == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            # SkyRL apply_fsdp2: each decoder layer, the input embedding when untied, then the root.
            for m in list(model.modules()):
                if type(m).__name__ == layer_cls or (isinstance(m, nn.Embedding) and not j["tie"]):
                    fully_shard(m, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
            return model
        # FSDP1, as skyrl-train 0.3.1 `strategy: fsdp` (use_orig_params=False, transformer wrap policy).
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import ShardingStrategy
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        layer_type = next(type(m) for m in model.modules() if type(m).__name__ == layer_cls)
        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={layer_type})
        kwargs = dict(auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"),
                      sync_module_states=False, forward_prefetch=False)
        if j["mesh"] == "hsdp":
            kwargs.update(sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=self.mesh)
        else:
            kwargs["sharding_strategy"] = ShardingStrategy.FULL_SHARD
            if j["fsdp1_tensor"] == "dtensor":
                kwargs["device_mesh"] = self.mesh
        return FSDP(model, **kwargs)

    def _batch(self, step: int, vocab_hi: int):
        import torch

        g = torch.Generator()
        g.manual_seed(10_000 * (self.job["seed"] + 1) + 100 * step + self.rank)  # per-rank data
        return torch.randint(3, vocab_hi, (2, 12), generator=g), g

    def _forward_loss(self, model, ids, g):
        import torch

        if self.job["critic"]:
            values = model(ids)
            target = torch.randn(values.shape, generator=g)
            return ((values - target) ** 2).mean()
        return model(input_ids=ids, labels=ids).loss

    def _train(self, model):
        import torch
        from transformers.optimization import get_constant_schedule_with_warmup

        j = self.job
        opt = torch.optim.AdamW(model.parameters(), lr=j["lr"], betas=(0.9, 0.999), weight_decay=0.01)
        sched = get_constant_schedule_with_warmup(opt, num_warmup_steps=0)
        vocab_hi = min(j["vocab"], 320)
        model.train()
        for step in range(j["num_steps"]):
            ids, g = self._batch(step, vocab_hi)
            loss = self._forward_loss(model, ids, g)
            loss.backward()
            if self.distributed and j["strategy"] == "fsdp":
                model.clip_grad_norm_(max_norm=1.0)
            elif j["lora"] is not None:  # frozen base weights have no grads (clip_grad_norm_ skips them anyway)
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm=1.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        return opt, sched

    def _rng_state(self):
        import random

        import numpy as np
        import torch

        rng = {"cpu": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
        if self.job["include_cuda_rng"]:
            seed = 42 + self.rank
            # Stand-in for torch.cuda.get_rng_state(): a 16-byte uint8 tensor (seed, offset).
            rng["cuda"] = torch.tensor(list(seed.to_bytes(8, "little") + (0).to_bytes(8, "little")), dtype=torch.uint8)
        return rng

    def _extra_state(self, sched):
        j = self.job
        ev = j["extra_variant"]
        if ev == "verl":
            return {"lr_scheduler": sched.state_dict(), "rng": self._rng_state()}
        extra = {
            "lr_scheduler": sched.state_dict(),
            "client_state": {},
            "tag": None,
            "fsdp_strategy": j["strategy"],
            "world_size": self.w,
            "rank": self.rank,
        }
        if ev == "skyrl_global_step":
            extra["global_step"] = j["global_step"]
        extra["rng"] = self._rng_state()
        return extra

    def _state_ctx(self, model):
        import contextlib

        if self.distributed and self.job["strategy"] == "fsdp":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
            from torch.distributed.fsdp import ShardedOptimStateDictConfig, ShardedStateDictConfig, StateDictType

            return FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT,
                                        ShardedStateDictConfig(offload_to_cpu=True),
                                        ShardedOptimStateDictConfig(offload_to_cpu=True))
        return contextlib.nullcontext()

    def _save(self, model, opt, sched):
        import warnings

        import torch

        from realckpt import tiny_models as tm

        j = self.job
        w, r = self.w, self.rank
        if r == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self._barrier()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with self._state_ctx(model):
                msd = model.state_dict()
                osd = opt.state_dict()
                if j["layout"] == "skyrl":
                    torch.save(msd, self.out / f"model_world_size_{w}_rank_{r}.pt")
                    torch.save(osd, self.out / f"optim_world_size_{w}_rank_{r}.pt")
                    torch.save(self._extra_state(sched), self.out / f"extra_state_world_size_{w}_rank_{r}.pt")
                else:
                    torch.save(msd, self.out / "model_state.pt")
                    torch.save(osd, self.out / "optimizer_state.pt")
                    torch.save(sched.state_dict(), self.out / "lr_scheduler_state.pt")
        self.saved_state_keys = list(msd.keys())
        if r == 0:
            inner = getattr(model, "module", model)  # FSDP1 wrapper -> HF model
            tm.save_hf_dir(self.out / "huggingface", inner.config, tm.make_tokenizer(),
                           architectures=j["hf_architectures"])
            if j["config_variant"] == "skyrl":
                cfg = {"fsdp_strategy": j["strategy"], "world_size": w}
            elif j["config_variant"] == "verl":
                cfg = {"FSDP_version": 2 if j["strategy"] == "fsdp2" else 1, "world_size": w}
            else:
                cfg = None
            if cfg is not None:
                with open(self.out / "fsdp_config.json", "w") as f:
                    json.dump(cfg, f, indent=4)
        if j["lora"] is not None:
            full = self._full_model_state(model)  # collective: every rank gathers
            if r == 0:
                self._save_lora_adapter(model, full)
        self._barrier()

    def _save_lora_adapter(self, model, full: dict) -> None:
        """SkyRL's ``lora_adapter/`` (rank 0, after everything else): ``adapter_config.json`` =
        ``dataclasses.asdict(peft_config["default"])`` with the enums as their values and
        ``target_modules`` as a list, ``json.dump(..., ensure_ascii=False, indent=4)``;
        ``adapter_model.safetensors`` = ``get_peft_model_state_dict(model, state_dict=full)``."""
        import warnings

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        peft_config = dataclasses.asdict(model.peft_config["default"])
        if peft_config["task_type"] is not None:
            peft_config["task_type"] = getattr(peft_config["task_type"], "value", peft_config["task_type"])
        peft_config["peft_type"] = getattr(peft_config["peft_type"], "value", peft_config["peft_type"])
        # SkyRL writes list(set): an arbitrary order; sorted is one of them and keeps fixtures stable.
        peft_config["target_modules"] = _jsonable(peft_config["target_modules"])
        peft_config = {k: _jsonable(v) for k, v in peft_config.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True ..."
            lora_params = get_peft_model_state_dict(model, state_dict=full)
        lora_params = {k: v.detach().contiguous() for k, v in lora_params.items()}
        d = self.out / "lora_adapter"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "adapter_config.json", "w", encoding="utf-8") as f:
            json.dump(peft_config, f, ensure_ascii=False, indent=4)
        save_file(lora_params, str(d / "adapter_model.safetensors"))

    # -- reference ---------------------------------------------------------------------
    def _full_model_state(self, model) -> dict:
        import warnings

        import torch
        from torch.distributed.tensor import DTensor

        if not self.distributed:
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.job["strategy"] == "fsdp":
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                          FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
                    return {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = {}
        for k, v in model.state_dict().items():
            out[k] = v.full_tensor().detach().clone() if isinstance(v, DTensor) else v.detach().clone()
        return out

    def _full_optim_state(self, opt) -> dict | None:
        import torch
        from torch.distributed.tensor import DTensor

        if self.distributed and self.job["strategy"] == "fsdp":
            return None
        out = {}
        sd = opt.state_dict()
        for idx, st in sd["state"].items():
            name = self.param_names[idx]
            for key, v in st.items():
                if isinstance(v, DTensor):
                    v = v.full_tensor()
                out[f"{name}.{key}"] = torch.as_tensor(v).detach().clone().contiguous()
        return out

    def _local_shapes(self) -> dict[str, list[int] | None]:
        """This rank's local shapes as saved (None for non-tensors)."""
        import torch
        from torch.distributed.tensor import DTensor

        path = (self.out / f"model_world_size_{self.w}_rank_{self.rank}.pt" if self.job["layout"] == "skyrl"
                else self.out / "model_state.pt")
        if self.distributed and self.job["strategy"] == "fsdp" and self.job["fsdp1_tensor"] == "sharded_tensor":
            sd = torch.load(path, weights_only=False)  # ShardedTensor needs the live process group
            res = {}
            for k, v in sd.items():
                if hasattr(v, "local_shards"):
                    shards = v.local_shards()
                    if shards:
                        res[k] = list(shards[0].tensor.shape)
                    else:  # this rank holds no rows
                        res[k] = [0] + list(v.size())[1:]
                else:
                    res[k] = list(v.shape)
            return res
        sd = torch.load(path, weights_only=True)
        return {k: list(v.to_local().shape if isinstance(v, DTensor) else v.shape) for k, v in sd.items()}

    def _lora_reference(self, ref_model, full: dict, ids, peft_logits, init_adapters: dict) -> dict:
        """Rank 0, LoRA jobs: write ``reference_merged_state`` / ``reference_base_state``, check
        that the fixture is not a no-op, return extra meta."""
        import copy
        import warnings

        import peft
        import torch
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import load_file, save_file

        prefix = "base_model.model."
        # Which HF weights LoRA targets, which modules are saved copies (ModulesToSaveWrapper).
        lora_targets, saved_modules = [], []
        for name, mod in ref_model.named_modules():
            hf = name[len(prefix):] if name.startswith(prefix) else name
            if isinstance(mod, LoraLayer):
                lora_targets.append(f"{hf}.weight")
            elif isinstance(mod, peft.utils.other.ModulesToSaveWrapper):
                saved_modules.append(hf)
        if not lora_targets:
            raise AssertionError(f"lora={self.job['lora']!r} targets no module")
        # 1. The merged model (plain HF names) reproduces the PEFT model's output.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            merged_model = copy.deepcopy(ref_model).merge_and_unload()
            unloaded = copy.deepcopy(ref_model).unload().state_dict()
        merged_model.eval()
        with torch.no_grad():
            merged_logits = merged_model(input_ids=ids).logits
        if not torch.allclose(merged_logits, peft_logits, atol=1e-5, rtol=0):
            raise AssertionError("merged model's logits differ from the PEFT model's: max abs diff "
                                 f"{(merged_logits - peft_logits).abs().max().item()}")
        merged = {k: v.detach().contiguous().clone() for k, v in merged_model.state_dict().items()}
        # 2. The frozen base weights under HF names: base_layer / original_module, adapters dropped.
        base = {}
        for k, v in full.items():
            hf = k[len(prefix):] if k.startswith(prefix) else k
            if any(f".{part}." in f".{hf}" for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                                         "lora_magnitude_vector", "modules_to_save")):
                continue
            hf = hf.replace(".base_layer.", ".").replace(".original_module.", ".")
            base[hf] = v.detach().contiguous().clone()
        if set(base) != set(merged):
            raise AssertionError(f"base/merged key sets differ: {sorted(set(base) ^ set(merged))}")
        saved_keys = [k for k in merged if any(k.startswith(m + ".") for m in saved_modules)]
        for k, v in unloaded.items():  # unload() keeps the trained modules_to_save copy, else = base
            if k not in saved_keys and not torch.equal(v, base[k]):
                raise AssertionError(f"unload() and the checkpoint's base weight differ: {k}")
        # 3. Not a no-op: every adapter trained and non-zero, every targeted weight changed by the merge.
        for n, p0 in init_adapters.items():
            p1 = full[n]
            if not p1.abs().sum() > 0 or torch.equal(p1, p0):
                raise AssertionError(f"adapter parameter {n} is zero or untrained")
        changed = [k for k in merged if not torch.equal(merged[k], base[k])]
        missing = sorted(set(lora_targets) - set(changed))
        if missing:
            raise AssertionError(f"merging left LoRA-targeted weights unchanged: {missing}")
        unexpected = sorted(set(changed) - set(lora_targets) - set(saved_keys))
        if unexpected:
            raise AssertionError(f"merging changed weights LoRA does not target: {unexpected}")
        if not set(saved_keys) <= set(changed):
            raise AssertionError(f"modules_to_save copies equal the originals: {sorted(set(saved_keys) - set(changed))}")
        save_file(merged, str(self.ref / "reference_merged_state.safetensors"))
        save_file(base, str(self.ref / "reference_base_state.safetensors"))
        # 4. lora_adapter/adapter_model.safetensors holds the gathered adapter tensors.
        adapter = load_file(str(self.out / "lora_adapter" / "adapter_model.safetensors"))
        for k, v in adapter.items():
            src = [fk for fk in full if fk == k or _drop_adapter_name(fk) == k]
            if len(src) != 1 or not torch.equal(full[src[0]], v):
                raise AssertionError(f"adapter tensor {k} does not match the checkpoint ({src})")
        return dict(
            adapter_keys=sorted(adapter),
            trainable_param_names=sorted(init_adapters),
            lora_targets=sorted(lora_targets),
            modules_to_save_keys=sorted(saved_keys),
            merged_changed_keys=sorted(changed),
        )

    def _reference(self, model, opt):
        import torch
        import torch.distributed as dist
        from safetensors.torch import save_file

        j = self.job
        full = self._full_model_state(model)
        full_optim = self._full_optim_state(opt)
        local = self._local_shapes()
        if self.distributed:
            gathered: list = [None] * self.w
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        # FSDP forward on the fixed input (all ranks participate), compared on rank 0.
        g = torch.Generator()
        g.manual_seed(12345)
        ids = torch.randint(3, min(j["vocab"], 320), _REF_INPUT_SHAPE, generator=g)
        model.eval()
        with torch.no_grad():
            fsdp_out = model(ids) if j["critic"] else model(input_ids=ids).logits
        if self.rank != 0:
            return
        ref_model = self._build()
        if j["lora"] is not None:  # the adapters as initialised (every rank built the same)
            init_adapters = {n: p.detach().clone() for n, p in ref_model.named_parameters() if p.requires_grad}
        ref_model.load_state_dict(full, strict=True)
        ref_model.eval()
        with torch.no_grad():
            ref_out = ref_model(ids) if j["critic"] else ref_model(input_ids=ids).logits
        if not torch.allclose(ref_out, fsdp_out, atol=1e-5, rtol=1e-5):
            raise AssertionError(f"reference forward differs from FSDP forward: "
                                 f"max abs diff {(ref_out - fsdp_out).abs().max().item()}")
        self.ref.mkdir(parents=True, exist_ok=True)
        lora_meta = self._lora_reference(ref_model, full, ids, ref_out, init_adapters) if j["lora"] is not None else {}
        save_file({k: v.contiguous().clone() for k, v in full.items()}, str(self.ref / "reference_full_state.safetensors"))
        if full_optim is not None:
            save_file(full_optim, str(self.ref / "reference_full_optim.safetensors"))
        save_file({"input_ids": ids, ("values" if j["critic"] else "logits"): ref_out.contiguous()},
                  str(self.ref / "reference_logits.safetensors"))
        # Layout facts.
        if self.mesh is not None:
            mesh_shape = list(self.mesh.mesh.shape)
            mesh_names = list(self.mesh.mesh_dim_names)
        else:
            mesh_shape, mesh_names = None, None
        fsdp_size = mesh_shape[-1] if mesh_shape else 1
        global_shapes = {k: list(v.shape) for k, v in full.items()}
        local_shapes = {k: [gathered[r][k] for r in range(self.w)] for k in full}
        empty = {k: [r for r in range(self.w) if gathered[r][k] is not None and len(gathered[r][k]) > 0
                     and gathered[r][k][0] == 0 and global_shapes[k][0] > 0]
                 for k in full}
        empty = {k: v for k, v in empty.items() if v}
        if j["strategy"] == "fsdp2" and self.distributed:
            placements = ["Replicate()", "Shard(dim=0)"] if j["mesh"] == "hsdp" else ["Shard(dim=0)"]
        elif self.distributed and j["fsdp1_tensor"] == "dtensor":
            placements = ["Replicate()", "Shard(dim=0)"] if j["mesh"] == "hsdp" else ["Shard(dim=0)"]
        else:
            placements = None
        files = sorted(str(p.relative_to(self.out)) for p in self.out.rglob("*") if p.is_file())
        meta = dict(j)
        meta.update(
            param_names=self.param_names,
            buffer_keys=self.buffer_keys,
            state_keys=self.saved_state_keys,
            global_shapes=global_shapes,
            local_shapes=local_shapes,
            empty_shards=empty,
            expected_chunk_sizes={k: _chunk_sizes(s[0], fsdp_size) if s else None for k, s in global_shapes.items()},
            mesh_shape=mesh_shape,
            mesh_dim_names=mesh_names,
            fsdp_size=fsdp_size,
            placements=placements,
            sharded=self.distributed,
            files=files,
            reference_files=sorted(p.name for p in self.ref.iterdir()),
            timings=dict(self.timings),
            torch_version=torch.__version__,
            **lora_meta,
        )
        (self.ref / "reference_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m realckpt.fsdp_writer JOBFILE", file=sys.stderr)
        sys.exit(2)
    sys.exit(_launcher_main(sys.argv[1]))
