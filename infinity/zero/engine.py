"""The engine `infinity.initialize` returns: forward, backward and step with parameters and optimizer
states on the tiers the settings name.  Shaped like DeepSpeed's engine so users switch by an import."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from torch import nn

from infinity.errors import ConfigError, InfinityError, Problem
from infinity.io import DirectPolicy, open_handle
from infinity.memory.host_buffer import PinPolicy
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.pool import BufferPool
from infinity.memory.report import MemoryReport
from infinity.swap.layout import plan_groups
from infinity.swap.optimizer import BUFFERS_PER_GROUP, HostOptimizer, NvmeOptimizer
from infinity.swap.params import ComputeHome, HostHome, NvmeHome, ParamHome, Tier
from infinity.zero.coordinator import EXPECTED_HOOK_WARNING, Coordinator
from infinity.zero.loss_scale import LossScaler
from infinity.zero.settings import EngineSettings, Precision, dtype_of

log = logging.getLogger("infinity.zero")


class UsageError(InfinityError):
    """The engine was driven out of order (step before backward, a parameter added after initialize)."""


class Engine:
    def __init__(self, model: nn.Module, settings: EngineSettings):
        self.module, self.settings = model, settings
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.global_steps = self.micro_steps = 0
        self.scaler = LossScaler(settings.loss_scale) if settings.precision is Precision.FP16 else None
        self._managers: dict[str, MemoryManager] = {}
        self._grad_sumsq = 0.0
        self._overflow = False
        self._pending_backward = False
        self._param_count = len(list(model.parameters()))
        self._check(named)
        self.groups = plan_groups([(n, p.numel()) for n, p in named], settings.sub_group_size)
        self.optimizer = self._build_optimizer()
        self.optimizer.set_master(lambda s: self.params[s.index].detach().float())
        self.homes, self.offloaded = self._build_param_homes()
        for m in self._managers.values():
            m.store.reserve()
        self._place_params()
        self.coordinator = Coordinator(model, self.params, self.homes, self.offloaded, self._on_grad)
        self.coordinator.install()
        self.lr = self._lr()

    # ---- the DeepSpeed-shaped API -----------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check_usable()
        return self.module(*args, **kwargs)

    forward = __call__

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward of loss (scaled for fp16, divided by gradient_accumulation_steps)."""
        self._check_usable()
        gas = self.settings.gradient_accumulation_steps
        self._boundary = (self.micro_steps + 1) % gas == 0
        scaled = loss.float() / gas
        if self.scaler is not None:
            scaled = scaled * self.scaler.scale
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=EXPECTED_HOOK_WARNING, category=UserWarning)
            scaled.backward()
        self.coordinator.release_all()
        self.micro_steps += 1
        self._pending_backward = True
        return loss

    def step(self) -> None:
        """The optimizer step, at the end of each gradient-accumulation window."""
        if not self._pending_backward:
            raise UsageError("step() was called without a backward() since the last step; call "
                             "engine.backward(loss) first")
        self._pending_backward = False
        if not self._boundary:
            return
        overflow = self._overflow
        if not overflow:
            self.optimizer.step(self.lr, self._grad_coef(), self._write_param)
            self.global_steps += 1
        else:
            self.optimizer.discard_grads()
        if self.scaler is not None:
            self.scaler.update(overflow)
        self._grad_sumsq, self._overflow = 0.0, False
        self.lr = self._lr()

    def train(self, mode: bool = True) -> "Engine":
        self.module.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def zero_grad(self) -> None:
        """Gradients leave the compute tier as they are made; nothing to clear."""

    def memory_report(self) -> MemoryReport:
        reports = [m.ledger.report() for m in self._managers.values()]
        pools = sum(p.buffer_count * p.buffer_bytes for p in self._pools())
        fields = [sum(getattr(r, f) for r in reports) for f in
                  ("compute_bytes", "host_bytes", "nvme_bytes", "peak_compute_bytes", "peak_host_bytes",
                   "peak_nvme_bytes")]
        return MemoryReport(*fields, host_pool_bytes=pools)

    def close(self) -> None:
        """Removes hooks and this run's swap files."""
        self.coordinator.remove()
        for m in self._managers.values():
            m.close()
        self._managers.clear()

    # ---- gradients --------------------------------------------------------------
    def _on_grad(self, i: int, p: torch.Tensor) -> None:
        if not self._boundary or p.grad is None:
            return  # accumulating: torch keeps adding into p.grad
        grad = p.grad.detach().float()
        norm = float(torch.linalg.vector_norm(grad, dtype=torch.float64))
        if not math.isfinite(norm):
            self._overflow = True
        self._grad_sumsq += norm * norm
        self.optimizer.put_grad(self._slice[i], grad)
        p.grad = None

    def _grad_coef(self) -> float:
        scale = self.scaler.scale if self.scaler is not None else 1.0
        coef = 1.0 / scale
        clip = self.settings.gradient_clipping
        if clip > 0:
            total = math.sqrt(self._grad_sumsq) / scale
            coef *= min(1.0, clip / (total + 1e-6))
        return coef

    def _write_param(self, s: Any, values: torch.Tensor) -> set[str]:
        return self.homes[s.index].write(s.index, values)

    def _lr(self) -> float:
        schedule = self.settings.schedule
        return schedule.lr(self.global_steps) if schedule else self.settings.adam.lr

    # ---- construction -----------------------------------------------------------
    def _check(self, named: list[tuple[str, nn.Parameter]]) -> None:
        s = self.settings
        problems = []
        for tier, path, key in ((s.param_tier, s.param_nvme_path, "offload_param"),
                                (s.optimizer_tier, s.optimizer_nvme_path, "offload_optimizer")):
            if tier is Tier.NVME and not path:
                problems.append(Problem(f"zero_optimization.{key}.nvme_path", "device is nvme but no nvme_path is "
                                        "given", "set nvme_path to a folder on the NVMe drive"))
        if s.param_tier is Tier.NVME and named:
            name, largest = max(named, key=lambda np: np[1].numel())
            if largest.numel() > s.param_buffer_size:
                problems.append(Problem("zero_optimization.offload_param.buffer_size",
                                        f"{s.param_buffer_size} elements cannot hold parameter {name!r} of "
                                        f"{largest.numel()} elements", f"set buffer_size to at least "
                                        f"{largest.numel()}"))
        if s.optimizer_tier is Tier.NVME and s.optimizer_buffer_count < BUFFERS_PER_GROUP:
            problems.append(Problem("zero_optimization.offload_optimizer.buffer_count",
                                    f"{s.optimizer_buffer_count} buffers cannot hold one sub-group's "
                                    f"{BUFFERS_PER_GROUP} states", "set it to at least 4"))
        if problems:
            raise ConfigError(problems)

    def _manager(self, path: str) -> MemoryManager:
        if path not in self._managers:
            handle = open_handle(self.settings.aio, nvme_path=path, direct=DirectPolicy.AUTO)
            self._managers[path] = MemoryManager(handle, NvmeStore(path, rank=self.settings.rank), self.device)
        return self._managers[path]

    def _build_optimizer(self) -> HostOptimizer | NvmeOptimizer:
        s = self.settings
        self._slice = {sl.index: sl for g in self.groups for sl in g.slices}
        if s.optimizer_tier is not Tier.NVME:
            return HostOptimizer(self.groups, s.adam)
        # buffer_count counts buffers per sub-group in flight (see config/zero.py); the pipeline holds
        # one sub-group updating, plus the next read (pipeline_read) and the last written (pipeline_write).
        depth = 1 + s.pipeline.read + s.pipeline.write
        self._optimizer_pool = BufferPool("optimizer", s.optimizer_buffer_count * depth, max(g.nbytes for g in self.groups),
                                          "zero_optimization.offload_optimizer.buffer_count", self._pin())
        return NvmeOptimizer(self._manager(str(s.optimizer_nvme_path)), self.groups, self._optimizer_pool, s.adam,
                             s.pipeline)

    def _build_param_homes(self) -> tuple[list[ParamHome], set[int]]:
        s = self.settings
        dtype = dtype_of(s.precision)
        offloaded = {i for i, p in enumerate(self.params)
                     if s.param_tier is not Tier.COMPUTE and p.numel() > s.persistence_threshold}
        homes: list[ParamHome] = [ComputeHome(self.params)] * len(self.params)
        shapes = {i: self.params[i].shape for i in offloaded}
        if offloaded and s.param_tier is Tier.HOST:
            home: ParamHome = HostHome(shapes, dtype, self.device, pin=self._pin() is not PinPolicy.PAGEABLE
                                       and torch.cuda.is_available())
        elif offloaded:
            largest = max(self.params[i].numel() for i in offloaded) * torch.empty(0, dtype=dtype).element_size()
            self._param_pool = BufferPool("param", s.param_buffer_count, largest,
                                          "zero_optimization.offload_param.buffer_count", self._pin())
            home = NvmeHome(self._manager(str(s.param_nvme_path)), self._param_pool,
                            {i: self.names[i] for i in offloaded}, shapes, dtype)
        for i in offloaded:
            homes[i] = home
        return homes, offloaded

    def _place_params(self) -> None:
        dtype = dtype_of(self.settings.precision)
        for i, p in enumerate(self.params):
            if i in self.offloaded:
                self.homes[i].put(i, p.detach())  # type: ignore[attr-defined]
                p.data = torch.empty(0, dtype=dtype, device=self.device)
            elif p.dtype != dtype:
                p.data = p.data.to(dtype)

    def _pin(self) -> PinPolicy:
        return PinPolicy.AUTO if self.settings.pin_memory else PinPolicy.PAGEABLE

    def _pools(self) -> list[BufferPool]:
        return [p for p in (getattr(self, "_param_pool", None), getattr(self, "_optimizer_pool", None)) if p]

    def _check_usable(self) -> None:
        for m in self._managers.values():
            m.check_healthy()
        if len(list(self.module.parameters())) != self._param_count:
            raise UsageError("the model has parameters that were added after infinity.initialize; build the "
                             "whole model first, then call initialize")
