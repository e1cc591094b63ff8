"""Where the engine stands in a training step: one TrainingState and the legal moves between them,
and the step counters (stateful: a checkpoint saves and restores them)."""
from __future__ import annotations

import enum
from typing import Any

from infinity.errors import EngineFailed, UsageError


class TrainingState(enum.Enum):
    """The engine's phase.  The next call a state allows is in LEGAL."""

    IDLE = "idle"  # between optimizer steps: no graph open, no gradients waiting for step()
    FORWARD = "forward"  # a forward that builds a graph ran (its modules' parameters may still be gathered)
    BACKWARD = "backward"  # inside engine.backward: the gradient hooks take gradients
    ACCUMULATING = "accumulating"  # a backward ran; gradients wait for step() (or the window's next micro-batch)
    STEPPING = "stepping"  # inside engine.step()
    FAILED = "failed"  # a step or backward stopped midway: every later call raises EngineFailed


S = TrainingState
LEGAL: dict[TrainingState, frozenset[TrainingState]] = {
    S.IDLE: frozenset({S.FORWARD, S.BACKWARD, S.FAILED}),
    S.FORWARD: frozenset({S.FORWARD, S.BACKWARD, S.STEPPING, S.FAILED}),  # STEPPING: forward after a backward
    # A backward that fails without touching the optimizer's gradients goes back to where it started.
    S.BACKWARD: frozenset({S.ACCUMULATING, S.IDLE, S.FORWARD, S.FAILED}),
    S.ACCUMULATING: frozenset({S.FORWARD, S.BACKWARD, S.STEPPING, S.FAILED}),
    S.STEPPING: frozenset({S.IDLE, S.ACCUMULATING, S.FORWARD, S.FAILED}),
    S.FAILED: frozenset(),
}


class Phase:
    """The engine's TrainingState, moved only along LEGAL; the error that failed it; and how many
    backwards ran since the last step() (a forward may follow a backward before the step)."""

    def __init__(self) -> None:
        self.state = TrainingState.IDLE
        self.failure: BaseException | None = None
        self.backwards = 0

    def to(self, new: TrainingState) -> None:
        if new not in LEGAL[self.state]:
            raise UsageError(f"the engine cannot go from {self.state.value} to {new.value}; the order of calls is "
                             "engine(batch), engine.backward(loss), engine.step()")
        self.state = new

    def fail(self, err: BaseException) -> None:
        """Latches the first error that left the run half updated."""
        self.failure = self.failure or err
        self.state = TrainingState.FAILED

    def check(self) -> None:
        if self.failure is not None:
            raise EngineFailed.of(self.failure)

    @property
    def forward_open(self) -> bool:
        return self.state is TrainingState.FORWARD


class Counters:
    """The engine's step counters, as DeepSpeed's engine keeps them: optimizer steps (skipped fp16 steps
    included), step() calls (micro-steps), skipped steps, and samples; and the lr schedule's position, the
    applied steps it has followed (global_steps - skipped_steps, unless a load_checkpoint with
    load_lr_scheduler_states=False kept the engine's own)."""

    def __init__(self) -> None:
        self.global_steps = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.global_samples = 0
        self.schedule_steps = 0

    def count_step(self, skipped: bool, samples: int) -> None:
        """One optimizer step at a window's end."""
        self.global_steps += 1
        self.skipped_steps += skipped
        self.global_samples += samples
        self.schedule_steps += not skipped

    def state_dict(self) -> dict[str, Any]:
        return {"global_steps": self.global_steps, "micro_steps": self.micro_steps,
                "skipped_steps": self.skipped_steps, "global_samples": self.global_samples,
                "schedule_steps": self.schedule_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checkpoints written before skipped_steps and global_samples were kept read as none skipped; before
        schedule_steps, as global_steps - skipped_steps."""
        self.global_steps, self.micro_steps = int(state["global_steps"]), int(state["micro_steps"])
        self.skipped_steps, self.global_samples = int(state.get("skipped_steps", 0)), int(state.get("global_samples", 0))
        self.schedule_steps = int(state.get("schedule_steps", self.global_steps - self.skipped_steps))
