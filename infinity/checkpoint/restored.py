"""Which parts of a checkpoint a load puts back: DeepSpeed's load_checkpoint keywords as one value.

[Note: DeepSpeed 0.19's partial loads, and where infinity differs]  Read from DeepSpeed 0.19.8's
runtime/engine.py (load_checkpoint, _load_checkpoint) under ZeRO stage 3:

- load_module_only=True: the module's weights only.  global_steps, global_samples, skipped_steps, the LR
  scheduler and the optimizer keep the engine's values, whatever the other two keywords say.
- load_optimizer_states=False: the weights come from the fp32 master weights of the ZeRO files
  (zero_to_fp32, cast to the module's 16-bit dtype); the counters are restored, the LR scheduler as
  load_lr_scheduler_states says; the ZeRO optimizer file is not read, so the moments, the optimizer's step
  count, its parameter groups' hyperparameters and the fp16 loss scaler stay as the engine has them.
- load_lr_scheduler_states=False: everything but the LR scheduler's state.

Two DeepSpeed behaviours are odd, and infinity does the exact thing instead: (1) without the optimizer
states DeepSpeed sets the fp32 masters from the 16-bit weights (`_restore_from_bit16_weights`), so a bf16
or fp16 run loses the masters' low bits; infinity loads the saved fp32 masters and the parameters from them,
as saved.  (2) DeepSpeed leaves the moments and step count the engine had, which equal a fresh optimizer's
only in a new engine; infinity zeroes them and sets each sub-group's step to 0, so the next steps are those
of a new torch optimizer started from the loaded weights, in any engine.  Random generators, which
DeepSpeed does not save, are restored with the counters (not with load_module_only)."""
from __future__ import annotations

import enum


class Restored(enum.Flag):
    """WEIGHTS: parameters (and their fp32 masters), buffers.  PROGRESS: global_steps, micro_steps,
    skipped_steps, global_samples, random generators.  OPTIMIZER: the optimizer's own states (moments) and
    step counts, its parameter groups' hyperparameters, the fp16 loss scaler.  SCHEDULE: the lr schedule's
    position (the config's scheduler), the client LR scheduler's state, and the groups' lr."""

    WEIGHTS = enum.auto()
    PROGRESS = enum.auto()
    OPTIMIZER = enum.auto()
    SCHEDULE = enum.auto()

    @classmethod
    def of(cls, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
           load_module_only: bool = False) -> "Restored":
        """What DeepSpeed's load_checkpoint keywords restore (the module's note)."""
        if load_module_only:
            return cls.WEIGHTS
        parts = cls.WEIGHTS | cls.PROGRESS
        if load_optimizer_states:
            parts |= cls.OPTIMIZER
        if load_lr_scheduler_states:
            parts |= cls.SCHEDULE
        return parts


WHOLE = Restored.WEIGHTS | Restored.PROGRESS | Restored.OPTIMIZER | Restored.SCHEDULE
