"""An engine's parameter whose shape changed inside GatheredParameters (resize_token_embeddings after
initialize): the engine's run is rebuilt around the new shapes.

[Note: rebuilding a run]  Every partition, sub-group and schedule of a run is laid out by the parameters'
shapes, so a new shape needs a new run.  The old run's state goes, one parameter at a time, to a scratch
folder beside the swap files (<param nvme_path>/infinity-resize-<pid>-rank<r>: each parameter's whole
values, and this rank's fp32 master weights and Adam moments); the old run closes; the parameters are
written into a fresh zero.Init store (offload_param nvme), or set whole again (other tiers), one at a time;
a new run adopts them as it adopts a model built under zero.Init; the optimizer states are written back
into its sub-groups and the scratch folder goes.  Host memory holds one parameter (and one sub-group) at a
time.  Every parameter keeps its values, master weights and moments exactly; a resized one starts from its
new values with zero moments (its old moments belong to other rows), at the run's step count.  With
several ranks every rank rebuilds in the same order (the reads and writes are collectives).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from infinity.swap.params import Tier
from infinity.zero.init import ATTR, InitRun
from infinity.zero.settings import dtype_of


def resize(run: Any, changed: dict[int, torch.Tensor], source: int) -> None:
    """Rebuilds the engine that owns run with the new values of the parameters in changed (by index;
    rank source's values with several ranks)."""
    engine = run.engine
    beside = run.settings.param_nvme_path or run.settings.optimizer_nvme_path
    if beside is None:
        scratch = Path(tempfile.mkdtemp(prefix=f"infinity-resize-{os.getpid()}-rank{run.rank}-"))
    else:
        scratch = Path(beside) / f"infinity-resize-{os.getpid()}-rank{run.rank}"
        scratch.mkdir(mode=0o700, parents=True, exist_ok=False)
    try:
        _save_state(run, changed, source, scratch)
        steps = run.optimizer_steps()
        model, settings, names = run.module, run.settings, list(run.names)
        params = list(run.params)
        run.close()
        _replant(params, settings, run.ranks, scratch)
        new = engine.rebuild_run()
        new.load_optimizer_steps(steps, "the engine's own step counts")
        _restore_optimizer(new, names, changed, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _save_state(run: Any, changed: dict[int, torch.Tensor], source: int, scratch: Path) -> None:
    dtype = dtype_of(run.settings.precision)
    for i, p in enumerate(run.params):
        if i in changed:
            values = changed[i].detach().to(dtype).contiguous()
            if run.ranks.several:
                run.ranks.broadcast(values, f"resized parameter {run.names[i]!r}", source)
        elif i in run.offloaded:
            values = run.read_values(i, dtype=dtype)
        else:
            values = p.detach().to("cpu", copy=True)
        torch.save(values.cpu(), scratch / f"param-{i}.pt")
    for state in run.optimizer.states:  # master and the update rule's states
        run.optimizer.read_state(state, lambda s, v, state=state: None if s.index in changed else
                                 torch.save(v.clone(), scratch / f"{state}-{s.index}.pt"))


def _replant(params: list[torch.nn.Parameter], settings: Any, ranks: Any, scratch: Path) -> None:
    """The parameters' values back into the model: into a fresh zero.Init store on NVMe, or whole."""
    store = InitRun(settings, ranks) if settings.param_tier is Tier.NVME else None
    for i, p in enumerate(params):
        p.__dict__.pop(ATTR, None)
        p.data = torch.load(scratch / f"param-{i}.pt", weights_only=True).to(p.device)
        if store is not None:
            store.place(p)
    if store is not None and store.count == 0:
        store.close()


def _restore_optimizer(run: Any, names: list[str], changed: dict[int, torch.Tensor], scratch: Path) -> None:
    old = {n: i for i, n in enumerate(names)}
    new_index = {n: i for i, n in enumerate(run.names)}
    kept = {new_index[n]: i for n, i in old.items() if n in new_index and i not in changed}

    def values_of(state: str):
        def load(s: Any) -> torch.Tensor | None:
            i = kept.get(s.index)
            return None if i is None else torch.load(scratch / f"{state}-{i}.pt", weights_only=True)
        return load

    for state in run.optimizer.states:
        run.optimizer.write_state(state, values_of(state))
