"""Parameters zero.Init already sent to NVMe, opened again when torch code touches them inside the context
([Note: initialisation after a parameter left] in zero/init.py).

A TorchFunctionMode sees every torch function (and tensor method and property) called with one of the
context's placed parameters; before the function runs, the parameter is read back whole into its .data.
It is written back, and emptied again, once nothing else views its values (see `flush`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class Reopenable(Protocol):
    """What OpenOnUse needs of zero.Init's run (InitRun)."""

    dtype: torch.dtype

    def read_whole(self, p: torch.Tensor) -> torch.Tensor: ...

    def rewrite(self, p: torch.Tensor, values: torch.Tensor, source: int = 0) -> None: ...

    def owns(self, p: torch.Tensor) -> bool: ...


def storage_users(t: torch.Tensor) -> int:
    """How many tensors (and storage objects) hold t's storage."""
    return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))


def parameters_in(args: Iterable[Any], kwargs: dict[str, Any] | None) -> Iterable[nn.Parameter]:
    """The Parameters among a torch function's arguments (one level into lists and tuples)."""
    for a in (*args, *(kwargs or {}).values()):
        if isinstance(a, nn.Parameter):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (x for x in a if isinstance(x, nn.Parameter))


class OpenOnUse(TorchFunctionMode):
    def __init__(self, run: Reopenable):
        super().__init__()
        self.run = run
        self.open: dict[int, tuple[nn.Parameter, torch.Tensor, int]] = {}  # id -> (param, values, users then)
        self.peak_bytes = 0  # the most bytes open at once (the parameters one torch function touches, and views)

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        touched = [p for p in parameters_in(args, kwargs) if id(p) in self.open or self.run.owns(p)]
        if touched:
            self.flush(keep=frozenset(id(p) for p in touched))
            for p in touched:
                self._open(p)
        return func(*args, **(kwargs or {}))

    def _open(self, p: nn.Parameter) -> None:
        if id(p) in self.open:
            return
        values = self.run.read_whole(p)
        p.data = values
        self.open[id(p)] = (p, values, storage_users(values))
        self.peak_bytes = max(self.peak_bytes, sum(v.numel() * v.element_size() for _, v, _ in self.open.values()))

    def flush(self, keep: frozenset[int] = frozenset(), force: bool = False) -> None:
        """Writes back and empties every open parameter not in keep that nothing else views (force: every
        one).  A parameter whose values some other tensor still views stays open: that view may yet
        write (`d = w.data; d.normal_()`)."""
        with torch._C.DisableTorchFunction():  # called from inside the context too: no torch function of ours
            self._flush(keep, force)

    def _flush(self, keep: frozenset[int], force: bool) -> None:
        for k, (p, values, users) in list(self.open.items()):
            if k in keep:
                continue
            if not force and p.data.untyped_storage().data_ptr() == values.untyped_storage().data_ptr() \
                    and storage_users(values) > users:
                continue
            del self.open[k]
            self.run.rewrite(p, p.data)
            p.data = torch.empty(0, dtype=self.run.dtype, device=p.device)

    def close(self) -> None:
        """The context ends: every open parameter is written back."""
        self.flush(force=True)
