"""Regenerate examples/skyrl-run: a tiny SkyRL FSDP2 checkpoint tree written by the real libraries.

    .venv/bin/python examples/make_example.py

A 2-layer Llama (hidden 16, vocab 128) trained with FSDP2 on 2 gloo processes: steps 1-3
complete, the pointer at 3, and step 4 cut off before trainer_state.pt (a crashed save).
"""

import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from realckpt.fsdp_writer import write_fsdp_tree  # noqa: E402

TINY = dict(arch="llama", world_size=2, vocab=128, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32,
            persistent_buffers=False)

if __name__ == "__main__":
    out = os.path.join(HERE, "skyrl-run")
    shutil.rmtree(out, ignore_errors=True)
    write_fsdp_tree(out, steps=(1, 2, 3, 4), pointer=3, **TINY)
    os.remove(os.path.join(out, "global_step_4", "trainer_state.pt"))
    shutil.rmtree(out + ".reference", ignore_errors=True)
    print(f"wrote {out}")
