"""torchrun entry point of ``convert-reshard`` for Megatron checkpoints::

    torchrun --nproc-per-node 8 -m ckptctl.ops.reshard_worker SRC --out DST --tp 4 --pp 2 [--dp 1]
             [--overwrite] [--drop-optimizer] [--endpoint-url URL] [--component policy] [--json]
             [--concurrency N] [--max-memory SIZE]

Every process takes its share of the target ranks (target rank r goes to process
``r % WORLD_SIZE``); process 0 writes ``.metadata``, ``common.pt`` and ``metadata.json`` last and
commits. Without torchrun (``WORLD_SIZE`` unset) it runs as one process doing every target
rank in turn, like ``ckptctl convert-reshard``. Only process 0 prints, through ckptctl's output
module (the summary as JSON with ``--json``); a failure (every process gets the same one) is one
line and exits with ckptctl's exit code.
"""

from __future__ import annotations

import argparse
import os


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
    p.add_argument("--concurrency", type=int, default=None)  # per process, as convert-reshard's
    p.add_argument("--max-memory", default=None)
    p.add_argument("--component", default="policy")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from ckptctl.errors import CkptctlError
    from ckptctl.ops.reshard_megatron import reshard_megatron
    from ckptctl.output import Output, print_error
    from ckptctl.render import render_reshard

    rank_zero = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = reshard_megatron(args.src, args.out, tp=args.tp, pp=args.pp, dp=args.dp, overwrite=args.overwrite,
                                   drop_optimizer=args.drop_optimizer, endpoint_url=args.endpoint_url,
                                   component=args.component, concurrency=args.concurrency,
                                   max_memory=args.max_memory)
    except CkptctlError as exc:
        if rank_zero:
            print_error(str(exc))
        return exc.exit_code
    if rank_zero:
        Output(args.json).result(summary, render_reshard)
    return 0


if __name__ == "__main__":
    from ckptctl.ops.distributed import exit_process

    exit_process(main())
