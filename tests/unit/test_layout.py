"""Optimizer sub-groups: whole parameters, one parameter group each, packed group by group."""
from __future__ import annotations

import torch

from infinity.swap.layout import PAD, plan_groups
from infinity.swap.rules import LionRule, probe


def test_interleaved_parameter_groups_fill_whole_sub_groups_and_never_mix():
    sizes = [(f"p{i}", 100) for i in range(8)]  # weight, bias, weight, bias, ...
    groups = plan_groups(sizes, 1000, [i % 2 for i in range(8)])
    assert [g.param_group for g in groups] == [0, 1]
    assert [[s.index for s in g.slices] for g in groups] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert all(s.offset % PAD == 0 and s.group == g.index for g in groups for s in g.slices)


def test_without_parameter_groups_sub_groups_split_by_size_in_engine_order():
    groups = plan_groups([("a", 600), ("b", 600), ("c", 100)], 1000)
    assert [[s.name for s in g.slices] for g in groups] == [["a"], ["b", "c"]]
    assert all(g.param_group == 0 for g in groups)


def test_lion_steps_by_lr_against_the_sign_of_the_interpolated_momentum():
    master, grad = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, -2.0, 0.0])
    states, step = {"exp_avg": torch.zeros(3)}, torch.zeros(())
    LionRule().update(master, grad, states, step, {"lr": 0.1, "betas": (0.9, 0.99), "weight_decay": 0.0})
    assert master.tolist() == torch.tensor([0.9, 1.1, 0.9]).tolist()  # copysign(lr, +0) steps down, as DeepSpeed
    assert torch.allclose(states["exp_avg"], torch.tensor([0.02, -0.02, 0.0])) and float(step) == 1


def test_the_probe_names_the_state_a_torch_optimizer_keeps_per_element():
    sgd = probe(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})
    assert sgd.states == ("momentum_buffer",) and not sgd.counts_steps
    adagrad = probe(torch.optim.Adagrad, {"lr": 0.1})
    assert adagrad.states == ("sum",) and adagrad.counts_steps
    assert probe(torch.optim.SGD, {"lr": 0.1}).states == ()  # no momentum: no state to swap
