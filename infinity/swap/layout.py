"""Optimizer sub-groups: whole parameters laid end to end in flat fp32 vectors.

[Note: why every slice starts on a 4096-byte boundary]
A parameter's slice of a sub-group starts at a multiple of PAD elements (4096
bytes of fp32), so a parameter's gradient or updated weights can be written to
or read from its own part of a swap file with O_DIRECT, and the slice of the
flat vector in a HostBuffer is aligned too.  The padding elements are zeros
in weights, gradients and both moments; AdamW leaves zeros at zero.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def numel(self) -> int:
        """Elements in the flat vector, padding included."""
        last = self.slices[-1]
        return last.offset + padded(last.numel)

    @property
    def nbytes(self) -> int:
        return self.numel * FP32


def plan_groups(sizes: list[tuple[str, int]], sub_group_size: int) -> tuple[Group, ...]:
    """Groups of whole parameters, each of at most sub_group_size elements unless one parameter is larger."""
    groups: list[Group] = []
    current: list[Slice] = []
    used = 0
    for index, (name, numel) in enumerate(sizes):
        if current and used + numel > sub_group_size:
            groups.append(Group(len(groups), tuple(current)))
            current, used = [], 0
        current.append(Slice(name, index, len(groups), padded_offset(current), numel))
        used += numel
    if current:
        groups.append(Group(len(groups), tuple(current)))
    return tuple(groups)


def padded_offset(slices: list[Slice]) -> int:
    return slices[-1].offset + padded(slices[-1].numel) if slices else 0
