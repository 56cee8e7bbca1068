"""Shared pytest setup: the real object-store servers live in tests/storage_servers.py."""

pytest_plugins = ["storage_servers"]
