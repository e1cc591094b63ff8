"""Bytes resident per tier, now and at peak."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from infinity import metrics

TIERS = ("compute", "host", "nvme")


@dataclass(frozen=True)
class MemoryReport:
    """What each tier holds of infinity's partitions (not of activations or torch's own caches)."""

    compute_bytes: int
    host_bytes: int
    nvme_bytes: int
    peak_compute_bytes: int
    peak_host_bytes: int
    peak_nvme_bytes: int
    host_pool_bytes: int = 0  # host buffers allocated for staging, in use or not

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class TierLedger:
    """Counts bytes as the memory manager places and removes them; thread-safe."""

    def __init__(self) -> None:
        self._now = dict.fromkeys(TIERS, 0)
        self._peak = dict.fromkeys(TIERS, 0)
        self._lock = threading.Lock()
        metrics.watch(self, metrics.read_ledger)  # resident bytes per tier, read when metrics are scraped

    def add(self, tier: str, nbytes: int) -> None:
        with self._lock:
            self._now[tier] += nbytes
            self._peak[tier] = max(self._peak[tier], self._now[tier])

    def report(self, host_pool_bytes: int = 0) -> MemoryReport:
        with self._lock:
            return MemoryReport(self._now["compute"], self._now["host"], self._now["nvme"],
                                self._peak["compute"], self._peak["host"], self._peak["nvme"], host_pool_bytes)
