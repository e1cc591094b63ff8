"""`infinity.zero.GatheredParameters`: the whole values of partitioned parameters inside a block, as
DeepSpeed's context manager of the same name and signature gives them.

    with infinity.zero.GatheredParameters(model.lm_head.weight, modifier_rank=0):
        model.lm_head.weight[:10].zero_()          # whole values here, on every rank
    # rank 0's values are now in every rank's partition (and the engine's fp32 master weights)

[Note: what a block gathers]  A parameter built under zero.Init and not yet given to initialize is read back
from its zero.Init partition; one an engine trains is read from its home (NVMe, host memory, or every rank's
piece all-gathered), between the engine's steps.  Parameters neither partitioned nor trained by an engine
(plain tensors, a persistent parameter that is whole anyway) are left as they are.  With modifier_rank=None
the block is read-only: changes are dropped on exit.  With modifier_rank=r, rank r's values are broadcast
on exit and written to every rank's partition (and for an engine's parameter, to the optimizer's fp32 master
weights too, so the next step starts from them).  A parameter whose shape changed in the block
(resize_token_embeddings) is given a new partition of the new shape (zero.Init's), or makes its engine
rebuild its optimizer state around the new shape (zero/resize.py).  Every rank must enter the block with the
same parameters (the reads and writes of several ranks are collectives).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from infinity.errors import UsageError
from infinity.swap.layout import padded
from infinity.swap.params import AfterWrite
from infinity.zero.gather import piece_of
from infinity.zero.init import placed
from infinity.zero.settings import dtype_of

OWNER = "_infinity_owner"


@dataclass(frozen=True)
class Owned:
    """The engine's run that trains a parameter, and its index there (set on the parameter by `claim`)."""

    run: Any  # zero/build.py's Run (not imported: build imports this module)
    index: int


def claim(run: Any) -> None:
    """Marks each parameter run trains with its Owned record (Run.__init__ calls it)."""
    for i, p in enumerate(run.params):
        setattr(p, OWNER, Owned(run, i))


def owner(p: torch.Tensor) -> Owned | None:
    return getattr(p, OWNER, None)


class GatheredParameters:
    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor], modifier_rank: int | None = None,
                 fwd_module: nn.Module | None = None, enabled: bool = True):
        """params: a parameter or several; modifier_rank: the rank whose changes are kept (None: read-only);
        fwd_module: accepted for DeepSpeed's signature (external parameters are detected, zero/external.py)."""
        self.params = [params] if isinstance(params, torch.Tensor) else [p for p in params if p is not None]
        self.modifier_rank, self.enabled = modifier_rank, enabled
        self._gathered: list[tuple[nn.Parameter, torch.Tensor]] = []  # (parameter, its values on entry)
        self._runs: dict[int, Any] = {}

    def __enter__(self) -> "GatheredParameters":
        if not self.enabled:
            return self
        seen: set[int] = set()
        for p in self.params:
            if id(p) in seen or not isinstance(p, nn.Parameter):
                continue
            seen.add(id(p))
            values = self._read(p)
            if values is not None:
                p.data = values
                self._gathered.append((p, values.clone() if self.modifier_rank is not None else values))
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if not self.enabled:
            return
        try:
            if kind is None and self.modifier_rank is not None:
                self._write_back()
        finally:
            for p, _ in self._gathered:
                if p.numel() and _is_partitioned(p):
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            for run in self._runs.values():
                if getattr(getattr(run, "engine", None), "run", run) is run:  # not rebuilt (zero/resize.py)
                    run.coordinator.read_ahead_of_next_step()
            self._gathered.clear()
            self._runs.clear()

    # ---- reading --------------------------------------------------------------------
    def _read(self, p: nn.Parameter) -> torch.Tensor | None:
        record = placed(p)
        if record is not None and record.run.manager is not None:
            return record.run.read_whole(p) if p.data.numel() == 0 else None
        mine = owner(p)
        if mine is None:
            return None
        run = self._settle(mine.run)
        if mine.index not in run.offloaded:
            if self.modifier_rank is not None:  # whole already: only its master is written, if it changes
                self._gathered.append((p, p.detach().clone()))
            return None
        dtype = dtype_of(run.settings.precision)
        return run.read_values(mine.index, dtype=dtype).to(run.device)

    def _settle(self, run: Any) -> Any:
        """The run's reads ahead are given up while the block reads (Engine.settled's rule)."""
        if id(run) not in self._runs:
            if run.coordinator.gathered():
                raise UsageError("GatheredParameters was entered between an engine's forward and its backward; "
                                 "enter it before the forward or after backward()/step() (inside the forward, "
                                 "parameters read outside their module are fetched on their own, or name them "
                                 "with infinity.zero.register_external_parameter)")
            run.coordinator.settle()
            self._runs[id(run)] = run
        return run

    # ---- writing back -----------------------------------------------------------------
    def _write_back(self) -> None:
        """[Note: only what changed]  Parameters the modifier rank left unchanged are not written: with bf16
        or fp16 their fp32 master weights would be rounded to the compute dtype.  Rank source decides,
        and every rank follows its flags (the writes of several ranks are collectives)."""
        source = int(self.modifier_rank)  # type: ignore[arg-type]
        changed = torch.tensor([p.shape != before.shape or not torch.equal(p.data.cpu(), before.cpu())
                                for p, before in self._gathered], dtype=torch.uint8)
        ranks = _ranks_of(self._gathered)
        if ranks is not None and ranks.several:
            ranks.broadcast(changed, "GatheredParameters' changed parameters", source)
        resized: dict[int, dict[int, torch.Tensor]] = {}
        for (p, before), flag in zip(self._gathered, changed.tolist()):
            record, mine = placed(p), owner(p)
            if not flag:
                continue
            if record is not None and record.run.manager is not None:
                record.run.rewrite(p, p.data, source)
            elif mine is not None and p.shape != before.shape:
                resized.setdefault(id(mine.run), {})[mine.index] = p.data
            elif mine is not None:
                _write_owned(mine.run, mine.index, p, source)
        for run_id, values in resized.items():
            from infinity.zero.resize import resize  # the rare path: its own module
            resize(self._runs[run_id], values, source)


def _ranks_of(gathered: list[tuple[nn.Parameter, torch.Tensor]]) -> Any:
    """The ranks the block's parameters are partitioned over (zero.Init's or an engine's)."""
    for p, _ in gathered:
        record, mine = placed(p), owner(p)
        if mine is not None:
            return mine.run.ranks
        if record is not None:
            return record.run.ranks
    return None


def _is_partitioned(p: nn.Parameter) -> bool:
    record, mine = placed(p), owner(p)
    if mine is not None:
        return mine.index in mine.run.offloaded
    return record is not None


def _write_owned(run: Any, i: int, p: nn.Parameter, source: int) -> None:
    """Rank source's values of run's parameter i, into every rank's home and fp32 master weights."""
    values = p.data.detach()
    if run.ranks.several:
        values = values.contiguous()
        run.ranks.broadcast(values, f"GatheredParameters' parameter {run.names[i]!r}", source)
        if i not in run.offloaded:
            p.data.copy_(values)
    flat = values.to("cpu", torch.float32).reshape(-1)
    piece = piece_of(flat, run.shards[i]) if run.world > 1 else flat
    if i in run.offloaded:
        full = piece.new_zeros(padded(piece.numel()))
        full[: piece.numel()].copy_(piece)
        run.homes[i].write(i, full, AfterWrite.DROP)
        for m in run.managers:
            m.flush()
    if i in run.slices:  # a frozen parameter has no fp32 master
        run.optimizer.write_master(run.slices[i], piece)

