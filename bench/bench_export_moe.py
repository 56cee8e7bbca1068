"""Benchmark ``ckptctl export-hf`` on a Megatron MoE checkpoint beside a dense one of the same size.

Run from the repository root::

    .venv/bin/python bench/bench_export_moe.py [--dir DIR] [--repeat N] [--layers 8] [--experts 32]
                                               [--hidden 1024] [--moe-ffn 1024] [--ep 4]

Prints figures only (no asserts). Goal (MoE issue): stacked expert tensors are huge (Qwen3-30B:
one ``[48, 128, 1536, 2048]`` fc1), so export-hf reads and writes one expert of one layer at a
time: peak memory must not grow with the number of layers or experts. Printed for both
checkpoints: wall time, peak RSS of the export process, the largest single source block it
needs (one expert's gate or up half for MoE; one layer's whole fc1 for the dense model), and
bytes written.

What it writes (once; cached in ``--dir``, default ``$TMPDIR/ckptctl-bench-export-moe``):
SYNTHETIC torch_dist checkpoints in megatron-core's MoE layout, written with ckptctl's own DCP
file writer (``ckptctl.formats.dcp_writer``, the one convert-reshard uses; megatron-core itself
cannot build a model this size on this machine's 2 cores in reasonable time). Stacked
``decoder.layers.*`` keys of a Qwen3-MoE (q/k norms, router, routed experts
``mlp.experts.experts.linear_fc1.weight`` ``[L, E, 2F, H]`` and ``linear_fc2`` ``[L, E, H, F]``,
bf16), laid out as EP=``--ep`` ranks write them: rank r holds experts ``r*E/ep ...``, one chunk per
(layer, expert) and, for fc1, one per gate and up half (as megatron's swiglu factory stores them).
Default: 8 layers x 32 experts x (3 x 1024 x 1024) bf16 = 1.61 GB of experts, ~1.8 GB in all.
The dense checkpoint is a Qwen3 of the same layers, hidden size and vocabulary whose MLP is as big
as all experts together (ffn = E x F): the same bytes, one ``[2 x E x F, H]`` fc1 per layer.
The real-checkpoint MoE tests (tests/test_export_moe.py) prove the mapping; this measures memory.
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

from _measure import IMPORT_LINE  # this script's directory is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

_CHILD = IMPORT_LINE + r"""
import json, sys, time
t0 = time.perf_counter()
from ckptctl.ops.export import export_hf
s = export_hf(sys.argv[1], sys.argv[2], verify=True)
print(json.dumps({"wall": time.perf_counter() - t0, "rss_mb": peak_rss_mb(), "bytes": s.bytes,
                  "tensors": s.tensors, "shards": s.shards}))
"""


def _config(args, moe: bool) -> dict:
    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=16, num_key_value_heads=4, head_dim=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False, dtype="bfloat16", max_position_embeddings=4096, rope_theta=1e6)
    if moe:
        return dict(common, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                    intermediate_size=args.moe_ffn * 4, moe_intermediate_size=args.moe_ffn,
                    num_experts=args.experts, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[])
    return dict(common, architectures=["Qwen3ForCausalLM"], model_type="qwen3",
                intermediate_size=args.experts * args.moe_ffn)


def write_checkpoint(path: str, args, moe: bool) -> None:
    """One SkyRL ``policy/`` directory: the torch_dist files plus ``huggingface/config.json``."""
    import torch

    from ckptctl.formats.dcp_writer import (DcpFileWriter, build_metadata, data_file_name, metadata_bytes,
                                            metadata_json_bytes)

    L, E, H, F, ep = args.layers, args.experts, args.hidden, args.moe_ffn, args.ep
    heads, kv, hd = 16, 4, 64
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(shape, generator=gen) * 0.02).to(dt)

    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = [DcpFileWriter(os.path.join(tmp, data_file_name(r)), data_file_name(r)) for r in range(ep)]
    tensors: dict = {}

    def declare(key, shape):
        tensors[key] = (dt, shape)

    def stacked(name, shape, writer=0):  # one chunk per layer, rank 0
        key = f"decoder.layers.{name}"
        declare(key, (L, *shape))
        for layer in range(L):
            writers[writer].add_tensor(key, (layer, *[0] * len(shape)), rand(1, *shape))

    declare("embedding.word_embeddings.weight", (args.vocab, H))
    writers[0].add_tensor("embedding.word_embeddings.weight", (0, 0), rand(args.vocab, H))
    declare("output_layer.weight", (args.vocab, H))
    writers[-1].add_tensor("output_layer.weight", (0, 0), rand(args.vocab, H))
    declare("decoder.final_layernorm.weight", (H,))
    writers[-1].add_tensor("decoder.final_layernorm.weight", (0,), torch.ones(H, dtype=dt))
    stacked("self_attention.linear_qkv.weight", ((heads + 2 * kv) * hd, H))
    stacked("self_attention.linear_proj.weight", (H, heads * hd))
    stacked("self_attention.linear_qkv.layer_norm_weight", (H,))
    stacked("self_attention.q_layernorm.weight", (hd,))
    stacked("self_attention.k_layernorm.weight", (hd,))
    if moe:
        stacked("pre_mlp_layernorm.weight", (H,))
        stacked("mlp.router.weight", (E, H))
        fc1, fc2 = "decoder.layers.mlp.experts.experts.linear_fc1.weight", "decoder.layers.mlp.experts.experts.linear_fc2.weight"
        declare(fc1, (L, E, 2 * F, H))
        declare(fc2, (L, E, H, F))
        for layer in range(L):
            for e in range(E):
                w = writers[e // (E // ep)]  # EP rank of the expert: contiguous blocks
                w.add_tensor(fc1, (layer, e, 0, 0), rand(1, 1, F, H))  # gate half
                w.add_tensor(fc1, (layer, e, F, 0), rand(1, 1, F, H))  # up half
                w.add_tensor(fc2, (layer, e, 0, 0), rand(1, 1, H, F))
    else:
        stacked("mlp.linear_fc1.layer_norm_weight", (H,))
        ffn = E * F
        stacked("mlp.linear_fc1.weight", (2 * ffn, H), writer=0)
        stacked("mlp.linear_fc2.weight", (H, ffn), writer=ep - 1)
    entries = [e for w in writers for e in w.entries]
    for w in writers:
        w.close()
        if not w.entries:  # the dense model's middle ranks hold nothing here
            os.remove(w.path)
    with open(os.path.join(tmp, ".metadata"), "wb") as f:
        f.write(metadata_bytes(build_metadata(tensors, [], entries)))
    torch.save({}, os.path.join(tmp, "common.pt"))
    with open(os.path.join(tmp, "metadata.json"), "wb") as f:
        f.write(metadata_json_bytes())
    os.makedirs(os.path.join(tmp, "huggingface"))
    with open(os.path.join(tmp, "huggingface", "config.json"), "w") as f:
        json.dump(_config(args, moe), f, indent=2)
    shutil.rmtree(path, ignore_errors=True)
    os.rename(tmp, path)


def run_export(src: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", _CHILD, src, out], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"export of {src} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ckptctl-bench-export-moe"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--moe-ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ep", type=int, default=4)
    args = parser.parse_args()
    if args.experts % args.ep:
        raise SystemExit("--experts must be a multiple of --ep")

    size = f"L{args.layers}_E{args.experts}_H{args.hidden}_F{args.moe_ffn}_V{args.vocab}_ep{args.ep}"
    bf16 = 2
    expert_bytes = args.layers * args.experts * 3 * args.moe_ffn * args.hidden * bf16
    largest = {"moe": args.moe_ffn * args.hidden * bf16, "dense": 2 * args.experts * args.moe_ffn * args.hidden * bf16}
    for kind in ("moe", "dense"):
        path = os.path.join(args.dir, size, kind, "policy")
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            t0 = time.perf_counter()
            write_checkpoint(path, args, moe=kind == "moe")
            print(f"wrote {kind} checkpoint in {time.perf_counter() - t0:.1f} s: {path}")
    print(f"experts: {args.layers} layers x {args.experts} experts x 3 x {args.moe_ffn} x {args.hidden} bf16 = "
          f"{expert_bytes / 1e9:.2f} GB")
    print(f"{'checkpoint':<10} {'on disk':>9} {'wall s':>8} {'peak RSS MB':>12} {'largest source block MB':>24} "
          f"{'written GB':>11} {'tensors':>8}")
    for kind in ("moe", "dense"):
        src = os.path.join(args.dir, size, kind, "policy")
        on_disk = sum(os.path.getsize(os.path.join(src, n)) for n in os.listdir(src) if n.endswith(".distcp"))
        runs = [run_export(src, os.path.join(args.dir, size, kind, "export")) for _ in range(args.repeat)]
        wall = statistics.median(r["wall"] for r in runs)
        rss = statistics.median(r["rss_mb"] for r in runs)
        print(f"{kind:<10} {on_disk / 1e9:>7.2f} GB {wall:>8.1f} {rss:>12.0f} {largest[kind] / 1e6:>24.1f} "
              f"{runs[0]['bytes'] / 1e9:>11.2f} {runs[0]['tensors']:>8}")


if __name__ == "__main__":
    main()
