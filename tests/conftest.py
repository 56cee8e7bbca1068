"""Shared pytest setup: the real object-store servers (storage_servers) and the real checkpoints
written by torch / megatron-core (realckpt.*_fixtures), each a pytest plugin module."""

pytest_plugins = ["storage_servers", "realckpt.fsdp_fixtures", "realckpt.megatron_fixtures"]
