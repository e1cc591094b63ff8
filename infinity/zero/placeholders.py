"""What a partitioned parameter shows the code around it while its values are elsewhere (NVMe, host memory,
other ranks): an empty placeholder tensor that still reports its whole size, and a state_dict that refuses
to hand out placeholders as if they were weights.

[Note: the whole size]  A partitioned parameter's `.data` is an empty tensor between uses.  Code that counts
parameters reads `p.numel()` (Transformers' `model.num_parameters()`) or DeepSpeed's `p.ds_numel` (Transformers'
Trainer under ZeRO-3); both give the whole count here: `ds_numel` and `ds_shape` are set as DeepSpeed sets
them, and the parameter's own `numel` is answered from ds_numel (an attribute of the Parameter object, so
`p.data.numel()` and torch's C++ code still see the placeholder's 0).

[Note: no silent empty weights]  `module.state_dict()` of a model with partitioned parameters would return
shape-[0] tensors, which `save_pretrained` and `torch.save` write without complaint and nothing can load.
A state-dict pre-hook on each module that holds one raises a UsageError naming the way out instead.
`state_dict(keep_vars=True)` (the Parameter objects themselves, as checkpoint code asks for) is let through.
"""
from __future__ import annotations

import torch
from torch import nn

from infinity.errors import UsageError

HOOKED = "_infinity_state_dict_guard"


class WholeNumel:
    """A partitioned parameter's `numel`: the whole parameter's element count (a class, so it pickles)."""

    def __init__(self, count: int):
        self.count = count

    def __call__(self) -> int:
        return self.count


def mark_partitioned(p: nn.Parameter, shape: torch.Size) -> None:
    """p's values live elsewhere; it reports shape's size (see [Note: the whole size])."""
    p.ds_shape = torch.Size(shape)  # type: ignore[attr-defined]
    p.ds_numel = int(torch.Size(shape).numel())  # type: ignore[attr-defined]
    p.numel = WholeNumel(p.ds_numel)  # type: ignore[method-assign]


def is_placeholder(p: torch.Tensor | None) -> bool:
    """True for a partitioned parameter whose values are not here now."""
    return p is not None and getattr(p, "ds_numel", 0) > 0 and p.data.numel() == 0


def guard_state_dict(model: nn.Module) -> None:
    """Hooks every module of model that holds a partitioned parameter (see [Note: no silent empty weights])."""
    for module in model.modules():
        if getattr(module, HOOKED, False):
            continue
        if any(getattr(p, "ds_numel", None) is not None for p in module._parameters.values() if p is not None):
            module.register_state_dict_pre_hook(_refuse_placeholders)
            setattr(module, HOOKED, True)


def _refuse_placeholders(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    if keep_vars:
        return
    empty = [prefix + name for name, p in module._parameters.items() if is_placeholder(p)]
    if empty:
        raise UsageError(f"state_dict(): parameter {empty[0]!r} is partitioned by infinity (its values are on the "
                         f"offload tier; here it is an empty placeholder), so a state dict would hold empty tensors. "
                         f"Write the model with engine.save_pretrained(dir) (a folder from_pretrained loads) or "
                         f"engine.save_16bit_model(dir); read values with engine.parameter_values()")
