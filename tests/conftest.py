"""Shared pytest setup: the real object-store servers (storage_servers) and the real checkpoints
written by torch / megatron-core (realckpt.*_fixtures), each a pytest plugin module.

The suite runs in several processes (pytest-xdist, ``-n`` in pyproject's addopts; ``-n0`` runs it
in one). The real checkpoints cost most of its time to write, so every process shares one build
of each: unless ``CKPTCTL_TEST_CACHE`` / ``CKPTCTL_REALCKPT_CACHE`` name caches of their own, the
main process points both at one temporary directory (removed at the end) before the workers
start, and each fixture builds into it under a file lock (``realckpt.fsdp_writer.cached``,
``realckpt.megatron_fixtures.building``)."""

import os
import shutil
import tempfile

import pytest

pytest_plugins = ["storage_servers", "realckpt.fsdp_fixtures", "realckpt.megatron_fixtures"]

_CACHES = ("CKPTCTL_TEST_CACHE", "CKPTCTL_REALCKPT_CACHE")


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER") or all(os.environ.get(var) for var in _CACHES):
        return  # a worker inherits the main process's caches
    shared = tempfile.mkdtemp(prefix="ckptctl-test-fixtures-")
    config._ckptctl_shared_fixtures = shared
    for var in _CACHES:
        if not os.environ.get(var):
            os.environ[var] = os.path.join(shared, var.lower())


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per CPU this process may run on, at least 2 and at most 4.
    xdist's own default counts physical cores, which is 1 on the usual 2-vCPU cloud VM (two
    hyperthreads of one core): the suite then ran in one process there, in twice the time,
    though much of it waits on object-store servers, timeouts and torchrun launches that a
    second worker overlaps even on one CPU."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook honours the override
    return max(2, min(4, len(os.sched_getaffinity(0))))


def pytest_unconfigure(config):
    shared = getattr(config, "_ckptctl_shared_fixtures", None)
    if shared:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.fixture(scope="session")
def distopt_ckpts(tmp_path_factory):
    """Every real DistributedOptimizer fixture directory by name, written once per session
    (realckpt.distopt_writer; cached across sessions under ``$CKPTCTL_REALCKPT_CACHE``)."""
    from distopt_tree import distopt_fixtures

    return distopt_fixtures(tmp_path_factory)
