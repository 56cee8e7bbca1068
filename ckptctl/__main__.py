"""``python -m ckptctl`` (also what ``torchrun ... -m ckptctl convert-reshard ...`` runs)."""

from ckptctl.cli import main

main()
