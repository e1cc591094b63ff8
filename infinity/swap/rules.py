"""Update rules: what one optimizer step does to a flat fp32 sub-group, given its parameter group's
hyperparameters.  The swapper (optimizer.py) streams the vectors; a rule only updates them in place.

A rule names the per-element states it keeps beside the fp32 master weights (Adam: exp_avg and
exp_avg_sq; Lion: exp_avg; SGD with momentum: momentum_buffer; Adagrad: sum): those are swapped with the
master, one vector each per sub-group.  Hyperparameters are read from the parameter group's dict at every
step (torch's param_groups shape: "lr", "weight_decay", "betas", ...), so a learning-rate scheduler that
sets group["lr"] drives the update as it drives a torch optimizer.

- `AdamRule`: torch's fused CPU Adam/AdamW (torch.optim.adam.adam, fused=True).
- `LionRule`: DeepSpeed's CPU Lion (torch has none), element for element as its cpu_lion_impl.cpp.
- `TorchRule`: any torch optimizer class whose update is element-wise and whose state is tensors shaped like
  the parameter (plus a step count): SGD, Adagrad, RMSprop, Adamax, NAdam, RAdam, Adadelta, Rprop, Adam with
  amsgrad, ...  `probe` runs the class on a small problem first and refuses one that is not (LBFGS,
  SparseAdam, Adafactor) with the reason.
"""
from __future__ import annotations

import enum
from typing import Any, Mapping, Protocol

import torch
from torch.optim.adam import adam

from infinity.errors import UsageError

Group = Mapping[str, Any]  # one parameter group's hyperparameters (torch's param_groups entry)


class OptimizerKind(enum.Enum):
    """The optimizers the config's optimizer.type names."""

    ADAM = "Adam"  # Adam and AdamW (AdamSettings.decoupled)
    LION = "Lion"
    ADAGRAD = "Adagrad"


class UpdateRule(Protocol):
    name: str
    states: tuple[str, ...]  # per-element fp32 states kept beside the master weights, in file order

    def update(self, master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor],
               step: torch.Tensor, group: Group) -> None:
        """One step over flat vectors, in place; step (a 0-d fp32 tensor) counts this sub-group's steps
        before this one and is advanced by one."""


class AdamRule:
    """Adam (L2 weight decay added to the gradient) or AdamW (decoupled weight decay)."""

    states = ("exp_avg", "exp_avg_sq")

    def __init__(self, decoupled: bool = True):
        self.decoupled = decoupled
        self.name = "AdamW" if decoupled else "Adam"

    def update(self, master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor],
               step: torch.Tensor, group: Group) -> None:
        beta1, beta2 = group["betas"]
        decoupled = bool(group.get("decoupled_weight_decay", self.decoupled))
        adam([master], [grad], [states["exp_avg"]], [states["exp_avg_sq"]], [], [step], foreach=False, fused=True,
             amsgrad=False, beta1=float(beta1), beta2=float(beta2), lr=float(group["lr"]),
             weight_decay=float(group["weight_decay"]), eps=float(group["eps"]), maximize=False,
             decoupled_weight_decay=decoupled)


class LionRule:
    """[Note: DeepSpeed's CPU Lion]  c = beta1*m + (1-beta1)*g; p = p*(1 - lr*wd) - copysign(lr, c);
    m = beta2*m + (1-beta2)*g, in fp32 as deepspeed/ops/csrc/lion/cpu_lion_impl.cpp computes it.  copysign,
    not sign: where c is +0 the step is -lr, as there (the swapper keeps the padding at zero itself)."""

    name = "Lion"
    states = ("exp_avg",)

    def update(self, master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor],
               step: torch.Tensor, group: Group) -> None:
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        m = states["exp_avg"]
        c = m * beta1
        c.add_(grad, alpha=1 - beta1)
        c = torch.copysign(torch.full_like(c, lr), c).neg_()
        if wd > 0:
            master.mul_(1 - lr * wd)
        master.add_(c)
        m.mul_(beta2).add_(grad, alpha=1 - beta2)
        step.add_(1)


class TorchRule:
    """A torch optimizer class run over one flat vector at a time, its state made of the swapped vectors.

    [Note: first steps]  Torch creates a parameter's state on its first step (or, as Adagrad, in its
    constructor), sometimes not as zeros (SGD's momentum buffer starts as the first gradient).  So a
    sub-group's first step builds a fresh optimizer over the vector and lets torch create the state, which is
    then copied into the swapped vectors; later steps hand torch the swapped vectors as the state and copy
    back any state torch replaced rather than updated in place."""

    def __init__(self, cls: type[torch.optim.Optimizer], defaults: Mapping[str, Any], states: tuple[str, ...],
                 counts_steps: bool):
        self.cls, self.defaults, self.states = cls, dict(defaults), states
        self.counts_steps = counts_steps  # the state holds a "step" tensor (SGD's does not)
        self.name = cls.__name__

    def update(self, master: torch.Tensor, grad: torch.Tensor, states: dict[str, torch.Tensor],
               step: torch.Tensor, group: Group) -> None:
        param = master.detach()
        param.grad = grad
        opt = self.cls([param], **{k: group[k] for k in self.defaults if k in group})
        first = float(step) == 0
        if not first:
            opt.state[param] = {**states, **({"step": step} if self.counts_steps else {})}
        opt.step()
        state = opt.state[param]
        for name in self.states:
            if state[name].data_ptr() != states[name].data_ptr():
                states[name].copy_(state[name])
        if not self.counts_steps or first:
            step.add_(1)
        param.grad = None


def probe(cls: type[torch.optim.Optimizer], defaults: Mapping[str, Any]) -> TorchRule:
    """A TorchRule for cls with these hyperparameters, or a UsageError saying why its state cannot be swapped
    as flat vectors: it runs cls for three steps on a 2 x 3 parameter and on the same values as one flat
    vector and as two halves, which must agree (an element-wise update), and looks at the state it made."""
    torch_state, results = None, []
    for shapes in (((2, 3),), ((6,),), ((3,), (3,))):
        gen = torch.Generator().manual_seed(0)
        values = torch.randn(6, generator=gen)
        grads = [torch.randn(6, generator=gen) for _ in range(3)]
        params, start = [], 0
        for shape in shapes:
            n = torch.Size(shape).numel()
            params.append(values[start:start + n].clone().reshape(shape))
            start += n
        try:
            opt = cls(params, **defaults)
            for g in grads:
                start = 0
                for p in params:
                    p.grad = g[start:start + p.numel()].clone().reshape(p.shape)
                    start += p.numel()
                opt.step()
        except Exception as err:  # the class's own refusal (a closure needed, sparse gradients only, ...)
            raise _refused(cls, f"its step() failed on a plain parameter ({type(err).__name__}: {err})") from None
        results.append(torch.cat([p.reshape(-1) for p in params]))
        if torch_state is None:
            torch_state = opt.state[params[0]]
    if not all(torch.allclose(r, results[0], rtol=1e-6, atol=1e-7) for r in results[1:]):
        raise _refused(cls, "its update is not element-wise (it depends on the parameter's shape or on other "
                       "elements, as norms or factored moments do), and infinity updates flat vectors of many "
                       "parameters")
    return TorchRule(cls, defaults, *_swapped_states(cls, torch_state or {}))


def _swapped_states(cls: type, state: Mapping[str, Any]) -> tuple[tuple[str, ...], bool]:
    names = []
    for name, value in state.items():
        if name == "step" and (not isinstance(value, torch.Tensor) or value.dim() == 0):
            continue
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.shape != (2, 3) or not value.is_floating_point():
            what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise _refused(cls, f"its state {name!r} is {what}, not a floating-point tensor shaped like the "
                           "parameter, which is all infinity can swap")
        names.append(name)
    return tuple(names), "step" in state


def _refused(cls: type, reason: str) -> UsageError:
    return UsageError(f"initialize(optimizer=...): infinity cannot run {cls.__name__} over offloaded states: "
                      f"{reason}; use an element-wise optimizer (AdamW, Adam, SGD, Adagrad, RMSprop, Lion in the "
                      f"config's optimizer block, ...)")
