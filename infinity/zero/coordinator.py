"""Module hooks that bring a module's offloaded parameters to the compute tier before it runs, prefetch
what comes next, and release what is not needed again soon.

forward:  the pre-hook gathers, the post-hook releases (or keeps, when the trace says the parameter
          is used again within stage3_max_reuse_distance elements).
backward: the full backward pre-hook gathers again (autograd reads the weights to compute input
          gradients); the parameter's post-accumulate-grad hook hands the gradient to the engine and
          releases the parameter, since autograd needs it no more in this backward.
A released parameter's .data is an empty tensor; its values live in its home (host or NVMe).

[Note: the schedule]  The first step records the order of uses (infinity/schedule).  From then on,
after each module's pre-hook the planner names the partitions to start reading (up to
stage3_prefetch_bucket_size elements ahead, never more than stage3_max_live_parameters held), and
the reads run in the async-IO engine's threads while the module computes.  After the optimizer step
the first partitions of the next step are read, so the step's first modules find them too.  A step
that leaves the recorded order falls back to fetching on demand and is traced again.  The hooks only
decide; the homes (and through them the memory manager) move the bytes.
"""
from __future__ import annotations

import enum
import logging
import time
import types
from typing import Callable

import torch
from torch import nn

from infinity.errors import ConfigError, Problem
from infinity.memory.record import Residency
from infinity.memory.residency import Residence
from infinity.schedule import (Budgets, Cursor, Phase, fetches_from, make_room, preempt_for_miss,
                               preempt_for_read_ahead, releases_after)
from infinity.swap.params import ParamHome
from infinity.timeline import NO_TIMELINE, Timeline, Track
from infinity.zero.gather import ShardedHome
from infinity.zero.linear import zero_linear_forward
from infinity.zero.step_report import Outcome, StepClock, Wait

log = logging.getLogger("infinity.zero")


GradHandler = Callable[[int, torch.Tensor], None]


EXPECTED_HOOK_WARNING = ("Full backward hook is firing when gradients are computed with respect to module outputs "
                         "since no inputs require gradients")
"""[Note: an expected warning] torch warns when a full backward hook fires on a module none of whose
inputs require gradients, which is every embedding layer (its inputs are token ids).  The backward
pre-hook only gathers the module's parameters, so firing on the outputs' gradients is exactly what it
needs; Engine.backward silences this one message."""


def _quietly(hook: Callable[..., None], *args: object) -> None:
    """Runs a hook of the coordinator with torch functions unwatched: its own moves of parameters are no
    reads by the module ([Note: how a read is detected] in zero/external.py)."""
    with torch._C.DisableTorchFunction():
        hook(*args)


class Prefetch(enum.Enum):
    """Whether the coordinator reads ahead along the trace (stage3_prefetch_bucket_size 0 turns it off)."""

    TRACE = "trace"
    ON_DEMAND = "on_demand"


class Coordinator:
    def __init__(self, model: nn.Module, params: list[nn.Parameter], homes: list[ParamHome], offloaded: set[int],
                 on_grad: GradHandler, sizes: list[int], budgets: Budgets = Budgets(),
                 clock: StepClock | None = None, timeline: Timeline = NO_TIMELINE):
        self.model, self.params, self.homes = model, params, homes
        self.offloaded, self.on_grad, self.sizes, self.budgets = offloaded, on_grad, sizes, budgets
        self.prefetch = Prefetch.TRACE if budgets.prefetch_elements > 0 else Prefetch.ON_DEMAND
        self.clock = clock or StepClock()
        self.timeline = timeline
        self.cursor = Cursor()
        self._index = {id(p): i for i, p in enumerate(params)}
        self._gatherers = {i: h for i, h in enumerate(homes) if isinstance(h, ShardedHome)}  # ranks > 1
        # users, kept, read ahead: on each parameter's record, the manager's own for one in a swap file
        self.residence = Residence([home.record(i) for i, home in enumerate(homes)], offloaded)
        self._position: int | None = None
        self._empty = [torch.empty(0, dtype=p.dtype, device=p.device) for p in params]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._mine: list[tuple[int, ...]] = []
        self._external: list[frozenset[int]] = []  # per hooked module: its external parameters (in _mine too)
        self._entry: dict[int, int] = {}  # id(module) -> its index in _mine
        self.externals: dict[int, set[int]] = {}  # id(module) -> external parameters (zero/external.py)
        self._names: list[str] = []  # module names, for the timeline
        self._started: dict[int, float] = {}  # forward: module -> timeline start (µs)
        self._backward: tuple[int, float] | None = None  # the module whose backward runs, since when (µs)
        self._frozen = frozenset(i for i, p in enumerate(params) if not p.requires_grad) & offloaded
        self._frozen_release_queued = False  # [Note: a frozen parameter in backward]

    # ---- installation ---------------------------------------------------------------
    def install(self) -> None:
        for name, module in self.model.named_modules():
            mine = tuple(self._index[id(p)] for p in module.parameters(recurse=False)
                         if id(p) in self._index and self._index[id(p)] in self.offloaded)
            if mine:
                self._hook_module(name, module, mine)
        for i, p in enumerate(self.params):
            if p.requires_grad:  # [Note: a frozen parameter in backward]
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))
        self._check_live_budget()

    def _hook_module(self, name: str, module: nn.Module, mine: tuple[int, ...]) -> int:
        m = len(self._mine)
        self._mine.append(mine)
        self._external.append(frozenset())
        self._entry[id(module)] = m
        self._names.append(name or type(module).__name__)
        if type(module) is nn.Linear:
            module.forward = types.MethodType(zero_linear_forward, module)  # see zero/linear.py
        self._hooks += [
            module.register_forward_pre_hook(lambda mod, args, m=m: _quietly(self._enter, m, Phase.FORWARD)),
            module.register_forward_hook(lambda mod, args, out, m=m: _quietly(self._leave, m)),
            module.register_full_backward_pre_hook(lambda mod, grad_out, m=m: self._enter(m, Phase.BACKWARD)),
        ]
        return m

    def add_external(self, module: nn.Module, name: str, i: int, gather_now: bool = False) -> None:
        """Parameter i, read in module's forward but not its own, is gathered with module's from now on
        ([Note: how a read is detected] in zero/external.py); gather_now: it is read now, inside that
        forward, and is gathered at once."""
        m = self._entry.get(id(module))
        if m is None:
            m = self._hook_module(name, module, ())
        if i not in self._mine[m]:
            self._mine[m] += (i,)
        self._external[m] |= {i}
        self.externals.setdefault(id(module), set()).add(i)
        self._check_live_budget()
        if gather_now:
            self._gather(i, self._mine[m])

    def release_externals(self) -> None:
        """After a forward with no backward to follow: the external parameters it gathered go."""
        for ext in self._external:
            for i in ext:
                if self.residence.users(i) > 0:
                    self._drop(i)

    def _check_live_budget(self) -> None:
        largest = max((sum(self.sizes[i] for i in mine) for mine in self._mine), default=0)
        if largest > self.budgets.max_live_elements:
            raise ConfigError([Problem("zero_optimization.stage3_max_live_parameters",
                                       f"{self.budgets.max_live_elements} elements cannot hold one module's "
                                       f"parameters ({largest} elements)", f"set it to at least {largest}")])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ---- a module starts and ends ---------------------------------------------------------
    def _enter(self, m: int, phase: Phase) -> None:
        mine = self._mine[m]
        # [Note: which passes follow the trace]  A forward under no_grad (inference, evaluation) neither
        # records nor follows it.  Backward hooks always run with grad mode off, so a backward use is
        # tracked regardless; a backward only follows a forward that was tracked.
        tracking = phase is Phase.BACKWARD or torch.is_grad_enabled()
        position = self.cursor.observe(m, phase, {i: self.sizes[i] for i in mine}) if tracking else None
        self._position = position
        if position is not None:
            self._make_room(position, mine)
        for i in mine:
            self._gather(i, mine)
        if phase is Phase.BACKWARD and not self._frozen_release_queued and not self._frozen.isdisjoint(mine):
            torch.autograd.Variable._execution_engine.queue_callback(self._release_frozen)
            self._frozen_release_queued = True
        if position is not None and self.prefetch is Prefetch.TRACE:
            self._read_ahead(position)
            for i in self.residence.reading():
                self.homes[i].advance(i)  # on CUDA: reads done go on to the device now
            self._gather_ahead(position)
        if self.timeline.enabled:
            self._draw(m, phase)

    def _draw(self, m: int, phase: Phase) -> None:
        """[Note: module spans on the timeline]  A forward span runs from the pre-hook to the forward hook.
        Backward has no hook after a module's own work, so a module's backward span runs from its backward
        pre-hook to the next one (or to the end of backward): its input-gradient and weight-gradient
        work, and the waits for the next module's parameters."""
        now = self.timeline.now_us()
        if phase is Phase.FORWARD:
            self._started[m] = now
            return
        self._close_backward(now)  # ends where the next begins: one row's spans never overlap
        self._backward = (m, now)

    def _close_backward(self, end: float | None = None) -> None:
        if self._backward is not None:
            m, start = self._backward
            self.timeline.complete(f"backward {self._names[m]}", Track.COMPUTE, start, end)
            self._backward = None

    def _leave(self, m: int) -> None:
        start = self._started.pop(m, None)
        if start is not None:
            self.timeline.complete(f"forward {self._names[m]}", Track.COMPUTE, start)
        # an external parameter stays until its gradient is made (autograd may read it in backward); a
        # forward without grad lets it go like the module's own
        ext = self._external[m] if torch.is_grad_enabled() else frozenset()
        unused = [i for i in self._mine[m] if i not in ext and self.residence.leave(i)]
        trace, position = self.cursor.trace, self._position
        if trace is None or position is None:
            released = unused  # off the trace: nothing is known to come back soon
        else:
            released = releases_after(trace, position, frozenset(unused), self.budgets)
        for i in unused:
            if i in released:
                self._drop(i)
            else:
                self.residence.keep(i)
                self.homes[i].keep(i, self.params[i], self._empty[i])
        if released and position is not None and self.prefetch is Prefetch.TRACE:
            self._read_ahead(position)  # a dropped partition needed again soon is read again now

    # ---- gathering, with the prefetch outcome --------------------------------------------
    def _gather(self, i: int, mine: tuple[int, ...]) -> None:
        was = self.residence.state(i)
        if was is Residency.AT_REST or was is Residency.READ_AHEAD:
            outcome = Outcome.MISS
            if was is Residency.READ_AHEAD:
                outcome = Outcome.HIT if self.homes[i].ready(i) else Outcome.LATE
            else:
                self._start_miss(i, mine)
            self.clock.count(outcome)
            start = time.perf_counter()
            with self.timeline.span(f"wait {outcome.value}", Track.WAIT, param=i):
                self.params[i].data = self.homes[i].fetch(i)
            if outcome is not Outcome.HIT:
                self.clock.add_wait(Wait.READ, time.perf_counter() - start)
            self.clock.live_changed(self.sizes[i])
        else:
            self.clock.count(Outcome.HIT)
        self.residence.use(i)

    def _read_ahead(self, position: int) -> None:
        trace = self.cursor.trace
        if trace is None:
            return
        held = frozenset(self._resident() | self.residence.reading())
        for i in fetches_from(trace, position, held, self.budgets):
            if not self.homes[i].read_ahead(i) and not self._preempt(i, position):
                break  # every staging buffer is out; the next module's hook tries again
            self.residence.read_ahead(i)

    def _gather_ahead(self, position: int) -> None:
        """[Note: gathering ahead]  With several ranks a use needs the read of this rank's piece and an
        all-gather of every rank's.  The next module's pieces whose reads were started ahead are gathered
        now, so the all-gathers run while this module computes (waiting here for a read not yet done
        counts as read wait).  Which pieces is decided by the trace and the reads started, which are
        the same on every rank (gather.py's note), so every rank starts the same all-gathers in the
        same order.  One module ahead keeps the extra whole parameters on the compute tier to one
        module's worth."""
        trace = self.cursor.trace
        if trace is None or position + 1 >= len(trace):
            return
        for i in trace.uses[position + 1].partitions:
            gatherer = self._gatherers.get(i)
            if gatherer is not None and self.residence.state(i) is Residency.READ_AHEAD:
                with self.clock.waiting(Wait.READ), self.timeline.span("gather ahead", Track.WAIT, param=i):
                    started = gatherer.gather_ahead(i)
                if started:
                    self.clock.gather_started_ahead()

    def _preempt(self, i: int, position: int) -> bool:
        """No buffer is free for i's read ahead: the read ahead used farthest after i, if any, gives its buffer
        up and i's read starts ([Note: nearer reads first] in infinity/schedule/preempt.py)."""
        trace = self.cursor.trace
        if trace is None:
            return False
        farthest = preempt_for_read_ahead(trace, position, i, self._reading_on(self.homes[i]))
        if farthest is None:
            return False
        self._cancel(farthest)
        return self.homes[i].read_ahead(i)

    def _start_miss(self, i: int, mine: tuple[int, ...]) -> None:
        """A parameter nobody read ahead: its read starts now, reads ahead giving their buffers up while
        none is free; otherwise fetch would wait for a buffer only this thread can give back.  (Buffers held
        by writes come back when the writes complete: fetch waits for those.)"""
        home = self.homes[i]
        while not home.read_ahead(i):
            farthest = preempt_for_miss(self.cursor.trace, self._position,
                                        [j for j in self._reading_on(home) if j not in mine])
            if farthest is None:
                return
            self._cancel(farthest)

    def _reading_on(self, home: ParamHome) -> list[int]:
        return [j for j in self.residence.reading() if self.homes[j] is home]

    def _cancel(self, i: int) -> None:
        """A read started ahead is given up: its buffer returns to the pool."""
        self.residence.rest(i)
        self.homes[i].cancel(i)

    def first_reads(self, most: int) -> tuple[int, ...]:
        """The partitions (at most `most`) that read_ahead_of_next_step would read first, in order of use."""
        trace = self.cursor.trace
        if self.prefetch is not Prefetch.TRACE or trace is None or most <= 0:
            return ()
        return fetches_from(trace, -1, frozenset(self._resident() | self.residence.reading()), self.budgets)[:most]

    def read_ahead_of_next_step(self, arrived: tuple[int, ...] = ()) -> None:
        """After the optimizer step (or between micro-batches): start the next step's first reads.
        arrived: partitions already in host memory (the optimizer step held their new values), counted
        as reads ahead that have completed, so a use finds them and `settle` gives their buffers back."""
        if self.prefetch is Prefetch.TRACE and self.cursor.trace is not None:
            for i in arrived:
                self.residence.read_ahead(i)
            self._read_ahead(-1)
            for i in self.residence.reading():
                self.homes[i].advance(i)
        else:
            for i in arrived:
                self.homes[i].cancel(i)

    def largest_gather(self) -> int:
        """The most offloaded partitions one module gathers at once."""
        return max((len(mine) for mine in self._mine), default=0)

    def _make_room(self, position: int, mine: tuple[int, ...]) -> None:
        trace = self.cursor.trace
        if trace is None:
            return
        incoming = sum(self.sizes[i] for i in mine if self.residence.state(i) is Residency.AT_REST)
        held = frozenset(self._resident() | self.residence.reading())
        for i in make_room(trace, position, held, incoming, self.budgets, frozenset(mine)):
            if self.residence.state(i) is Residency.KEPT:
                self._drop(i)
            elif self.residence.state(i) is Residency.READ_AHEAD:
                self._cancel(i)

    def _resident(self) -> set[int]:
        return self.residence.resident()

    # ---- releasing ---------------------------------------------------------------------
    def release_all(self) -> None:
        """After backward: whatever is still gathered or kept goes; reads nobody will use are completed."""
        for i in self.offloaded:
            if self.residence.users(i) > 0 or self.residence.state(i) is Residency.KEPT:
                self._drop(i)
        self._close_backward()
        self._frozen_release_queued = False  # a backward that failed never ran its callback
        self.settle()
        self.cursor.end_step()

    def gathered(self) -> bool:
        """Whether any offloaded parameter is on the compute tier (inside a forward or backward)."""
        return bool(self._resident())

    def settle(self) -> None:
        """Gives up every read started ahead (their buffers return); the next module reads on demand."""
        for i in sorted(self.residence.reading()):
            self._cancel(i)

    def _drop(self, i: int) -> None:
        self.residence.rest(i)
        self.params[i].data = self._empty[i]
        self.homes[i].release(i)
        self.clock.live_changed(-self.sizes[i])

    def _release_frozen(self) -> None:
        """[Note: a frozen parameter in backward]  A frozen parameter (requires_grad=False) gets no gradient, so
        no hook says when autograd is done with it.  One that a backward pre-hook gathered (autograd reads it
        for its module's input gradients) stays until the backward ends: this callback, queued on autograd's
        engine by the first such gather, releases it then, also in a backward that another engine runs through
        this model (a frozen model whose input needs gradients).  One whose module needs no input gradients (a
        frozen embedding at the bottom) is not gathered in backward at all."""
        self._frozen_release_queued = False
        for i in sorted(self._frozen):
            if self.residence.users(i) > 0:
                self._drop(i)

    def _grad_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self.on_grad(i, p)
            if i in self.offloaded and self.residence.users(i) > 0 and not any(i in e for e in self._external):
                self._drop(i)  # autograd reads this parameter no more in this backward (an external one
                # may still be read, by code autograd does not know of: it goes at the backward's end)
        return hook
