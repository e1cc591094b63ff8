"""Optimizer sub-groups: whole parameters laid end to end in flat fp32 vectors.

[Note: why every slice starts on a 4096-byte boundary]
A parameter's slice of a sub-group starts at a multiple of PAD elements (4096
bytes of fp32), so a parameter's gradient or updated weights can be written to
or read from its own part of a swap file with O_DIRECT, and the slice of the
flat vector in a HostBuffer is aligned too.  The padding elements are zeros
in weights, gradients and the optimizer's states (the swapper puts the weights' padding back to zero after
each update: optimizer.update_group).

[Note: one parameter group per sub-group]  A sub-group's update runs with one set of hyperparameters
(lr, weight decay, betas, ...: its parameter group's), so a sub-group never mixes parameter groups.
Parameters are laid out group by group (in engine order within each group), so that interleaved groups,
as "no weight decay on biases and norms" makes them, still fill whole sub-groups rather than one each.
A slice keeps its parameter's engine index, so the flat order need not be the engine's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

FP32 = 4
PAD = 4096 // FP32


def padded(numel: int) -> int:
    return (numel + PAD - 1) // PAD * PAD


@dataclass(frozen=True)
class Slice:
    name: str
    index: int  # position in the engine's parameter list
    group: int
    offset: int  # first element in the group's flat vector
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Group:
    index: int
    slices: tuple[Slice, ...]
    param_group: int = 0  # the parameter group whose hyperparameters update this sub-group

    @property
    def numel(self) -> int:
        """Elements in the flat vector, padding included."""
        last = self.slices[-1]
        return last.offset + padded(last.numel)

    @property
    def nbytes(self) -> int:
        return self.numel * FP32


def plan_groups(sizes: list[tuple[str, int]], sub_group_size: int,
                param_groups: Sequence[int | None] | None = None) -> tuple[Group, ...]:
    """Groups of whole parameters, each of at most sub_group_size elements unless one parameter is larger,
    and each of one parameter group (param_groups[i]: parameter i's, None for a frozen parameter, which is in
    no sub-group; param_groups None: all in group 0).  See the note on one parameter group per sub-group."""
    of = param_groups if param_groups is not None else [0] * len(sizes)
    groups: list[Group] = []
    current: list[Slice] = []
    used, group_of_current = 0, None
    trained = [i for i in range(len(sizes)) if of[i] is not None]
    for index in sorted(trained, key=lambda i: of[i] or 0):  # stable: engine order within a group
        name, numel = sizes[index]
        if current and (used + numel > sub_group_size or of[index] != group_of_current):
            groups.append(Group(len(groups), tuple(current), group_of_current or 0))
            current, used = [], 0
        current.append(Slice(name, index, len(groups), padded_offset(current), numel))
        used, group_of_current = used + numel, of[index]
    if current:
        groups.append(Group(len(groups), tuple(current), group_of_current or 0))
    return tuple(groups)


def padded_offset(slices: list[Slice]) -> int:
    return slices[-1].offset + padded(slices[-1].numel) if slices else 0
