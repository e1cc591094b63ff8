"""HostBuffer on CUDA: page-locked, aligned, and usable for async host-to-device copies."""
from __future__ import annotations

import pytest
import torch

from infinity.memory import HostBuffer, PinPolicy

pytestmark = pytest.mark.gpu


def test_pinned_buffer_is_page_locked_and_aligned():
    buf = HostBuffer(3 << 20, pin=PinPolicy.AUTO)
    assert buf.pinned and buf.tensor.is_pinned()
    assert buf.address % 4096 == 0


def test_async_copy_round_trip_through_pinned_buffer():
    buf = HostBuffer(1 << 20)
    buf.tensor.copy_(torch.arange(1 << 20, dtype=torch.int64).to(torch.uint8))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_device = buf.tensor.to("cuda", non_blocking=True)
        back = HostBuffer(1 << 20)
        back.tensor.copy_(on_device, non_blocking=True)
    stream.synchronize()
    assert torch.equal(back.tensor, buf.tensor)
