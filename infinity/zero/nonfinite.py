"""Non-finite training: a NaN or infinite loss or gradient norm is named in the step report
(`nonfinite`, `grad_norm`), counted by a metric (infinity_nonfinite_steps_total) and logged as a warning
naming the step; under "stop_on_nonfinite" (NonFinite.STOP) the step ends with a NonFiniteError.

[Note: no extra synchronisation]  Each backward adds its loss to a running sum on the loss's own device
(a NaN or an infinity anywhere makes the sum non-finite); it is read once per optimizer step, where the
gradient norm is read anyway.  Under fp16 with dynamic loss scaling an infinite gradient norm is the
scaler's business (the step is skipped and the scale lowered), so only the loss counts there.
"""
from __future__ import annotations

import logging
import math

import torch

from infinity.errors import NonFiniteError
from infinity.zero.settings import NonFinite
from infinity.zero.step_report import StepClock, StepReport

log = logging.getLogger("infinity.zero")

LOSS, GRAD_NORM = "loss", "grad_norm"  # the names the report, the metric's label and the warning use


class FiniteWatch:
    """One engine's watch over its losses and gradient norms."""

    def __init__(self, policy: NonFinite, scaler_handles_overflow: bool):
        self.policy, self.scaler_handles_overflow = policy, scaler_handles_overflow
        self._losses: torch.Tensor | None = None
        self._count = 0

    def saw_loss(self, loss: torch.Tensor) -> None:
        """A backward's loss (no synchronisation: see the note above)."""
        value = loss.detach().float().sum()
        self._losses = value if self._losses is None else self._losses + value
        self._count += 1

    def judge(self, clock: StepClock, step: int, sumsq: float, scale: float) -> None:
        """Gives the step's report (through its clock) its mean loss, its gradient norm and what was
        non-finite; warns naming the step."""
        losses, count, self._losses, self._count = self._losses, self._count, None, 0
        loss = float(losses) / max(count, 1) if losses is not None else 0.0
        norm = math.sqrt(sumsq) / scale if math.isfinite(sumsq) and sumsq >= 0 else sumsq
        values = {LOSS: loss, GRAD_NORM: norm}
        bad = tuple(k for k, v in values.items() if not math.isfinite(v)
                    and not (k == GRAD_NORM and self.scaler_handles_overflow))
        if bad:
            log.warning("optimizer step %d: non-finite %s%s", step, described(bad, values),
                        "; the step was skipped (no weights changed)" if GRAD_NORM in bad else "")
        clock.values = {LOSS: loss, GRAD_NORM: norm, "nonfinite": bad}

    def check(self, report: StepReport, step: int) -> None:
        """Under NonFinite.STOP, a NonFiniteError for a step that had a non-finite value."""
        if report.nonfinite and self.policy is NonFinite.STOP:
            values = {LOSS: report.loss, GRAD_NORM: report.grad_norm}
            raise NonFiniteError(step, described(report.nonfinite, values))


def described(names: tuple[str, ...], values: dict[str, float]) -> str:
    """"loss nan, gradient norm inf"."""
    return ", ".join(f"{'gradient norm' if n == GRAD_NORM else n} {values[n]}" for n in names)
