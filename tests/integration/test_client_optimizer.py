"""Parameter groups, client optimizers (instances and classes), Lion, and client LR schedulers through
infinity.initialize with the optimizer's states on NVMe, against the same torch optimizer on a plain model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import infinity
from infinity.errors import CheckpointError, UsageError

STEPS = 10


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 4)

    def forward(self, x, y):
        return nn.functional.mse_loss(self.out(torch.relu(self.norm(self.inp(x)))), y)


def fresh() -> Mlp:
    torch.manual_seed(0)
    model = Mlp()
    with torch.no_grad():  # LayerNorm starts at ones and zeros: give its parameters values to decay
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(STEPS)]


def config(path, optimizer=None, nvme_params=True, **top):
    zero = {"stage": 3, "sub_group_size": 600, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": str(path)} if nvme_params else {"device": "none"},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(path), "buffer_count": 4}}
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0, "zero_optimization": zero, **top}
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    return cfg


def no_decay_groups(model: nn.Module, decay: float = 0.1) -> list[dict]:
    """Transformers' recipe: no weight decay on biases and norms."""
    plain = [p for n, p in model.named_parameters() if n.endswith("bias") or n.startswith("norm")]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("bias") or n.startswith("norm"))]
    return [{"params": rest, "weight_decay": decay}, {"params": plain, "weight_decay": 0.0, "lr": 2e-3}]


def torch_run(model, opt, scheduler=None):
    losses, lrs = [], []
    for x, y in batches():
        lrs.append([g["lr"] for g in opt.param_groups])
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses, lrs, {n: p.detach().clone() for n, p in model.named_parameters()}


def infinity_run(engine, optimizer):
    losses, lrs = [], []
    try:
        for x, y in batches():
            lrs.append([g["lr"] for g in optimizer.param_groups])
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        return losses, lrs, engine.parameter_values()
    finally:
        engine.close()


def assert_equal_runs(got, want, rel=1e-5):
    (losses, lrs, weights), (want_losses, want_lrs, want_weights) = got, want
    assert [lr for step in lrs for lr in step] == pytest.approx([lr for step in want_lrs for lr in step], rel=1e-12)
    assert losses == pytest.approx(want_losses, rel=rel)
    for name, w in want_weights.items():
        assert float((weights[name] - w).norm() / w.norm()) <= rel, name


def test_parameter_groups_without_decay_on_biases_and_norms_equal_torch_adamw(tmp_path):
    model = fresh()
    want = torch_run(model, torch.optim.AdamW(no_decay_groups(model), lr=1e-3))
    model = fresh()
    adamw = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}
    engine, optimizer, _, _ = infinity.initialize(model=model, model_parameters=no_decay_groups(model),
                                                  config=config(tmp_path, adamw))
    groups = engine.run.groups
    assert len({g.param_group for g in groups}) == 2 and len(groups) <= 4  # packed by group, not one per parameter
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert_equal_runs(infinity_run(engine, optimizer), want)


CLIENTS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd-nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05, lr_decay=0.01, weight_decay=0.01,
                                                  initial_accumulator_value=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1),
    "adam-amsgrad": lambda params: torch.optim.Adam(params, lr=1e-3, amsgrad=True),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_a_client_optimizer_instance_equals_itself_on_a_plain_model(tmp_path, name):
    make = CLIENTS[name]
    model = fresh()
    want = torch_run(model, make(no_decay_groups(model)))
    model = fresh()
    engine, optimizer, _, _ = infinity.initialize(model=model, optimizer=make(no_decay_groups(model)),
                                                  config=config(tmp_path))
    assert_equal_runs(infinity_run(engine, optimizer), want)


def test_a_client_optimizer_class_is_called_with_model_parameters(tmp_path):
    model = fresh()
    want = torch_run(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    model = fresh()
    engine, optimizer, _, _ = infinity.initialize(model=model, model_parameters=model.parameters(),
                                                  optimizer=torch.optim.SGD, config=config(tmp_path))
    assert_equal_runs(infinity_run(engine, optimizer), want)


def lion_step(params, states, lr, betas, wd):
    """DeepSpeed's CPU Lion (deepspeed/ops/csrc/lion/cpu_lion_impl.cpp), written out element by element."""
    with torch.no_grad():
        for p in params:
            m = states.setdefault(p, torch.zeros_like(p))
            c = betas[0] * m + (1 - betas[0]) * p.grad
            p.mul_(1 - lr * wd).add_(-torch.copysign(torch.full_like(c, lr), c))
            m.mul_(betas[1]).add_(p.grad, alpha=1 - betas[1])
            p.grad = None


def test_lion_in_the_config_equals_deepspeeds_cpu_lion_update(tmp_path):
    lion = {"type": "Lion", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.1}}
    model, states, want_losses = fresh(), {}, []
    for x, y in batches():
        loss = model(x, y)
        loss.backward()
        lion_step(list(model.parameters()), states, 1e-3, (0.9, 0.99), 0.1)
        want_losses.append(loss.item())
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, optimizer, _, _ = infinity.initialize(model=fresh(), config=config(tmp_path, lion))
    losses, _, weights = infinity_run(engine, optimizer)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    for name, w in want.items():
        assert float((weights[name] - w).norm() / w.norm()) <= 1e-5, name


def test_adagrad_in_the_config_equals_torch_adagrad(tmp_path):
    model = fresh()
    want = torch_run(model, torch.optim.Adagrad(model.parameters(), lr=0.05, eps=1e-8, weight_decay=0.01))
    adagrad = {"type": "Adagrad", "params": {"lr": 0.05, "eps": 1e-8, "weight_decay": 0.01}}
    engine, optimizer, _, _ = infinity.initialize(model=fresh(), config=config(tmp_path, adagrad))
    assert_equal_runs(infinity_run(engine, optimizer), want)


SCHEDULERS = {
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
}


@pytest.mark.parametrize("how", ["instance", "callable"])
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_client_scheduler_gives_torchs_lr_sequence(tmp_path, name, how):
    make = SCHEDULERS[name]
    model = fresh()
    opt = torch.optim.AdamW(no_decay_groups(model), lr=1e-3)
    torch_scheduler = make(opt)
    want = torch_run(model, opt, torch_scheduler)
    model = fresh()
    client = torch.optim.AdamW(no_decay_groups(model), lr=1e-3)
    scheduler = make(client) if how == "instance" else make
    engine, optimizer, _, returned = infinity.initialize(model=model, optimizer=client, lr_scheduler=scheduler,
                                                         config=config(tmp_path))
    assert isinstance(returned, torch.optim.lr_scheduler.LRScheduler)
    assert_equal_runs(infinity_run(engine, optimizer), want)
    assert returned.get_last_lr() == pytest.approx(torch_scheduler.get_last_lr(), rel=1e-12)


def test_a_scheduler_over_another_optimizer_is_refused(tmp_path):
    model = fresh()
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="drives an optimizer infinity was not given"):
        infinity.initialize(model=model, lr_scheduler=torch.optim.lr_scheduler.StepLR(other, 2),
                            config=config(tmp_path, {"type": "AdamW"}))


@pytest.mark.parametrize("make,reason", [
    (lambda ps: torch.optim.LBFGS(ps), "step\\(\\) failed"),
    (lambda ps: torch.optim.SparseAdam(ps), "step\\(\\) failed"),
    (lambda ps: torch.optim.Adafactor(ps), "not element-wise"),
])
def test_an_optimizer_whose_state_cannot_be_swapped_is_refused_with_the_reason(tmp_path, make, reason):
    model = fresh()
    with pytest.raises(UsageError, match=reason):
        infinity.initialize(model=model, optimizer=make(model.parameters()), config=config(tmp_path))


def test_checkpoints_keep_the_groups(tmp_path):
    for run in "abc":
        (tmp_path / run).mkdir()
    model = fresh()
    engine, optimizer, _, _ = infinity.initialize(model=model, optimizer=torch.optim.SGD(
        no_decay_groups(model), lr=0.05, momentum=0.9), config=config(tmp_path / "a"))
    try:
        for x, y in batches()[:3]:
            engine.backward(engine(x, y))
            engine.step()
        optimizer.param_groups[1]["lr"] = 0.01
        engine.save_checkpoint(str(tmp_path / "ckpt"))
        saved = engine.parameter_values()
    finally:
        engine.close()
    model = fresh()
    engine, optimizer, _, _ = infinity.initialize(model=model, optimizer=torch.optim.SGD(
        no_decay_groups(model), lr=0.05, momentum=0.9), config=config(tmp_path / "b"))
    try:
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.01]
        assert all(torch.equal(engine.parameter_values()[n], v) for n, v in saved.items())
    finally:
        engine.close()
    model = fresh()
    engine, _, _, _ = infinity.initialize(model=model, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9), config=config(tmp_path / "c"))
    try:
        with pytest.raises(CheckpointError, match="parameter groups"):
            engine.load_checkpoint(str(tmp_path / "ckpt"))
    finally:
        engine.close()


def test_a_client_scheduler_resumes_from_a_checkpoint_where_it_was(tmp_path):
    model = fresh()
    opt = torch.optim.AdamW(no_decay_groups(model), lr=1e-3)
    want = torch_run(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    def start(path):
        model = fresh()
        client = torch.optim.AdamW(no_decay_groups(model), lr=1e-3)
        return infinity.initialize(model=model, optimizer=client, config=config(path),
                                   lr_scheduler=torch.optim.lr_scheduler.StepLR(client, step_size=3, gamma=0.5))

    engine, optimizer, _, _ = start(tmp_path / "a")
    try:
        for x, y in batches()[:4]:
            engine.backward(engine(x, y))
            engine.step()
        engine.save_checkpoint(str(tmp_path / "ckpt"))
    finally:
        engine.close()
    engine, optimizer, _, scheduler = start(tmp_path / "b")
    engine.load_checkpoint(str(tmp_path / "ckpt"))
    assert scheduler.last_epoch == 4
    losses, lrs = [], []
    try:
        for x, y in batches()[4:]:
            lrs.append([g["lr"] for g in optimizer.param_groups])
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    finally:
        engine.close()
    assert lrs == want[1][4:]
    assert losses == pytest.approx(want[0][4:], rel=1e-5)


def test_a_client_optimizer_with_its_states_in_host_memory(tmp_path):
    make = CLIENTS["sgd-momentum"]
    model = fresh()
    want = torch_run(model, make(no_decay_groups(model)))
    model = fresh()
    cfg = config(tmp_path, nvme_params=False)
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    engine, optimizer, _, _ = infinity.initialize(model=model, optimizer=make(no_decay_groups(model)), config=cfg)
    assert_equal_runs(infinity_run(engine, optimizer), want)
