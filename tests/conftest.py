"""Shared fixtures: real handles of each backend over real files under tmp_path."""
from __future__ import annotations

import os

import pytest

from infinity.config.aio import AioConfig, Backend
from infinity.io import DirectPolicy, open_handle


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[Backend.LIBAIO, Backend.POSIX], ids=["libaio", "posix"])
def backend(request) -> Backend:
    return request.param


@pytest.fixture
def make_handle(backend):
    handles = []

    def make(direct: DirectPolicy = DirectPolicy.AUTO, **settings):
        settings.setdefault("block_size", 64 * 1024)
        settings.setdefault("queue_depth", 8)
        h = open_handle(AioConfig(backend=backend, **settings), direct=direct)
        handles.append(h)
        return h

    yield make
    for h in handles:
        h.close()


def reference(nbytes: int, seed: int = 0) -> bytes:
    """Random bytes, different for every size and seed."""
    return os.urandom(nbytes)
