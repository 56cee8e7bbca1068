"""Shared pytest setup: the real object-store servers (storage_servers) and the real checkpoints
written by torch / megatron-core (realckpt.*_fixtures), each a pytest plugin module."""

import pytest

pytest_plugins = ["storage_servers", "realckpt.fsdp_fixtures", "realckpt.megatron_fixtures"]


@pytest.fixture(scope="session")
def distopt_ckpts(tmp_path_factory):
    """Every real DistributedOptimizer fixture directory by name, written once per session
    (realckpt.distopt_writer; cached across sessions under ``$CKPTCTL_REALCKPT_CACHE``)."""
    from distopt_tree import distopt_fixtures

    return distopt_fixtures(tmp_path_factory)
