"""Dynamic loss scaling for fp16, as DeepSpeed's fp16 block describes it."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("infinity.zero")


@dataclass(frozen=True)
class LossScaleSettings:
    static_scale: float = 0.0  # > 0: a fixed scale; 0: dynamic
    initial_scale_power: int = 16
    window: int = 1000  # steps without overflow before the scale doubles
    hysteresis: int = 2  # overflows tolerated before the scale halves
    min_scale: float = 1.0


class LossScaler:
    def __init__(self, settings: LossScaleSettings):
        self.settings = settings
        self.scale = settings.static_scale or float(2 ** settings.initial_scale_power)
        self._good_steps = 0
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

    def update(self, overflow: bool) -> None:
        """After a step: halves the scale on overflow (after hysteresis), doubles it after a clean window."""
        if not self.dynamic:
            self.skipped_steps += overflow
            return
        if overflow:
            self.skipped_steps += 1
            self._good_steps = 0
            self._hysteresis -= 1
            if self._hysteresis <= 0:
                self.scale = max(self.scale / 2, self.settings.min_scale)
                self._hysteresis = self.settings.hysteresis
            log.info("fp16 overflow: step skipped, loss scale now %g", self.scale)
            return
        self._good_steps += 1
        if self._good_steps % self.settings.window == 0:
            self.scale *= 2
