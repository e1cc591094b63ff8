"""HostBuffer without CUDA: aligned, zero-copy views, released with its last view."""
from __future__ import annotations

import gc

import pytest
import torch

from infinity.memory import HostBuffer, PinPolicy
from infinity.memory.host_buffer import HUGE_PAGE


@pytest.mark.parametrize("nbytes", [1, 4095, 4096, HUGE_PAGE + 17])
def test_alignment_and_size(nbytes):
    buf = HostBuffer(nbytes)
    assert buf.nbytes == nbytes and buf.address % 4096 == 0
    assert bool((buf.tensor == 0).all())


def test_large_buffers_are_huge_page_aligned():
    assert HostBuffer(HUGE_PAGE).address % HUGE_PAGE == 0


def test_memory_lives_while_a_view_does():
    buf = HostBuffer(8192)
    view = buf.view(torch.int32)
    view[:] = 7
    buf.release()
    gc.collect()
    assert buf.nbytes == 0
    assert int(view.sum()) == 7 * 2048  # still valid: the view holds the memory


def test_pinned_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="PinPolicy.PINNED needs CUDA"):
        HostBuffer(4096, pin=PinPolicy.PINNED)
