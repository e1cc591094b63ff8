"""Aligned host buffers that torch and numpy see without a copy.

[Note: why torch allocates and we slice]
The buffer is a torch uint8 tensor over-allocated by one alignment and sliced
at the first aligned address.  torch owns the memory, so it is freed when the
last view (tensor or numpy array) is dropped: deterministic under CPython's
reference counting, and never freed under a live view.  On CUDA the same
allocation is page-locked (pin_memory=True) so host↔device copies are async.
"""
from __future__ import annotations

import ctypes
import enum
import functools
import logging
from typing import Any

import torch

from infinity.io.align import DEFAULT_ALIGNMENT

log = logging.getLogger("infinity.memory")

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14


@functools.lru_cache(maxsize=1)
def _madvise() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Asks the kernel to back [address, address + nbytes) with huge pages; False when it declines."""
    if _madvise()(address, nbytes, MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) declined: errno %d", ctypes.get_errno())
        return False
    return True


class PinPolicy(enum.Enum):
    AUTO = "auto"  # page-locked when CUDA is present, else pageable
    PINNED = "pinned"  # page-locked; an error without CUDA
    PAGEABLE = "pageable"


class PagePolicy(enum.Enum):
    HUGE = "huge"  # buffers of HUGE_PAGE bytes or more: 2 MiB-aligned and advised MADV_HUGEPAGE
    BASE = "base"  # the kernel's default pages (for comparison; slower for large transfers)


def _storage_uses(t: torch.Tensor) -> int:
    """References to t's storage (each tensor viewing it holds one; the query's own wrapper is counted too)."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


class HostBuffer:
    """nbytes of host memory aligned to `alignment`, as a uint8 tensor (.tensor) or numpy array (.numpy())."""

    def __init__(self, nbytes: int, alignment: int = DEFAULT_ALIGNMENT, pin: PinPolicy = PinPolicy.AUTO,
                 zero: bool = True, pages: PagePolicy = PagePolicy.HUGE):
        if nbytes < 0 or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"HostBuffer needs nbytes >= 0 and a power-of-two alignment, got {nbytes}, {alignment}")
        pinned = pin is PinPolicy.PINNED or (pin is PinPolicy.AUTO and torch.cuda.is_available())
        if pinned and not torch.cuda.is_available():
            raise ValueError("PinPolicy.PINNED needs CUDA; use PinPolicy.AUTO on a machine without a GPU")
        huge = pages is PagePolicy.HUGE and not pinned and nbytes >= HUGE_PAGE
        base = max(alignment, HUGE_PAGE) if huge else alignment
        raw = torch.empty(nbytes + base, dtype=torch.uint8, pin_memory=pinned)
        skip = (-raw.data_ptr()) % base
        self.tensor: torch.Tensor = raw[skip:skip + nbytes]
        self.huge_pages = huge and advise_huge_pages(self.tensor.data_ptr(), nbytes)
        if zero:
            self.tensor.zero_()  # also faults the pages in, so the first transfer does not pay for it
        self.alignment = alignment
        self.pinned = pinned
        self._own_uses = _storage_uses(self.tensor)

    def views_outside(self) -> int:
        """How many tensors other than .tensor share this buffer's memory now (0 when nobody else holds it).

        [Note: counting views]  Every tensor that views the buffer (a slice, a dtype view, a Parameter whose
        .data was set to one, a tensor autograd saved for backward) holds one reference to the same torch
        storage; the count is that storage's use count less the buffer's own, taken at construction."""
        return _storage_uses(self.tensor) - self._own_uses

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    @property
    def address(self) -> int:
        return self.tensor.data_ptr()

    def view(self, dtype: torch.dtype, count: int | None = None) -> torch.Tensor:
        """The first `count` elements (default: as many as fit) as a tensor of dtype, sharing memory."""
        size = torch.tensor([], dtype=dtype).element_size()
        count = self.nbytes // size if count is None else count
        return self.tensor[: count * size].view(dtype)

    def numpy(self) -> Any:
        return self.tensor.numpy()

    def release(self) -> None:
        """Drops this buffer's reference; the memory goes when the last view of it does."""
        self.tensor = torch.empty(0, dtype=torch.uint8)
