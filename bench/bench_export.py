"""Benchmark ``ckptctl export-hf`` against the naive merge on a ~1.5 GB fp32 FSDP2 checkpoint (W=4).

Run from the repository root::

    .venv/bin/python bench/bench_export.py [--dir DIR] [--repeat N] [--hidden 1024] [--layers 24]
                                           [--intermediate 3072] [--vocab 32000] [--world-size 4]
                                           [--lora [--lora-r 16] [--lora-alpha 32]] [--no-compare]
                                           [--crc-off]

Prints figures only (no asserts). Goals (from the export-hf issue): peak RSS of export-hf at most
1/3 of the naive merge's, wall time at most 0.8x. From the corruption issue: the CRC-32 checks of
every tensor byte read cost at most 5% of export-hf's wall time. Printed: the seconds spent in
``crc32`` (ISA-L's where the ``isal`` package is installed, else zlib's), counted by
``ckptctl.formats.torchzip.CRC_STATS``, over export-hf's wall; with ``--crc-off`` also, each
round, an export with checking disabled through the internal knob ``torchzip.CHECK_CRC``
(a noisy difference of two wall times on a shared machine).

What it does:
1. Writes (once; cached in ``--dir``, default ``$TMPDIR/ckptctl-bench-export``) a REAL SkyRL FSDP2
   ``policy/`` at world size 4 with the test-fixture writer ``tests/realckpt/fsdp_writer.py``
   (``fully_shard`` on a gloo CPU group, one real AdamW step, ``torch.save`` of each rank's
   ``model.state_dict()`` / ``optimizer.state_dict()``, ``huggingface/`` with the tokenizer).
   The model is the tiny Llama scaled up (default hidden 1024, 24 layers, ffn 3072, vocab 32000:
   ~354 M parameters, ~1.42 GB of fp32 weights in the ``model_*`` files). Only the writer's
   *reference* step is replaced (it gathers full weights and full Adam moments on every rank:
   ~4x the model per rank, more than this machine's RAM at this size); the checkpoint files
   are the writer's own.

   With ``--lora`` the same model is wrapped as SkyRL does with LoRA
   (``peft.get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
   target_modules=[q,k,v,o,gate,up,down]_proj))``, the writer's ``lora=`` job keyword): the model
   files hold the PEFT state dict (``base_model.model.…base_layer.weight``, ``lora_A/B.default``;
   +7.3 M adapter parameters at the default size) and ``lora_adapter/`` holds
   ``adapter_config.json`` + ``adapter_model.safetensors``. That checkpoint is cached separately,
   in ``--dir/lora/<size>_r<R>_a<ALPHA>_<hash of the LoRA config>``. The writer's LoRA reference
   step (``_lora_reference``, which needs the full state on rank 0) is skipped with the rest of
   the reference step; ``lora_adapter/`` is written in the writer's save step, which gathers
   the full model on every rank (4 x 1.42 GB at this size; measured: ~10 GB of RAM for the
   whole job, 2.7 GB in the largest rank process, ~45 s on 2 cores: fine on a 23 GB machine, so
   the default size is the same as without ``--lora``).
2. Runs, each in a FRESH child process (interleaved, the order rotated each round, ``--repeat``
   rounds, outputs deleted between runs, page cache warm for both after the first round):

   a. ``ckptctl export-hf POLICY --out OUT --json`` (through ``ckptctl.cli.app``, verification
      on, the default); with ``--lora``: ``export-hf POLICY --out OUT --merge-lora --json``;
   b. the naive merge: ``torch.load(weights_only=True)`` of every rank's model file, per key
      ``DTensor.to_local()`` of every rank concatenated along dim 0 (rank 0's copy for plain
      tensors), ``AutoModelForCausalLM.from_config`` + ``load_state_dict`` +
      ``save_pretrained`` (+ the tokenizer files copied). With ``--lora``, between
      ``from_config`` and ``load_state_dict``: ``peft.get_peft_model(model,
      LoraConfig.from_pretrained(POLICY/lora_adapter))`` (peft's own reading of
      ``adapter_config.json``: its constructor keys only), then ``load_state_dict`` of the
      PEFT-named full state (no missing key allowed), ``merge_and_unload()``, ``save_pretrained``.
      Like the plain naive merge, it keeps the loaded rank dicts alive (as a simple script does).

   Wall time is measured by this script around the child (interpreter start and imports
   included, for both); CPU time is the child's own user+sys (all its threads). Peak RSS is the child's ``VmHWM`` from ``/proc/self/status`` (Linux
   carries ``ru_maxrss`` over ``execve`` from the parent, so it is not used).
3. Prints a comparison table and whether the goals are met; checks once that both outputs hold
   the same tensors (names, shapes, dtypes; values bit-identical, or with ``--lora`` within
   atol 1e-6, with the largest difference printed), one tensor at a time through ``safe_open``.
   With ``--lora`` it also counts the LoRA-targeted weights that the merge changed (output vs
   the checkpoint's ``base_layer`` weight; all of them must have changed, or the fixture would
   not test the merge).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _measure import exit_as_ckptctl, peak_rss_mb  # this script's directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TESTS = os.path.join(REPO, "tests")

RSS_GOAL = 1 / 3
TIME_GOAL = 0.8
CRC_GOAL = 0.05  # CRC-32 checking: at most 5% of export-hf's wall time
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------
# helpers shared by the parent and the children
# ---------------------------------------------------------------------------------------------
def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


# ---------------------------------------------------------------------------------------------
# 1. the checkpoint
# ---------------------------------------------------------------------------------------------
def job_kwargs(args) -> dict:
    kw = dict(world_size=args.world_size, arch="llama", hidden=args.hidden, layers=args.layers,
              intermediate=args.intermediate, vocab=args.vocab, heads=16, kv_heads=4, seed=0,
              num_steps=1, timeout=3600)
    if args.lora:  # SkyRL's LoRA policy: peft.get_peft_model(model, LoraConfig(**lora))
        kw["lora"] = {"task_type": "CAUSAL_LM", "r": args.lora_r, "lora_alpha": args.lora_alpha,
                      "target_modules": list(LORA_TARGETS)}
    return kw


def checkpoint_dir(root: str, kwargs: dict) -> tuple[str, str]:
    """(cache directory, display name) of the checkpoint for ``kwargs``; LoRA ones in ``root/lora/``."""
    name = "w{world_size}_h{hidden}_l{layers}_f{intermediate}_v{vocab}".format(**kwargs)
    lora = kwargs.get("lora")
    if not lora:
        return os.path.join(root, name), name
    import hashlib

    digest = hashlib.sha256(json.dumps(lora, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{name}_r{lora['r']}_a{lora['lora_alpha']}_{digest}"
    return os.path.join(root, "lora", name), "lora/" + name


def ensure_checkpoint(root: str, kwargs: dict) -> str:
    """The cached policy/ dir for ``kwargs``, written first if missing (in a child process)."""
    base, name = checkpoint_dir(root, kwargs)
    policy = os.path.join(base, "policy")
    done = os.path.join(base, "COMPLETE")
    if os.path.isfile(done):
        return policy
    if os.path.exists(base):
        shutil.rmtree(base)
    os.makedirs(base)
    print(f"writing the checkpoint ({name}) with tests/realckpt/fsdp_writer.py; several minutes ...", flush=True)
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_generate", policy, json.dumps(kwargs)],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"checkpoint generation failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n"
                         f"{proc.stderr[-4000:]}")
    # The launcher waits for its rank processes: RUSAGE_CHILDREN of this process covers the
    # generator child and its ranks (the largest of them, not their sum).
    import resource

    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(done, "w") as f:
        json.dump({"seconds": round(time.monotonic() - t0, 1), "kwargs": kwargs,
                   "largest_process_peak_rss_mb": round(peak)}, f)
    print(f"  written in {time.monotonic() - t0:.0f}s (largest process peak RSS {peak:.0f} MB)", flush=True)
    return policy


def _generate_main(policy: str, kwargs: dict) -> int:
    """Child: run the FSDP writer's launcher in-process, with a light reference step."""
    sys.path.insert(0, TESTS)
    from realckpt import fsdp_writer as fw

    def light_reference(self, model, opt):  # rank 0 writes what the launcher reads back
        if self.rank == 0:
            self.ref.mkdir(parents=True, exist_ok=True)
            (self.ref / "reference_meta.json").write_text(json.dumps({"timings": dict(self.timings)}))

    fw._RankWriter._reference = light_reference  # inherited by the fork-started rank processes
    job = fw._normalize_job(policy, kwargs)
    with tempfile.TemporaryDirectory(prefix="bench-export-launch-") as tmp:
        jobfile = os.path.join(tmp, "jobs.json")
        with open(jobfile, "w") as f:
            json.dump({"jobs": [job], "start_method": "fork", "tmp": tmp}, f)
        return fw._launcher_main(jobfile)


# ---------------------------------------------------------------------------------------------
# 2. the two contenders (run in fresh children)
# ---------------------------------------------------------------------------------------------
def _child_export(src: str, out: str, lora: bool = False, check_crc: bool = True) -> dict:
    from ckptctl.cli import app
    from ckptctl.formats import torchzip

    torchzip.CHECK_CRC = check_crc  # internal knob, for the "export, CRC off" contender only
    try:
        app(["export-hf", src, "--out", out] + (["--merge-lora"] if lora else []) + ["--json"],
            standalone_mode=False)
    except SystemExit as exc:  # typer.Exit from handle_errors
        if exc.code:
            raise
    if not os.path.isfile(os.path.join(out, "config.json")):  # never time a run that wrote nothing
        raise SystemExit(f"export-hf wrote no {out}/config.json")
    return {"crc_s": torchzip.CRC_STATS.seconds, "crc_bytes": torchzip.CRC_STATS.bytes,
            "crc_impl": torchzip.CRC_IMPLEMENTATION}


def _child_export_no_crc(src: str, out: str, lora: bool = False) -> dict:
    return _child_export(src, out, lora, check_crc=False)


def _child_naive(src: str, out: str, lora: bool = False) -> dict:
    import glob
    import re

    import torch
    import torch.distributed.tensor  # noqa: F401  (lets weights_only=True rebuild DTensors)
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(glob.glob(os.path.join(src, "model_world_size_*_rank_*.pt")),
                   key=lambda p: int(re.search(r"rank_(\d+)", p).group(1)))
    shards = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    merged = {}
    for key, first in shards[0].items():
        if isinstance(first, DTensor):
            merged[key] = torch.cat([sd[key].to_local() for sd in shards], dim=0)
        else:
            merged[key] = first
    config = AutoConfig.from_pretrained(os.path.join(src, "huggingface"))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if lora:
        import warnings

        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "runtime_config key ... ignored"
            # peft's own reading of adapter_config.json (its constructor keys only; a plain
            # LoraConfig(**json) would keep runtime_config as a dict)
            lora_config = LoraConfig.from_pretrained(os.path.join(src, "lora_adapter"))
            model = get_peft_model(model, lora_config)
        res = model.load_state_dict(merged, strict=False)
        unexpected = [k for k in res.unexpected_keys if not k.endswith("rotary_emb.inv_freq")]
        if res.missing_keys or unexpected:
            raise RuntimeError(f"naive LoRA load: missing {res.missing_keys[:5]}, unexpected {unexpected[:5]}")
        model = model.merge_and_unload()
    else:
        model.load_state_dict(merged, strict=False)
    model.save_pretrained(out)
    for name in os.listdir(os.path.join(src, "huggingface")):
        if name != "config.json" and not os.path.exists(os.path.join(out, name)):
            shutil.copy(os.path.join(src, "huggingface", name), os.path.join(out, name))
    return {}


def _child_main(mode: str, src: str, out: str, result_file: str, variant: str = "plain") -> int:
    t0 = time.perf_counter()
    extra = {"export": _child_export, "export-nocrc": _child_export_no_crc,
             "naive": _child_naive}[mode](src, out, lora=variant == "lora")
    with open(result_file, "w") as f:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        json.dump({"inner_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                   "cpu_s": ru.ru_utime + ru.ru_stime, **(extra or {})}, f)
    return 0


def run_child(mode: str, src: str, out: str, lora: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_file = tmp.name
    try:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", mode, src, out, result_file,
                               "lora" if lora else "plain"],
                              cwd=REPO, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{mode} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        with open(result_file) as f:
            res = json.load(f)
    finally:
        os.unlink(result_file)
    res["wall_s"] = wall
    res["out_bytes"] = du(out)
    return res


def _safetensors_index(d: str) -> dict[str, str]:
    """tensor name -> the .safetensors file of ``d`` holding it (headers only)."""
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(d)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(d, name), "pt") as f:
                for k in f.keys():
                    out[k] = os.path.join(d, name)
    return out


def compare_outputs(a: str, b: str, atol: float | None = None) -> tuple[list[str], dict]:
    """Same tensor names, shapes, dtypes and values in two HF dirs (loaded one tensor at a time):
    bytes equal (``atol=None``) or ``|a - b| <= atol``. Returns (problems, stats)."""
    from safetensors import safe_open

    ia, ib = _safetensors_index(a), _safetensors_index(b)
    problems = []
    if set(ia) != set(ib):
        problems.append(f"names differ: only in export {sorted(set(ia) - set(ib))[:5]}, "
                        f"only in naive {sorted(set(ib) - set(ia))[:5]}")
    common = sorted(set(ia) & set(ib))
    stats = {"tensors": len(common), "identical": 0, "max_abs_diff": 0.0, "max_abs_diff_at": None}
    for k in common:
        with safe_open(ia[k], "pt") as fa, safe_open(ib[k], "pt") as fb:
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            problems.append(f"{k}: {list(ta.shape)} {ta.dtype} vs {list(tb.shape)} {tb.dtype}")
            continue
        if bool((ta == tb).all()):
            stats["identical"] += 1
            continue
        diff = (ta.double() - tb.double()).abs().max().item() if ta.is_floating_point() else float("inf")
        if diff > stats["max_abs_diff"]:
            stats["max_abs_diff"], stats["max_abs_diff_at"] = diff, k
        if atol is None or not diff <= atol:
            problems.append(f"{k}: differs (max abs diff {diff:.3g})")
    return problems, stats


def count_merged_changes(policy: str, out: str) -> tuple[int, int, list[str]]:
    """LoRA: of the weights with a ``base_layer`` in the checkpoint, how many differ in ``out``
    (rank files memory-mapped, one weight assembled at a time). Returns (changed, total, unchanged)."""
    import glob
    import logging
    import re

    import torch
    import torch.distributed.tensor  # noqa: F401
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)  # unpickled meshes, no PG
    files = sorted(glob.glob(os.path.join(policy, "model_world_size_*_rank_*.pt")),
                   key=lambda p: int(re.search(r"rank_(\d+)", p).group(1)))
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    index = _safetensors_index(out)
    prefix = "base_model.model."
    changed, unchanged = 0, []
    keys = [k for k in shards[0] if k.endswith(".base_layer.weight")]
    for key in keys:
        v = shards[0][key]
        base = torch.cat([sd[key].to_local() for sd in shards], dim=0) if isinstance(v, DTensor) else v
        hf = key[len(prefix):].replace(".base_layer.", ".")
        with safe_open(index[hf], "pt") as f:
            merged = f.get_tensor(hf)
        if torch.equal(base, merged):
            unchanged.append(hf)
        else:
            changed += 1
    return changed, len(keys), unchanged


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_generate":
        return _generate_main(sys.argv[2], json.loads(sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        status = _child_main(*sys.argv[2:7])
        if sys.argv[2] != "naive":
            exit_as_ckptctl(status)
        return status

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-export"),
                   help="cache of the generated checkpoint (reused) and scratch outputs")
    p.add_argument("--repeat", type=int, default=2, help="rounds of (export-hf, naive), interleaved")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--lora", action="store_true",
                   help="a LoRA (PEFT) checkpoint: export-hf --merge-lora vs get_peft_model + merge_and_unload")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (with --lora)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (with --lora)")
    p.add_argument("--no-compare", action="store_true", help="skip the tensor-by-tensor output comparison")
    p.add_argument("--crc-off", action="store_true",
                   help="also run export-hf with CRC checking disabled (internal knob) each round")
    args = p.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    kwargs = job_kwargs(args)
    policy = ensure_checkpoint(args.dir, kwargs)
    model_bytes = sum(os.path.getsize(os.path.join(policy, f)) for f in os.listdir(policy)
                      if f.startswith("model_world_size_"))
    print(f"checkpoint: {policy}")
    print(f"  W={args.world_size}, hidden {args.hidden}, {args.layers} layers, ffn {args.intermediate}, "
          f"vocab {args.vocab}; model files {mb(model_bytes)} (whole component {mb(du(policy))})")
    if args.lora:
        adapter = os.path.join(policy, "lora_adapter")
        print(f"  LoRA r={args.lora_r}, alpha={args.lora_alpha}, targets {','.join(LORA_TARGETS)}; "
              f"lora_adapter/ {mb(du(adapter)) if os.path.isdir(adapter) else 'MISSING'}")
    try:
        with open(os.path.join(os.path.dirname(policy), "COMPLETE")) as f:
            gen = json.load(f)
        print(f"  generated in {gen['seconds']:.0f} s"
              + (f" (largest process peak RSS {gen['largest_process_peak_rss_mb']} MB)"
                 if "largest_process_peak_rss_mb" in gen else ""))
    except (OSError, ValueError, KeyError):
        pass

    scratch = os.path.join(args.dir, "out")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    modes = ("export", "naive") + (("export-nocrc",) if args.crc_off else ())
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    kept = {}
    for rnd in range(args.repeat):
        # rotated each round: a run pays for the page-cache writeback of the one before it
        for mode in modes[rnd % len(modes):] + modes[:rnd % len(modes)]:
            out = os.path.join(scratch, f"{mode}-{rnd}")
            res = run_child(mode, policy, out, lora=args.lora)
            results[mode].append(res)
            print(f"  round {rnd + 1} {mode:6s}: wall {res['wall_s']:6.1f} s  (inside {res['inner_s']:6.1f} s)  "
                  f"CPU {res['cpu_s']:6.1f} s  peak RSS {res['peak_rss_mb']:7.0f} MB  output {mb(res['out_bytes'])}"
                  + (f"  CRC {res['crc_s']:.2f} s over {mb(res['crc_bytes'])}" if mode == "export" else ""),
                  flush=True)
            if rnd == 0:
                kept[mode] = out
            else:
                shutil.rmtree(out, ignore_errors=True)

    if not args.no_compare:
        problems, stats = compare_outputs(kept["export"], kept["naive"], atol=LORA_ATOL if args.lora else None)
        if args.lora:
            print(f"outputs: {stats['tensors']} tensors, {stats['identical']} bit-identical, max abs diff "
                  f"{stats['max_abs_diff']:.3g}" + (f" ({stats['max_abs_diff_at']})" if stats["max_abs_diff_at"] else "")
                  + (f"; same names, shapes, dtypes, values within atol {LORA_ATOL:g}" if not problems
                     else "; DIFFER: " + "; ".join(problems[:5])))
            changed, total, unchanged = count_merged_changes(policy, kept["naive"])
            print(f"merge: {changed}/{total} LoRA-targeted weights changed by the merge"
                  + (f"; UNCHANGED: {unchanged[:5]}" if unchanged else ""))
        else:
            print("outputs: " + ("identical tensors (names, shapes, dtypes, values)" if not problems
                                 else "DIFFER: " + "; ".join(problems[:5])))
    shutil.rmtree(scratch, ignore_errors=True)

    def med(mode, key):
        return statistics.median(r[key] for r in results[mode])

    ew, nw = med("export", "wall_s"), med("naive", "wall_s")
    er, nr = med("export", "peak_rss_mb"), med("naive", "peak_rss_mb")
    print()
    print(f"{'':28s}{'export-hf':>12s}{'naive merge':>14s}{'ratio':>9s}{'goal':>9s}  met")
    print(f"{'wall time (s, median)':28s}{ew:12.1f}{nw:14.1f}{ew / nw:9.2f}{'<= ' + str(TIME_GOAL):>9s}  "
          f"{'yes' if ew / nw <= TIME_GOAL else 'NO'}")
    print(f"{'peak RSS (MB, median)':28s}{er:12.0f}{nr:14.0f}{er / nr:9.2f}{'<= 0.33':>9s}  "
          f"{'yes' if er / nr <= RSS_GOAL else 'NO'}")
    ec, nc = med("export", "cpu_s"), med("naive", "cpu_s")
    print(f"{'CPU time (s, median)':28s}{ec:12.1f}{nc:14.1f}{ec / nc:9.2f}{'-':>9s}  (user+sys; less noisy "
          "than wall time on a shared machine)")
    crc_s, crc_bytes = med("export", "crc_s"), med("export", "crc_bytes")
    print(f"{'CRC-32 checks (s, median)':28s}{crc_s:12.2f}{'':14s}{crc_s / ew:9.3f}{'<= 0.05':>9s}  "
          f"{'yes' if crc_s / ew <= CRC_GOAL else 'NO'}  (time in {results['export'][0]['crc_impl']}'s crc32 over "
          f"{mb(crc_bytes)}, as a share of export-hf's wall; it runs in the read-ahead thread, so this bounds the "
          "wall it adds)")
    if args.crc_off:
        ow = med("export-nocrc", "wall_s")
        print(f"{'export-hf, CRC off (s)':28s}{ow:12.1f}{'':14s}{(ew - ow) / ew:9.3f}{'<= 0.05':>9s}  "
              f"{'yes' if (ew - ow) / ew <= CRC_GOAL else 'NO'}  (wall saved by not checking, as a share of "
              "export-hf's wall; noisy)")
    print(f"({'LoRA, export-hf --merge-lora; ' if args.lora else ''}model files {mb(model_bytes)}; "
          f"{args.repeat} round(s); machine: {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
