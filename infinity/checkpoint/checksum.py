"""The checksum of a file streamed through a copy pipeline, computed beside the copy.

[Note: hashing beside the copy]  Hashing each chunk on the pipeline's own thread would hold back the
next chunk's hand-on (sha256, which older checkpoints use, runs at 1.7 GB/s on one core here, about what
a drive moves; crc32c at about 14 GB/s).  Both hashers release the GIL while they hash a large buffer,
so the chunks go, in file order, to one worker thread, and the pipeline keeps each chunk's staging buffer
until its hash is done (the completion `update` returns; see infinity/memory/stream.py).  One worker
keeps the order, so the digest is the file's exactly as a reader computes it.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from infinity.checkpoint.format import CHECKSUM, new_checksum
from infinity.memory.integrity import Checked as Hashed  # one chunk's hash, waited on like an IoFuture


class StreamDigest:
    """The checksum (of algorithm) of the bytes fed to it in order, hashed on one worker thread; use as a
    context manager."""

    def __init__(self, head: bytes = b"", algorithm: str = CHECKSUM):
        self._digest = new_checksum(algorithm)
        self._digest.update(head)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infinity-checksum")

    def update(self, chunk: torch.Tensor) -> Hashed:
        """Queues chunk's bytes (uint8, left untouched until the returned completion is done)."""
        return Hashed(self._worker.submit(self._digest.update, chunk.numpy()))

    def hexdigest(self) -> str:
        """The digest of everything fed so far, once it has all been hashed."""
        self._worker.shutdown(wait=True)
        return self._digest.hexdigest()

    def __enter__(self) -> "StreamDigest":
        return self

    def __exit__(self, *exc: object) -> None:
        self._worker.shutdown(wait=True)
