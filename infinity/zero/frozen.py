"""Frozen parameters (requires_grad=False): which parameters a run holds, and the check that which of them
are frozen has not changed since initialize.

[Note: frozen parameters]  (docs/engine.md, "Frozen parameters and reference models")  A run holds every
trained parameter and every frozen floating-point one: a frozen parameter has a home on the param tier and
is gathered and released by the coordinator like a trained one, but has no sub-group slot, optimizer
state, gradient or gradient hook, and the step never writes it.  A model frozen whole gets no optimizer.
Which parameters are frozen is fixed when the run is built: the sub-groups are laid out from it, so a
change of requires_grad afterwards is refused (check_frozen) rather than followed.
"""
from __future__ import annotations

from torch import nn

from infinity.errors import UsageError
from infinity.zero.init import placed

SHOWN = 5  # parameters named in the error


def held(p: nn.Parameter) -> bool:
    """Whether a run holds p: every trained parameter, every frozen floating-point one, and whatever zero.Init
    placed.  A frozen integer parameter stays whole in the module, as a buffer does."""
    return p.requires_grad or p.is_floating_point() or placed(p) is not None


def frozen_of(params: list[nn.Parameter]) -> frozenset[int]:
    """The indices of the frozen parameters among params."""
    return frozenset(i for i, p in enumerate(params) if not p.requires_grad)


def check_frozen(names: list[str], params: list[nn.Parameter], frozen: frozenset[int]) -> None:
    """A UsageError naming the parameters whose requires_grad changed since the run was built: a frozen one
    has no optimizer state to train with, and a trained one frozen later would keep a stale gradient."""
    changed = [(names[i], p.requires_grad) for i, p in enumerate(params) if p.requires_grad == (i in frozen)]
    if changed:
        what = ", ".join(f"{name} (now requires_grad={now})" for name, now in changed[:SHOWN])
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        raise UsageError(f"requires_grad changed after infinity.initialize: {what}{more}; the engine fixes at "
                         "initialize which parameters it trains (their optimizer states and sub-groups): set "
                         "requires_grad before initialize, or close this engine and initialize a new one")
