"""Session fixtures: real megatron checkpoints, written once per test session (pytest plugin)."""
