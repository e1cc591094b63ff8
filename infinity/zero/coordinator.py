"""Module hooks: a module's offloaded parameters are gathered before it runs and released after.

forward:  pre-hook gathers, post-hook releases.
backward: the full backward pre-hook gathers again (autograd reads the weights to compute input
          gradients); the parameter's post-accumulate-grad hook hands the gradient to the engine and
          releases the parameter, since autograd needs it no more in this backward.
A released parameter's .data is an empty tensor; its values live in its home (host or NVMe).
"""
from __future__ import annotations

import logging
import types
from typing import Callable

import torch
from torch import nn

from infinity.swap.params import ParamHome
from infinity.zero.linear import zero_linear_forward

log = logging.getLogger("infinity.zero")


GradHandler = Callable[[int, torch.Tensor], None]


EXPECTED_HOOK_WARNING = ("Full backward hook is firing when gradients are computed with respect to module outputs "
                         "since no inputs require gradients")
"""[Note: an expected warning] torch warns when a full backward hook fires on a module none of whose
inputs require gradients, which is every embedding layer (its inputs are token ids).  The backward
pre-hook only gathers the module's parameters, so firing on the outputs' gradients is exactly what it
needs; Engine.backward silences this one message."""


class Coordinator:
    def __init__(self, model: nn.Module, params: list[nn.Parameter], homes: list[ParamHome],
                 offloaded: set[int], on_grad: GradHandler):
        self.model, self.params, self.homes = model, params, homes
        self.offloaded = offloaded
        self.on_grad = on_grad
        self._index = {id(p): i for i, p in enumerate(params)}
        self._users = [0] * len(params)
        self._empty = [torch.empty(0, dtype=p.dtype, device=p.device) for p in params]
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        for module in self.model.modules():
            mine = [self._index[id(p)] for p in module.parameters(recurse=False)
                    if id(p) in self._index and self._index[id(p)] in self.offloaded]
            if not mine:
                continue
            if type(module) is nn.Linear:
                module.forward = types.MethodType(zero_linear_forward, module)  # see zero/linear.py
            self._hooks += [
                module.register_forward_pre_hook(lambda m, args, mine=mine: self.gather(mine)),
                module.register_forward_hook(lambda m, args, out, mine=mine: self.release(mine)),
                module.register_full_backward_pre_hook(lambda m, grad_out, mine=mine: self.gather(mine)),
            ]
        for i, p in enumerate(self.params):
            self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))

    def gather(self, indices: list[int]) -> None:
        by_home: dict[int, list[int]] = {}  # one fetch_many per home: an NVMe home overlaps the reads
        for i in indices:
            if self._users[i] == 0:
                by_home.setdefault(id(self.homes[i]), []).append(i)
        for wanted in by_home.values():
            for i, values in self.homes[wanted[0]].fetch_many(wanted):
                self.params[i].data = values
        for i in indices:
            self._users[i] += 1

    def release(self, indices: list[int]) -> None:
        for i in indices:
            self._users[i] -= 1
            if self._users[i] == 0:
                self._drop(i)

    def release_all(self) -> None:
        """After backward: whatever is still gathered (a module whose gradient never came) goes."""
        for i in self.offloaded:
            if self._users[i] > 0:
                self._users[i] = 0
                self._drop(i)

    def _drop(self, i: int) -> None:
        self.params[i].data = self._empty[i]
        self.homes[i].release(i)

    def _grad_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            self.on_grad(i, p)
            if i in self.offloaded and self._users[i] > 0:
                self._users[i] = 0  # autograd reads this parameter no more in this backward
                self._drop(i)
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
