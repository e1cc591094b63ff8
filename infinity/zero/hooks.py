"""The engine's gradient hook: what happens as autograd makes each trained parameter's gradient.

The coordinator registers one post-accumulate-grad hook per parameter (coordinator.install) and calls
GradientHook for each; this module decides what the gradient is for.

[Note: loss.backward() without engine.backward]  engine.backward scales the loss (fp16), divides it by
gradient_accumulation_steps and moves the engine to TrainingState.BACKWARD.  A bare loss.backward()
does none of that, so its gradients would reach the optimizer unscaled and undivided.  DeepSpeed
(from v0.18.3) accepts it and asks the caller to scale the loss with engine.scale(loss) first; infinity
refuses it: the first gradient raises a UsageError saying to call engine.backward(loss), and the
engine is latched failed, since that parameter's gradient was already accumulated.
"""
from __future__ import annotations

from typing import Callable

import torch

from infinity.errors import UsageError
from infinity.zero.gradients import Gradients
from infinity.zero.state import Phase, TrainingState

BARE_BACKWARD = ("loss.backward() was called directly (or another backward reached the model's parameters "
                 "outside engine.backward); call engine.backward(loss): it scales the loss for fp16, divides it "
                 "by gradient_accumulation_steps and takes the gradients at the window's end")


class GradientHook:
    """Called with (i, p) once parameter i's gradient is in p.grad."""

    def __init__(self, phase: Phase, gradients: Gradients, at_boundary: Callable[[], bool],
                 fail: Callable[[BaseException], None]):
        self.phase, self.gradients, self.at_boundary, self.fail = phase, gradients, at_boundary, fail

    def __call__(self, i: int, p: torch.Tensor) -> None:
        if self.phase.state is not TrainingState.BACKWARD:
            err = UsageError(BARE_BACKWARD)
            self.fail(err)
            raise err
        if self.at_boundary() and p.grad is not None:  # accumulating: torch keeps adding into p.grad
            self.gradients.take(i, p)
