"""Dynamic loss scaling for fp16, step for step as DeepSpeed 0.19.8's DynamicLossScaler
(deepspeed/runtime/fp16/loss_scaler.py, update_scale).

[Note: DeepSpeed's rules, which this follows]
- An overflow with hysteresis left (cur_hysteresis > 1) only spends one hysteresis; once it is spent (1),
  every further overflow halves the scale (not floored below min_loss_scale).  Hysteresis is refilled
  only when the scale grows, or, with consecutive_hysteresis, on every step without an overflow.
- The scale doubles at a good step that follows a run of good steps whose length is a positive multiple
  of loss_scale_window: after window + 1 good steps from the start or from an overflow, then every window.
- An overflow at min_loss_scale, hysteresis spent, stops the run (DeepSpeed raises "Current loss scale
  already at minimum"): here a LossScaleAtMinimum.
- At the step where the scale grows, DeepSpeed's ZeRO-3 optimizer unscales that step's gradients by the
  new, doubled scale (it updates the scaler before it unscales), so the step's gradients are half their
  value.  A defect, followed by default (Unscale.UPDATED_SCALE); fp16.unscale_with "step_scale" divides by
  the scale the loss was multiplied with (engine.py asks `unscale_by`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from infinity.config.training import Unscale
from infinity.errors import LossScaleAtMinimum

log = logging.getLogger("infinity.zero")


@dataclass(frozen=True)
class LossScaleSettings:
    static_scale: float = 0.0  # > 0: a fixed scale; 0: dynamic
    initial_scale_power: int = 16
    window: int = 1000  # loss_scale_window
    hysteresis: int = 2  # DeepSpeed's delayed_shift
    consecutive_hysteresis: bool = False  # refill hysteresis on every step without an overflow
    min_scale: float = 1.0
    unscale: Unscale = Unscale.UPDATED_SCALE


class LossScaler:
    def __init__(self, settings: LossScaleSettings):
        self.settings = settings
        self.scale = settings.static_scale or float(2 ** settings.initial_scale_power)
        self._good_steps = 0  # steps without an overflow since the last overflow (or the start)
        self._hysteresis = settings.hysteresis
        self.skipped_steps = 0

    @property
    def dynamic(self) -> bool:
        return self.settings.static_scale <= 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint's state.json holds of the scaler (these keys, in this order: the format's)."""
        return {"scale": self.scale, "good_steps": self._good_steps, "hysteresis": self._hysteresis,
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self._good_steps = float(state["scale"]), int(state["good_steps"])
        self._hysteresis, self.skipped_steps = int(state["hysteresis"]), int(state["skipped_steps"])

    def unscale_by(self, step_scale: float) -> float:
        """What this step's gradients are divided by, once update() has run (see the module's note)."""
        return self.scale if self.settings.unscale is Unscale.UPDATED_SCALE else step_scale

    def update(self, overflow: bool) -> None:
        """After a step's overflow verdict, as DeepSpeed's DynamicLossScaler.update_scale."""
        self.skipped_steps += overflow
        if not self.dynamic:
            return
        s = self.settings
        if overflow:
            self._good_steps = 0
            if s.hysteresis == 1 or self._hysteresis == 1:
                if self.scale == s.min_scale:
                    raise LossScaleAtMinimum(self.scale)
                self.scale = max(self.scale / 2, s.min_scale)
            else:
                self._hysteresis -= 1
            log.info("fp16 overflow: step skipped, loss scale now %g (hysteresis %d)", self.scale, self._hysteresis)
            return
        if s.consecutive_hysteresis:
            self._hysteresis = s.hysteresis
        if self._good_steps > 0 and self._good_steps % s.window == 0:
            if not s.consecutive_hysteresis:
                self._hysteresis = s.hysteresis
            self.scale *= 2
        self._good_steps += 1
