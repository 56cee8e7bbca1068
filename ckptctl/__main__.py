"""``python -m ckptctl`` (also what ``torchrun ... -m ckptctl convert-reshard ...`` runs)."""

import os
import sys

from ckptctl.cli import main

try:
    main()
except SystemExit as exc:
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "torch.distributed" in sys.modules:
        # A torchrun process leaves without running C++ static destructors: torch's gloo teardown
        # at interpreter exit can abort ("terminate called without an active exception") after
        # the work is done and committed, which the launcher would report as a failed run.
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise
