"""Session fixtures: real fsdp checkpoints, written once per test session (pytest plugin)."""
