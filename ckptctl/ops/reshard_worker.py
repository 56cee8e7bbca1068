"""torchrun entry point of ``convert-reshard`` for Megatron checkpoints::

    torchrun --nproc-per-node 8 -m ckptctl.ops.reshard_worker SRC --out DST --tp 4 --pp 2 [--dp 1]
             [--overwrite] [--drop-optimizer] [--endpoint-url URL] [--component policy] [--json]

Every process takes its share of the target ranks (target rank r goes to process
``r % WORLD_SIZE``); process 0 writes ``.metadata``, ``common.pt`` and ``metadata.json`` last and
commits. Without torchrun (``WORLD_SIZE`` unset) it runs as one process doing every target
rank in turn, like ``ckptctl convert-reshard``. Only process 0 prints (the summary as JSON with
``--json``); a failure prints one line on every process and exits with ckptctl's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ckptctl.ops.reshard_worker",
                                description="Reshard a Megatron torch_dist checkpoint (torchrun-aware).")
    p.add_argument("src")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--drop-optimizer", action="store_true")
    p.add_argument("--endpoint-url", default=None)
    p.add_argument("--component", default="policy")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ckptctl.errors import CkptctlError
    from ckptctl.ops.reshard_megatron import reshard_megatron

    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = reshard_megatron(args.src, args.out, tp=args.tp, pp=args.pp, dp=args.dp, overwrite=args.overwrite,
                                   drop_optimizer=args.drop_optimizer, endpoint_url=args.endpoint_url,
                                   component=args.component)
    except CkptctlError as exc:
        if rank == 0:  # every process gets the same error; one line is enough
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if rank == 0:
        if args.json:
            print(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        else:
            t = summary.target_layout
            print(f"wrote {summary.destination}: TP={t['tp']} PP={t['pp']} DP={t['dp']}, {summary.chunks} chunks, "
                  f"{summary.bytes / 2**20:.1f} MiB, optimizer {summary.optimizer}, {summary.processes} process(es), "
                  f"{summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
