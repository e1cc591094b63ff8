"""The optimizer a run steps: its update rule and its torch-style parameter groups, from the config's
optimizer block or a client's torch optimizer (initialize(optimizer=...)), over model_parameters given as
parameters or as groups ({"params": [...], "weight_decay": 0.0, "lr": ...}), as DeepSpeed accepts them.

[Note: the groups are dicts the update reads]  Each group is a dict as torch's param_groups holds them
("params" and the hyperparameters).  The swapper reads a sub-group's hyperparameters from its group's dict
at every step, so whatever sets group["lr"] (the engine's config schedule, or a torch LR scheduler over the
optimizer initialize returns) sets the lr the step uses.  With a client optimizer instance the dicts are
its own param_groups: a scheduler built on it drives infinity's step as it would have driven the client's.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from infinity.errors import UsageError
from infinity.swap.rules import AdamRule, LionRule, OptimizerKind, UpdateRule, probe
from infinity.zero.settings import EngineSettings

log = logging.getLogger("infinity.zero")

ADAGRAD_DEFAULTS = {"lr_decay": 0.0, "initial_accumulator_value": 0.0}  # DeepSpeed's CPU Adagrad has neither


@dataclass
class OptimizerSetup:
    rule: UpdateRule
    groups: list[dict[str, Any]]  # torch-style parameter groups (the note above)
    client: torch.optim.Optimizer | None = None  # the client's optimizer whose param_groups these are

    def rebind(self, names: dict[int, str], model: nn.Module) -> "OptimizerSetup":
        """The same groups (the same dicts) over model's parameters as they are now: a parameter the model
        replaced (zero/resize.py) takes its old one's place, found by name (names: old parameter id -> name).
        A parameter new to the model joins the first group."""
        now = dict(model.named_parameters())
        placed: set[int] = set()
        for group in self.groups:
            group["params"] = [now[names[id(p)]] if id(p) in names and names[id(p)] in now else p
                               for p in group["params"]]
            placed.update(id(p) for p in group["params"])
        if self.groups:
            self.groups[0]["params"] += [p for p in now.values() if p.requires_grad and id(p) not in placed]
        return self

    def group_of(self, params: list[nn.Parameter]) -> list[int | None]:
        """The group index of each of params (a trained parameter is in exactly one group); None for a frozen
        one (requires_grad=False), which has no optimizer state even where a group lists it, as DeepSpeed
        leaves frozen parameters out of its optimizer's groups."""
        index = {id(p): g for g, group in enumerate(self.groups) for p in group["params"]}
        return [index[id(p)] if p.requires_grad else None for p in params]


def optimizer_setup(model: nn.Module, settings: EngineSettings, model_parameters: Iterable[Any] | None = None,
                    optimizer: Any = None) -> OptimizerSetup:
    """The rule and the groups: the client optimizer's (an instance, or a class called with model_parameters as
    DeepSpeed calls it), else the config's optimizer with model_parameters' groups.  UsageErrors name what is
    wrong with the parameters or the optimizer."""
    given = list(model_parameters) if model_parameters is not None else None
    if optimizer is not None:
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(given if given is not None else list(model.parameters()))
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"initialize(optimizer=...): got {type(optimizer).__name__}; pass a torch.optim.Optimizer "
                             "instance or class, or name the optimizer in the config's optimizer block")
        setup = OptimizerSetup(client_rule(optimizer), optimizer.param_groups, optimizer)
    else:
        defaults = config_defaults(settings)
        groups = given if given is not None else list(model.parameters())
        setup = OptimizerSetup(config_rule(settings), [{**defaults, **group} for group in as_groups(groups)])
    check_groups(model, setup.groups)
    return setup


def config_rule(settings: EngineSettings) -> UpdateRule:
    kind = settings.optimizer_kind
    if kind is OptimizerKind.LION:
        return LionRule()
    if kind is OptimizerKind.ADAGRAD:
        return probe(torch.optim.Adagrad, config_defaults(settings))
    return AdamRule(settings.adam.decoupled)


def config_defaults(settings: EngineSettings) -> dict[str, Any]:
    """The config's optimizer.params as one group's hyperparameters."""
    adam = settings.adam
    if settings.optimizer_kind is OptimizerKind.LION:
        return {"lr": adam.lr, "betas": adam.betas, "weight_decay": adam.weight_decay}
    if settings.optimizer_kind is OptimizerKind.ADAGRAD:
        return {"lr": adam.lr, "eps": adam.eps, "weight_decay": adam.weight_decay, **ADAGRAD_DEFAULTS}
    return adam.group()


def client_rule(optimizer: torch.optim.Optimizer) -> UpdateRule:
    """Torch's Adam and AdamW as infinity's fused Adam (unless amsgrad or maximize); any other class as
    probed (swap/rules.py), refused with the reason when its state cannot be swapped."""
    stepped = [s for s in optimizer.state.values() if s and (float(s.get("step", 1)) > 0)]
    if stepped:
        raise UsageError(f"initialize(optimizer=...): the {type(optimizer).__name__} given has already stepped "
                         "(its state holds moments infinity would drop); pass a fresh optimizer and resume "
                         "through engine.load_checkpoint")
    optimizer.state.clear()  # the states now live on infinity's tiers
    cls, d = type(optimizer), optimizer.defaults
    plain = not d.get("amsgrad") and not d.get("maximize") and not any(g.get("amsgrad") or g.get("maximize")
                                                                       for g in optimizer.param_groups)
    if cls in (torch.optim.Adam, torch.optim.AdamW) and plain:
        return AdamRule(decoupled=cls is torch.optim.AdamW or bool(d.get("decoupled_weight_decay")))
    return probe(cls, {k: v for k, v in d.items() if k not in ("params",)})


def as_groups(given: list[Any]) -> list[dict[str, Any]]:
    """model_parameters as groups: dicts as they are (params made a list), plain parameters as one group."""
    if all(isinstance(g, dict) for g in given) and given:
        groups = []
        for i, g in enumerate(given):
            if "params" not in g:
                raise UsageError(f"model_parameters[{i}]: a parameter group needs 'params'; got keys {sorted(g)}")
            params = g["params"]
            groups.append({**g, "params": [params] if isinstance(params, torch.Tensor) else list(params)})
        return groups
    if any(isinstance(g, dict) for g in given):
        raise UsageError("model_parameters mixes parameter groups (dicts) and parameters; pass one or the other")
    return [{"params": given}]


def check_groups(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Every trained parameter (requires_grad) in exactly one group; nothing that is not the model's."""
    owned = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, int] = {}
    for g, group in enumerate(groups):
        for p in group["params"]:
            if id(p) not in owned:
                raise UsageError(f"parameter group {g} holds a tensor that is not a parameter of model")
            if id(p) in seen and seen[id(p)] != g:
                raise UsageError(f"parameter {owned[id(p)]!r} is in parameter groups {seen[id(p)]} and {g}; "
                                 "put each parameter in one group")
            seen[id(p)] = g
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if left:
        raise UsageError(f"model_parameters leaves out parameters that require grad ({', '.join(left[:5])}"
                         f"{', ...' if len(left) > 5 else ''}); infinity trains every parameter with "
                         "requires_grad=True: add them to a group, or set requires_grad=False on those to freeze")


def set_lr(groups: list[dict[str, Any]], lr: float) -> None:
    """The config's schedule sets every group's lr, as DeepSpeed's WarmupLR and WarmupDecayLR do."""
    for group in groups:
        group["lr"] = lr


def step_client_scheduler(scheduler: Any) -> None:
    """A client's torch LR scheduler, after an applied optimizer step, as DeepSpeed's engine steps it.

    [Note: _opt_called]  A torch scheduler warns that it was stepped before its optimizer unless the
    optimizer's step() ran (torch marks that with `_opt_called` on the optimizer).  infinity steps the
    states itself, never the client optimizer's step(), so it sets the mark the step would have set."""
    if scheduler is None:
        return
    optimizer = getattr(scheduler, "optimizer", None)
    if optimizer is not None:
        optimizer._opt_called = True
    scheduler.step()
