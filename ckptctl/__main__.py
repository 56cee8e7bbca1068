"""``python -m ckptctl`` (also what ``torchrun ... -m ckptctl convert-reshard ...`` runs)."""

from ckptctl.cli import main
from ckptctl.ops.distributed import exit_process

try:
    main()
except SystemExit as exc:
    exit_process(exc.code)
