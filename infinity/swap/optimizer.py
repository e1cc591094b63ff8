"""The optimizer over flat fp32 sub-groups, with the states on NVMe (pipelined) or in host memory.

The update itself is an update rule's (rules.py: torch's fused CPU Adam/AdamW, DeepSpeed's Lion, or a
torch optimizer class) on one flat vector per sub-group: fp32 master weights, gradient, and the rule's
states (Adam: exp_avg and exp_avg_sq).  Each sub-group holds parameters of one parameter group (layout.py),
whose hyperparameters (torch's param_groups dicts: "lr", "weight_decay", ...) are read at every step.

[Note: the NVMe pipeline]
Sub-group i needs one buffer per swapped vector (Adam: master, grad, exp_avg, exp_avg_sq: four).  With pipeline_read the reads of
i+1 start before i is updated; with pipeline_write the writes of i are left in flight while i+1
updates.  Before reads start, writes of earlier sub-groups are completed until four buffers are free,
so the pipeline is as deep as the pool allows (with Adam 4 buffers: none, 8: reads overlap, 12: reads and
writes overlap) and never waits on a buffer nobody will release.  At most three sub-groups are ever in flight
(i-1 writing, i updating, i+1 reading), and never more than there are: `pool_buffers` sizes the pool as
offload_optimizer.buffer_count × min(1 + pipeline_read + pipeline_write, sub-groups).  Buffers beyond
that would only ever stage gradients during backward (put_grad), which needs one.

[Note: the first sub-group's gradient stays in host memory]
Sub-group 0 is updated first, and its gradients (the model's first parameters) are the last backward makes:
sending them to NVMe only to read them back at once moves 8 bytes per element for nothing.  So one pool
buffer holds sub-group 0's gradient from the end of a step to the end of sub-group 0's next update, and
put_grad copies into it; the step reads the sub-group's other vectors only, and gives the buffer back to
the pool before sub-group 1's reads, so the pipeline keeps its depth (sub-group 0 takes as many buffers
as before, one of them this one).  With one sub-group (sub_group_size at least the model, DeepSpeed's
default) no gradient goes to NVMe at all.  The buffer stands in for the swap file exactly: unwritten
slices are zeroed by prepare_grad, and every slice's padding is zeroed when the buffer is taken and
after each put_grad, as write_part pads the file with zeros.  Its gradient file stays, unused.

[Note: the step's I/O beside backward and the next forward]
The update needs every rank's gradient norm (clipping, fp16's overflow verdict), known only when backward
ends; its reads and writes do not.  So `read_ahead`, called as the step's backward starts, starts reading
sub-group 0's master and states (its gradient is the host buffer above), and `step` finds them there; and
`step` returns with the last sub-groups' state writes still in flight, to complete under the next forward.
The arithmetic is the same as before, in every setting: only where the waits fall moves.  What is left in
flight is completed when its buffers are needed (the next reads, a gradient's staging, the resident
gradient buffer) and by `settle`, which every other use of the swap files calls first (checkpoints,
GatheredParameters, resizing, close), so none of them sees a partition in flight.  A skipped step (fp16
overflow) gives the reads up.  The parameters' own writes still complete before `step` returns (the next
forward reads them first).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, MutableMapping, Sequence

import torch

from infinity.errors import CapacityError
from infinity.memory.manager import MemoryManager
from infinity.memory.pool import BufferPool
from infinity.memory.stream import HostPart, SwapPart
from infinity.swap.layout import FP32, Group, Slice, padded
from infinity.swap.rules import AdamRule, UpdateRule
from infinity.timeline import NO_TIMELINE, Track

log = logging.getLogger("infinity.swap")

MASTER, GRAD = "master", "grad"
ParamGroups = Sequence[MutableMapping[str, Any]]  # torch-style parameter groups: hyperparameters by name

# Called with a slice and its updated fp32 master values (padded to 4096 bytes); returns the keys of
# write_part transfers that read from those values, to be flushed before the buffer is reused.
ParamWriter = Callable[[Slice, torch.Tensor], set[str]]
# Completes the parameter writes of those keys, wherever they live (the parameters' swap files may be
# under another nvme_path, in another memory manager, than the optimizer's).
ParamFlush = Callable[[set[str]], None]


@dataclass(frozen=True)
class AdamSettings:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    decoupled: bool = True  # AdamW's decoupled weight decay; False: Adam with L2 added to the gradient

    def group(self) -> dict[str, Any]:
        """These values as one parameter group's hyperparameters."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def rule(self) -> AdamRule:
        return AdamRule(self.decoupled)


@dataclass(frozen=True)
class Pipeline:
    read: bool = True
    write: bool = True


def pool_buffers(buffer_count: int, pipeline: Pipeline, groups: int) -> int:
    """Buffers of the optimizer pool: buffer_count per sub-group in flight, with as many sub-groups in
    flight as the pipeline keeps (1 + read + write) but never more than there are (see the note above)."""
    return buffer_count * min(1 + int(pipeline.read) + int(pipeline.write), max(groups, 1))


def swapped(rule: UpdateRule) -> tuple[str, ...]:
    """The vectors a sub-group swaps: the master weights and the rule's states, then the gradient."""
    return (MASTER,) + rule.states + (GRAD,)


def buffers_per_group(rule: UpdateRule) -> int:
    """Buffers one sub-group in flight takes (Adam: ADAM_SWAPPED_STATES, config/zero.py's number)."""
    return len(swapped(rule))


def update_group(rule: UpdateRule, g: Group, v: dict[str, torch.Tensor], step: torch.Tensor,
                 group: MutableMapping[str, Any]) -> None:
    """The rule's step over sub-group g's vectors v, and its padding put back to zero (rules need not keep it:
    Lion moves a zero by lr)."""
    rule.update(v[MASTER], v[GRAD], {name: v[name] for name in rule.states}, step, group)
    for s in g.slices:
        v[MASTER][s.end:s.offset + padded(s.numel)].zero_()


def prepare_grad(g: Group, grad: torch.Tensor, written: set[int], coef: float) -> None:
    """Zeroes the slices that got no gradient this step (they hold an old one), scales the rest; clears written."""
    for s in g.slices:
        if s.index not in written:
            grad[s.offset:s.end].zero_()
    written.clear()
    if coef != 1.0:
        grad.mul_(coef)


def key(group: int, kind: str) -> str:
    return f"optimizer/{group}/{kind}"


class NvmeOptimizer:
    """Sub-group states in swap files; steps stream them through the optimizer's buffer pool.
    param_groups[g.param_group] holds sub-group g's hyperparameters."""

    def __init__(self, manager: MemoryManager, groups: tuple[Group, ...], pool: BufferPool,
                 rule: UpdateRule, param_groups: ParamGroups, pipeline: Pipeline):
        self.manager, self.groups, self.pool = manager, groups, pool
        self.rule, self.param_groups, self.pipeline = rule, param_groups, pipeline
        self.kinds = swapped(rule)
        self.states = (MASTER,) + rule.states  # what checkpoints hold per parameter
        self.io_wait_s = 0.0  # seconds steps have waited on their reads and writes, all steps together
        self.timeline = NO_TIMELINE
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in groups]
        self._written: list[set[int]] = [set() for _ in groups]  # slices that got a gradient this step
        self.per_group = buffers_per_group(rule)
        if pool.buffer_count < self.per_group:  # config/rules.py checks buffer_count against Adam's four
            raise CapacityError("optimizer buffer pool", self.per_group, pool.buffer_count,
                                f"set zero_optimization.offload_optimizer.buffer_count to at least "
                                f"{self.per_group} ({rule.name} swaps {', '.join(self.kinds)}); the engine "
                                f"multiplies it by the sub-groups in flight")
        for g in groups:
            for kind in self.kinds:
                manager.add(key(g.index, kind), g.numel, torch.float32, region=kind, pool=pool)
        self._resident_slot, self._resident_grad = -1, None  # [Note: the first sub-group's gradient ...]
        # [Note: the step's I/O beside backward and the next forward]
        self._writing: deque[tuple[int, set[str]]] = deque()  # sub-groups whose state writes are in flight
        self._ahead = False  # sub-group 0's reads were started by read_ahead
        self._flush_params: ParamFlush = self.manager.flush
        self._take_resident()

    def master_range(self, s: Slice) -> tuple[str, int]:
        """The partition and byte offset where slice s's fp32 master weights lie (a whole-block range, zero-padded:
        a parameter's partition may be that range, [Note: a partition inside another] in memory/views.py)."""
        return key(s.group, MASTER), s.offset * FP32

    def set_master(self, values: Callable[[Slice], torch.Tensor]) -> None:
        """Writes the initial fp32 master weights.  Moments and gradients start as the zeros of new files (the
        first step reads none of them back: [Note: an extent never written reads as zeros] in memory/manager.py)."""
        self.settle()
        for g in self.groups:
            flat = self.manager.stage(key(g.index, "master"), torch.zeros(g.numel))
            for s in g.slices:
                flat[s.offset:s.end].copy_(values(s).reshape(-1))
            self.manager.start_write(key(g.index, "master"))
            self.manager.finish_write(key(g.index, "master"))
            self.manager.drop(key(g.index, "master"))

    def clear_states(self) -> None:
        """The rule's states (Adam: exp_avg, exp_avg_sq) zeroed in their swap files and every step count 0: the
        optimizer as a new one is (a checkpoint loaded without its optimizer states).  Nothing is read."""
        self.settle()
        for g in self.groups:
            for state in self.rule.states:
                k = key(g.index, state)
                self.manager.stage(k, torch.zeros(1).expand(g.numel))
                self.manager.start_write(k)
                self.manager.finish_write(k)
                self.manager.drop(k)
        for step in self.steps:
            step.zero_()

    def write_master(self, s: Slice, values: torch.Tensor) -> None:
        """Replaces slice s's fp32 master weights with values (its first elements; a parameter changed
        between steps, by GatheredParameters): its sub-group's master is read, changed and written back."""
        self.write_state("master", lambda t: values if t.index == s.index else None, groups=(s.group,))

    def read_state(self, state: str, each: Callable[[Slice, torch.Tensor], None]) -> None:
        """Calls each(slice, values) with every slice's state (master, exp_avg or exp_avg_sq), one sub-group
        read at a time; values is a view of the read buffer, valid during the call."""
        self.settle()
        for g in self.groups:
            k = key(g.index, state)
            self.manager.start_read(k)
            flat = self.manager.finish_read(k)
            try:
                for sl in g.slices:
                    each(sl, flat[sl.offset:sl.end])
            finally:
                self.manager.drop(k)

    def write_state(self, state: str, values_of: Callable[[Slice], torch.Tensor | None],
                    groups: tuple[int, ...] | None = None) -> None:
        """Replaces the state of every slice whose values_of(slice) is not None (its first elements), a
        sub-group at a time: read, changed, written back."""
        self.settle()
        for g in (self.groups[i] for i in groups) if groups is not None else self.groups:
            k = key(g.index, state)
            self.manager.start_read(k)
            flat = self.manager.finish_read(k)
            for sl in g.slices:
                values = values_of(sl)
                if values is not None:
                    flat[sl.offset:sl.offset + values.numel()].copy_(values.reshape(-1))
            self.manager.stage(k)
            self.manager.start_write(k)
            self.manager.finish_write(k)
            self.manager.drop(k)

    def state_part(self, s: Slice, state: str) -> SwapPart:
        """Where slice s's state (master or one of the rule's) lives: its part of the sub-group's swap file
        (at rest: what was in flight is settled first)."""
        self.settle()
        return SwapPart(self.manager, key(s.group, state), s.offset * FP32)

    def put_grad(self, s: Slice, grad: torch.Tensor) -> None:
        """Sends a parameter's final fp32 gradient to its sub-group's swap file (asynchronously), or for
        sub-group 0 into its host buffer ([Note: the first sub-group's gradient stays in host memory])."""
        if self._resident(s.group):
            self._resident_grad[s.offset:s.end].copy_(grad.reshape(-1))
            self._resident_grad[s.end:s.offset + padded(s.numel)].zero_()
        else:
            self._room_for(1)  # a staging buffer, if the last step's state writes hold the pool
            self.manager.write_part(key(s.group, "grad"), s.offset * FP32, grad, staging=self.pool)
        self._written[s.group].add(s.index)

    def _take_resident(self) -> None:
        """Takes the pool buffer that holds sub-group 0's gradient until its next update, padding zeroed."""
        if not self.groups or self._resident_grad is not None:
            return
        g = self.groups[0]
        self._room_for(1)
        self._resident_slot, buffer = self.pool.acquire(g.numel * FP32)
        self._resident_grad = buffer.view(torch.float32, g.numel)
        for s in g.slices:
            self._resident_grad[s.end:s.offset + padded(s.numel)].zero_()

    def _give_back_resident(self) -> None:
        """Sub-group 0's update is done: its gradient buffer goes back to the pool for the other sub-groups."""
        if self._resident_grad is not None:
            self._resident_grad = None
            self.pool.release(self._resident_slot)

    def _resident(self, group: int) -> bool:
        """Sub-group group's gradient is in host memory, not in its swap file."""
        return group == 0 and self._resident_grad is not None

    def _read_kinds(self, group: int) -> tuple[str, ...]:
        """The vectors a step reads from sub-group group's swap files."""
        return tuple(k for k in self.kinds if k != GRAD) if self._resident(group) else self.kinds

    def discard_grads(self) -> None:
        """A skipped step (fp16 overflow): the gradients sent are forgotten, the reads started ahead given up."""
        self.manager.flush()
        self._give_up_ahead()
        for written in self._written:
            written.clear()

    def read_ahead(self) -> None:
        """The step's backward is starting: sub-group 0's master and states start coming in now, beside it
        ([Note: the step's I/O beside backward and the next forward]).  Nothing if they already are, or if
        the pool has no room for them once the last step's writes are complete: with other sub-groups, one
        buffer stays free to stage their gradients, which backward sends while these reads hold theirs."""
        if self._ahead or not self.groups or not self._resident(0):
            return
        needed = len(self._read_kinds(0)) + (1 if len(self.groups) > 1 else 0)
        self._room_for(needed)
        if self._free() >= needed:
            self._ahead = self._start_reads(0)

    def settle(self) -> None:
        """Completes the state writes left in flight and gives up reads started ahead: every swap file of the
        optimizer at rest, for a use other than the step."""
        while self._writing:
            self._finish_writes(self._writing.popleft())
        self._give_up_ahead()

    def _give_up_ahead(self) -> None:
        if self._ahead:
            self._ahead = False
            for kind in self._read_kinds(0):
                self.manager.cancel(key(0, kind))

    def step(self, grad_coef: float, write_params: ParamWriter, flush_params: ParamFlush | None = None) -> None:
        """One step of every sub-group; grad_coef unscales and clips the gradients.  The last sub-groups' state
        writes are left in flight ([Note: the step's I/O beside backward and the next forward])."""
        self._flush_params = flush_params or self.manager.flush
        with self._waiting("wait gradients"):
            self.manager.flush()  # every gradient is on NVMe before any is read back
        if not self._ahead:
            self._start_reads(0)
        self._ahead = False
        for g in self.groups:
            with self._waiting(f"wait read {g.index}"):
                views = self._finish_reads(g)
            following = g.index + 1
            ahead = self.pipeline.read and self._start_reads(following)
            with self.timeline.span(f"update {g.index}", Track.OPTIMIZER, elements=g.numel):
                self._update(g, views, grad_coef)
            param_keys = write_params_of(g, views["master"], write_params)
            self._start_writes(g)
            self._writing.append((g.index, param_keys))
            if not self.pipeline.write:
                self._finish_writes(self._writing.popleft())
            if not ahead:
                self._start_reads(following)
        self._take_resident()

    def _free(self) -> int:
        return self.pool.buffer_count - self.pool.in_use

    def _room_for(self, buffers: int) -> None:
        """Completes the oldest state writes in flight until the pool has buffers free (or none are left)."""
        while self._free() < buffers and self._writing:
            self._finish_writes(self._writing.popleft())

    # ---- one sub-group -----------------------------------------------------
    def _start_reads(self, index: int) -> bool:
        """Starts reading sub-group index, completing earlier writes for room; False if it could not."""
        if index >= len(self.groups):
            return False
        kinds = self._read_kinds(index)
        while any(i == index for i, _ in self._writing):  # its own writes, left in flight by the last step
            self._finish_writes(self._writing.popleft())
        self._room_for(len(kinds))
        if self._free() < len(kinds):
            return False
        for kind in kinds:
            self.manager.start_read(key(index, kind))
        return True

    def _finish_reads(self, g: Group) -> dict[str, torch.Tensor]:
        views = {kind: self.manager.finish_read(key(g.index, kind)) for kind in self._read_kinds(g.index)}
        if self._resident(g.index):
            views[GRAD] = self._resident_grad
        return views

    def _update(self, g: Group, v: dict[str, torch.Tensor], grad_coef: float) -> None:
        prepare_grad(g, v[GRAD], self._written[g.index], grad_coef)
        update_group(self.rule, g, v, self.steps[g.index], self.param_groups[g.param_group])

    def _start_writes(self, g: Group) -> None:
        for kind in self.states:
            self.manager.stage(key(g.index, kind))  # updated in place: newer than the file
            self.manager.start_write(key(g.index, kind))
        if self._resident(g.index):
            self._give_back_resident()
        else:
            self.manager.drop(key(g.index, "grad"))  # read, never changed on NVMe's behalf: no write back

    @contextmanager
    def _waiting(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.timeline.span(name, Track.WAIT):
            yield
        self.io_wait_s += time.perf_counter() - start

    def _finish_writes(self, item: tuple[int, set[str]]) -> None:
        with self._waiting(f"wait write {item[0]}"):
            self._complete_writes(item)

    def _complete_writes(self, item: tuple[int, set[str]]) -> None:
        index, param_keys = item
        self._flush_params(param_keys)  # parameter writes read from the master buffer
        for kind in self.states:
            self.manager.finish_write(key(index, kind))
            self.manager.drop(key(index, kind))


class HostOptimizer:
    """Sub-group states in host memory (offload_optimizer none or cpu)."""

    def __init__(self, groups: tuple[Group, ...], rule: UpdateRule, param_groups: ParamGroups):
        self.groups, self.rule, self.param_groups = groups, rule, param_groups
        self.states = (MASTER,) + rule.states  # what checkpoints hold per parameter
        self.io_wait_s = 0.0  # host memory: never waits
        self.timeline = NO_TIMELINE
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in groups]
        self.flat = [{kind: torch.zeros(g.numel) for kind in swapped(rule)} for g in groups]
        self._written: list[set[int]] = [set() for _ in groups]

    def set_master(self, values: Callable[[Slice], torch.Tensor]) -> None:
        for g, flat in zip(self.groups, self.flat):
            for s in g.slices:
                flat["master"][s.offset:s.end].copy_(values(s).reshape(-1))

    def clear_states(self) -> None:
        for flat in self.flat:
            for state in self.rule.states:
                flat[state].zero_()
        for step in self.steps:
            step.zero_()

    def write_master(self, s: Slice, values: torch.Tensor) -> None:
        self.flat[s.group]["master"][s.offset:s.offset + values.numel()].copy_(values.reshape(-1))

    def read_state(self, state: str, each: Callable[[Slice, torch.Tensor], None]) -> None:
        for g, flat in zip(self.groups, self.flat):
            for sl in g.slices:
                each(sl, flat[state][sl.offset:sl.end])

    def write_state(self, state: str, values_of: Callable[[Slice], torch.Tensor | None]) -> None:
        for g, flat in zip(self.groups, self.flat):
            for sl in g.slices:
                values = values_of(sl)
                if values is not None:
                    flat[state][sl.offset:sl.offset + values.numel()].copy_(values.reshape(-1))

    def state_part(self, s: Slice, state: str) -> HostPart:
        """Slice s's state (master or one of the rule's): a view of its sub-group's flat vector."""
        return HostPart(self.flat[s.group][state][s.offset:s.end])

    def put_grad(self, s: Slice, grad: torch.Tensor) -> None:
        self.flat[s.group]["grad"][s.offset:s.end].copy_(grad.reshape(-1))
        self._written[s.group].add(s.index)

    def discard_grads(self) -> None:
        for written in self._written:
            written.clear()

    def read_ahead(self) -> None:
        """Host memory: nothing to read."""

    def settle(self) -> None:
        """Host memory: nothing in flight."""

    def step(self, grad_coef: float, write_params: ParamWriter, flush_params: ParamFlush | None = None) -> None:
        for g, v in zip(self.groups, self.flat):
            prepare_grad(g, v[GRAD], self._written[g.index], grad_coef)
            update_group(self.rule, g, v, self.steps[g.index], self.param_groups[g.param_group])
            write_params_of(g, v[MASTER], write_params)


def write_params_of(g: Group, master: torch.Tensor, write_params: ParamWriter) -> set[str]:
    keys: set[str] = set()
    for s in g.slices:
        keys |= write_params(s, master[s.offset:s.offset + padded(s.numel)])
    return keys
