"""A span of host memory (address, length) taken from a tensor, array or buffer.

[Note: no torch import here]
io takes addresses and lengths.  A torch tensor is recognised by its methods
(data_ptr, element_size, numel, is_contiguous, device); anything else must
offer the buffer protocol (numpy arrays, bytearray, memoryview, mmap).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from infinity.errors import InfinityError


class BufferError_(InfinityError, TypeError):
    """The object given as a buffer cannot be used for I/O."""


@dataclass(frozen=True)
class Span:
    address: int
    nbytes: int
    view: memoryview  # byte view of the same memory, for the POSIX backend
    owner: Any  # keeps the memory alive while I/O is in flight


def as_span(obj: Any, writable: bool) -> Span:
    """The memory of obj as a Span; writable=True when the I/O will write into it (a read)."""
    if hasattr(obj, "data_ptr") and hasattr(obj, "element_size"):
        return _tensor_span(obj)
    try:
        view = memoryview(obj)
    except TypeError:
        raise BufferError_(f"{type(obj).__name__} is neither a tensor nor a buffer; pass a torch tensor, "
                           "a numpy array, a bytearray or an infinity.memory.HostBuffer") from None
    if not view.c_contiguous:
        raise BufferError_("the buffer is not contiguous; pass a contiguous array (numpy.ascontiguousarray)")
    if writable and view.readonly:
        raise BufferError_("the buffer is read-only and cannot receive a read; pass a bytearray or array")
    view = view.cast("B") if view.nbytes else view
    if not view.nbytes:
        address = 0
    elif not view.readonly:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    elif type(obj) is bytes:  # a bytes object's own storage; it is immutable and stays put
        address = ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0
    else:
        raise BufferError_("this read-only buffer cannot be addressed; pass bytes, a bytearray or an array")
    return Span(address, view.nbytes, view, obj)


def _tensor_span(tensor: Any) -> Span:
    if tensor.device.type != "cpu":
        raise BufferError_(f"the tensor is on {tensor.device}; I/O needs host memory: copy it to a "
                           "(pinned) HostBuffer first")
    if not tensor.is_contiguous():
        raise BufferError_("the tensor is not contiguous; call .contiguous() first")
    nbytes = tensor.numel() * tensor.element_size()
    address = tensor.data_ptr()
    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B") if nbytes else memoryview(b"")
    return Span(address, nbytes, view, tensor)
