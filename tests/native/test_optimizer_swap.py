"""The NVMe optimizer swapper gives torch.optim.AdamW's results, whatever the pipeline depth."""
from __future__ import annotations

import pytest
import torch

from infinity.config.aio import AioConfig
from infinity.io import DirectPolicy, open_handle
from infinity.memory.manager import MemoryManager
from infinity.memory.nvme_store import NvmeStore
from infinity.memory.pool import BufferPool
from infinity.memory.record import State
from infinity.swap.layout import plan_groups
from infinity.swap.optimizer import AdamSettings, HostOptimizer, NvmeOptimizer, Pipeline

SHAPES = [(33, 7), (1000,), (5,), (64, 64), (3, 3, 3), (2049,)]
SETTINGS = AdamSettings(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def reference_run(params, grads_per_step, coefs):
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(ref, lr=SETTINGS.lr, betas=SETTINGS.betas, eps=SETTINGS.eps,
                            weight_decay=SETTINGS.weight_decay)
    for grads, coef in zip(grads_per_step, coefs):
        for p, g in zip(ref, grads):
            p.grad = g * coef
        opt.step()
    return [p.detach() for p in ref]


def run(optimizer, groups, params, grads_per_step, coefs, ahead=False):
    """ahead: read_ahead before each step's gradients come in, as the engine does when backward starts."""
    slices = {s.index: s for g in groups for s in g.slices}
    optimizer.set_master(lambda s: params[s.index])
    out = [p.clone() for p in params]

    def write(s, values):
        out[s.index].copy_(values[: s.numel].view_as(out[s.index]))
        return set()

    for grads, coef in zip(grads_per_step, coefs):
        if ahead:
            optimizer.read_ahead()
        for i, g in enumerate(grads):
            optimizer.put_grad(slices[i], g)
        optimizer.step(coef, write)
    return out


@pytest.fixture
def problem():
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(4)]
    return params, grads, [1.0, 0.5, 1.0, 0.25]


@pytest.mark.parametrize("ahead", [False, True], ids=["in-step", "read-ahead"])
@pytest.mark.parametrize("buffer_count", [4, 8, 12])
@pytest.mark.parametrize("sub_group_size", [1100, 10**9])
def test_nvme_optimizer_matches_torch_adamw(tmp_path, problem, buffer_count, sub_group_size, ahead):
    params, grads, coefs = problem
    groups = plan_groups([(str(i), p.numel()) for i, p in enumerate(params)], sub_group_size)
    pool = BufferPool("optimizer", buffer_count, max(g.nbytes for g in groups), "offload_optimizer.buffer_count")
    with open_handle(AioConfig(), direct=DirectPolicy.REQUIRE) as h:
        manager = MemoryManager(h, NvmeStore(tmp_path), torch.device("cpu"))
        try:
            opt = NvmeOptimizer(manager, groups, pool, SETTINGS.rule(), [SETTINGS.group()], Pipeline(read=True, write=True))
            manager.store.reserve()
            out = run(opt, groups, params, grads, coefs, ahead)
            in_flight = pool.in_use  # the last sub-groups' state writes, left in flight by step
            opt.settle()
            settled = pool.in_use
        finally:
            manager.close()
    expected = reference_run(params, grads, coefs)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert in_flight >= 1 + 3  # the resident gradient buffer and at least the last sub-group's three states
    assert settled == 1  # only the buffer that holds sub-group 0's next gradient ([Note: the first sub-group's ...])
    assert len(groups) == (1 if sub_group_size > 10**6 else 5)  # 231 | 1000+5 | 4096 | 27 | 2049


def test_host_optimizer_matches_torch_adamw(problem):
    params, grads, coefs = problem
    groups = plan_groups([(str(i), p.numel()) for i, p in enumerate(params)], 1100)
    out = run(HostOptimizer(groups, SETTINGS.rule(), [SETTINGS.group()]), groups, params, grads, coefs)
    for got, want in zip(out, reference_run(params, grads, coefs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_parameter_without_gradient_steps_with_zero_not_last_steps(tmp_path, problem):
    """As in DeepSpeed, a parameter that got no gradient this step is updated with a zero gradient."""
    params, grads, _ = problem
    zeros_but_first = [grads[1][0]] + [torch.zeros_like(g) for g in grads[1][1:]]
    expected = reference_run(params, [grads[0], zeros_but_first], [1.0, 1.0])
    groups = plan_groups([(str(i), p.numel()) for i, p in enumerate(params)], 10**9)
    pool = BufferPool("optimizer", 4, groups[0].nbytes, "offload_optimizer.buffer_count")
    out = [p.clone() for p in params]

    def write(s, values):
        out[s.index].copy_(values[: s.numel].view_as(out[s.index]))
        return set()

    with open_handle(AioConfig()) as h:
        manager = MemoryManager(h, NvmeStore(tmp_path), torch.device("cpu"))
        opt = NvmeOptimizer(manager, groups, pool, SETTINGS.rule(), [SETTINGS.group()], Pipeline())
        manager.store.reserve()  # moments and gradients start as the zeros of the reserved files
        opt.set_master(lambda s: params[s.index])
        for i, g in enumerate(grads[0]):
            opt.put_grad(groups[0].slices[i], g)
        opt.step(1.0, write)
        opt.put_grad(groups[0].slices[0], grads[1][0])  # only parameter 0 gets a gradient now
        opt.step(1.0, write)
        manager.close()
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reads_ahead_are_given_up_for_a_checkpoint_and_a_skipped_step(tmp_path, problem):
    """[Note: the step's I/O beside backward and the next forward]: reads started ahead of a step and writes
    left in flight after one are settled before another use of the swap files (here read_state, as a
    checkpoint does between backward and step), and given up by a skipped step; the results are unchanged."""
    params, grads, _ = problem
    expected_after_1 = reference_run(params, grads[:1], [1.0])
    expected = reference_run(params, [grads[0], grads[1], grads[3]], [1.0, 1.0, 1.0])
    groups = plan_groups([(str(i), p.numel()) for i, p in enumerate(params)], 1100)
    pool = BufferPool("optimizer", 12, max(g.nbytes for g in groups), "offload_optimizer.buffer_count")
    slices = {s.index: s for g in groups for s in g.slices}
    out = [p.clone() for p in params]
    seen: dict[int, torch.Tensor] = {}

    def write(s, values):
        out[s.index].copy_(values[: s.numel].view_as(out[s.index]))
        return set()

    def give(step_grads):
        for i, g in enumerate(step_grads):
            opt.put_grad(slices[i], g)

    with open_handle(AioConfig()) as h:
        manager = MemoryManager(h, NvmeStore(tmp_path), torch.device("cpu"))
        try:
            opt = NvmeOptimizer(manager, groups, pool, SETTINGS.rule(), [SETTINGS.group()], Pipeline())
            manager.store.reserve()
            opt.set_master(lambda s: params[s.index])
            opt.read_ahead()
            give(grads[0])
            opt.step(1.0, write)
            opt.read_ahead()  # the writes of step 1 may still be in flight here
            give(grads[1])
            opt.read_state("master", lambda s, v: seen.__setitem__(s.index, v[: s.numel].clone()))
            opt.step(1.0, write)  # reads again what read_state's settle gave up
            opt.read_ahead()
            ahead = manager.state("optimizer/0/master")
            give(grads[2])
            opt.discard_grads()  # an fp16 overflow: grads[2] is never applied
            after_skip = manager.state("optimizer/0/master")
            opt.settle()  # step 2's writes may still be in flight
            settled_after_skip = pool.in_use
            opt.read_ahead()
            give(grads[3])
            opt.step(1.0, write)
            opt.settle()
            settled = pool.in_use
        finally:
            manager.close()
    for i, want in enumerate(expected_after_1):
        torch.testing.assert_close(seen[i].view_as(want), want, rtol=1e-5, atol=1e-6)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (ahead, after_skip) == (State.READING, State.ON_NVME)  # the skipped step's reads were given up
    assert settled_after_skip == settled == 1  # only sub-group 0's gradient buffer is out
