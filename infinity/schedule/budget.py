"""The stage-3 budgets, in elements as DeepSpeed counts them, and which partitions persist."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Budgets:
    prefetch_elements: int = 50_000_000  # stage3_prefetch_bucket_size: fetched ahead at most
    max_live_elements: int = 1_000_000_000  # stage3_max_live_parameters: on the compute tier at once
    max_reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance: kept if used again this soon
    persistence_threshold: int = 100_000  # stage3_param_persistence_threshold: at most this big persists
    model_persistence_threshold: int = sys.maxsize  # stage3_model_persistence_threshold: persistent total


def persistent_set(partitions: Iterable[tuple[int, int]], budgets: Budgets) -> frozenset[int]:
    """Partitions (id, elements) small enough to stay on the compute tier for the whole run, taken in
    the order given until their total would pass model_persistence_threshold."""
    chosen, total = set(), 0
    for partition, elements in partitions:
        if elements <= budgets.persistence_threshold and total + elements <= budgets.model_persistence_threshold:
            chosen.add(partition)
            total += elements
    return frozenset(chosen)
