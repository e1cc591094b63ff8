"""load_checkpoint imports a DeepSpeed ZeRO-3 save: a folder written here in DeepSpeed's layout (as
checkpoint/deepspeed.py documents it, from a plain torch AdamW run at step 5, partitioned over 2 and 3
ranks), resumed in infinity with parameters and optimizer on NVMe, trains steps 6-10 as torch goes on.
No DeepSpeed needed (benchmarks/deepspeed_resume.py compares against DeepSpeed itself)."""
from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch
from torch import nn

import infinity
from infinity.errors import CheckpointError

LR, WD = 1e-3, 0.01


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x, y):
        return nn.functional.mse_loss(self.body(x), y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(10)]


def torch_run():
    """Steps 1-5, the state at step 5, then steps 6-10's losses and the final weights."""
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD)
    losses, at_five = [], None
    for i, (x, y) in enumerate(batches()):
        if i == 5:
            at_five = ({n: p.detach().clone() for n, p in m.named_parameters()},
                       {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in m.named_parameters()})
        loss = m(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return at_five, losses[5:], {n: p.detach().clone() for n, p in m.named_parameters()}


def write_deepspeed(folder, world, params, states, global_steps=5, lr_scheduler=None, lr=LR, loss_scaler=None,
                    frozen=None):
    """DeepSpeed's ZeRO-3 files for `world` ranks (zero_to_fp32's layout: each parameter takes
    ceil(numel / world) elements of every rank's flat vector; two sub-groups per rank)."""
    tag = folder / f"global_step{global_steps}"
    tag.mkdir(parents=True)
    (folder / "latest").write_text(f"global_step{global_steps}")
    shapes = OrderedDict((n, p.shape) for n, p in params.items())
    for r in range(world):
        flat = {k: [] for k in ("master", "exp_avg", "exp_avg_sq")}
        for n, p in params.items():
            piece = -(-p.numel() // world)
            for k, values in (("master", p), ("exp_avg", states[n]["exp_avg"]), ("exp_avg_sq", states[n]["exp_avg_sq"])):
                whole = torch.cat([values.reshape(-1), torch.zeros(piece * world - p.numel())])
                flat[k].append(whole[r * piece:(r + 1) * piece])
        cut = 2  # sub-group 0: the first two parameters' pieces, sub-group 1: the rest
        groups = {k: [torch.cat(v[:cut]), torch.cat(v[cut:])] for k, v in flat.items()}
        inner = {"state": {g: {"step": torch.tensor(float(global_steps)), "exp_avg": groups["exp_avg"][g],
                               "exp_avg_sq": groups["exp_avg_sq"][g]} for g in range(2)},
                 "param_groups": [{"lr": lr, "weight_decay": WD, "params": [0, 1]}]}
        torch.save({"optimizer_state_dict": {"zero_stage": 3, "loss_scaler": loss_scaler or {"cur_scale": 1.0},
                                             "partition_count": world,
                                             "fp32_flat_groups": groups["master"], "optimizer_state_dict": inner},
                    "ds_config": {}, "ds_version": "0.19.8"},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        frozen = frozen or {}
        fragments = {n: torch.cat([v.reshape(-1), torch.zeros(-(-v.numel() // world) * world - v.numel())]
                                  ).chunk(world)[r].clone() for n, v in frozen.items()}
        torch.save({"module": {n: torch.empty(0) for n in params}, "param_shapes": [shapes], "buffer_names": [],
                    "frozen_param_shapes": OrderedDict((n, v.shape) for n, v in frozen.items()),
                    "frozen_param_fragments": fragments,
                    "global_steps": global_steps, "global_samples": global_steps * 8, "skipped_steps": 0,
                    "lr_scheduler": lr_scheduler, "ds_config": {}, "ds_version": "0.19.8", "epoch": 2},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")


def config(path):
    zero = {"stage": 3, "sub_group_size": 500, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": str(path)},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(path)}}
    return {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.0, "zero_optimization": zero,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD}}}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_deepspeed_save_resumes_as_torch_goes_on(tmp_path, world):
    (params, states), want_losses, want_weights = torch_run()
    write_deepspeed(tmp_path / "ds", world, params, states)
    (tmp_path / "swap").mkdir()
    engine, _, _, _ = infinity.initialize(model=model(), config=config(tmp_path / "swap"))
    try:
        folder, client_state = engine.load_checkpoint(str(tmp_path / "ds"))
        assert folder.endswith("global_step5") and client_state == {"epoch": 2}
        assert engine.global_steps == 5 and engine.global_samples == 40 and not (tmp_path / "ds" / ".infinity-import").exists()
        losses = []
        for x, y in batches()[5:]:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        weights = engine.parameter_values()
    finally:
        engine.close()
    assert losses == pytest.approx(want_losses, rel=1e-6)
    for name, w in want_weights.items():
        assert float((weights[name] - w).norm() / w.norm()) <= 1e-6, name


def test_a_deepspeed_save_of_another_model_is_refused_naming_the_parameters(tmp_path):
    (params, states), _, _ = torch_run()
    params = {f"other.{n}": p for n, p in params.items()}
    states = {f"other.{n}": s for n, s in states.items()}
    write_deepspeed(tmp_path / "ds", 2, params, states)
    (tmp_path / "swap").mkdir()
    engine, _, _, _ = infinity.initialize(model=model(), config=config(tmp_path / "swap"))
    try:
        with pytest.raises(CheckpointError, match="other trained parameters than this model"):
            engine.load_checkpoint(str(tmp_path / "ds"))
    finally:
        engine.close()


def test_a_deepspeed_file_naming_other_globals_is_not_unpickled(tmp_path):
    import os

    (params, states), _, _ = torch_run()
    write_deepspeed(tmp_path / "ds", 1, params, states)
    torch.save({"param_shapes": [], "hook": os.getcwd},  # a global outside torch, the containers and DeepSpeed
               tmp_path / "ds" / "global_step5" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (tmp_path / "swap").mkdir()
    engine, _, _, _ = infinity.initialize(model=model(), config=config(tmp_path / "swap"))
    try:
        with pytest.raises(CheckpointError, match="getcwd is not read from a DeepSpeed checkpoint"):
            engine.load_checkpoint(str(tmp_path / "ds"))
    finally:
        engine.close()


def test_a_client_scheduler_gets_the_state_deepspeed_saved_of_it(tmp_path):
    (params, states), _, _ = torch_run()
    m = model()
    client = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD)
    scheduler = torch.optim.lr_scheduler.StepLR(client, step_size=2, gamma=0.5)
    reference = torch.optim.lr_scheduler.StepLR(torch.optim.AdamW(model().parameters(), lr=LR), step_size=2, gamma=0.5)
    for _ in range(5):
        reference.optimizer.step()
        reference.step()
    write_deepspeed(tmp_path / "ds", 2, params, states, lr_scheduler=reference.state_dict(),
                    lr=reference.get_last_lr()[0])
    (tmp_path / "swap").mkdir()
    engine, optimizer, _, returned = infinity.initialize(model=m, optimizer=client, lr_scheduler=scheduler,
                                                         config=config(tmp_path / "swap"))
    try:
        engine.load_checkpoint(str(tmp_path / "ds"))
        assert returned.last_epoch == 5 and returned.get_last_lr() == reference.get_last_lr()
        assert optimizer.param_groups[0]["lr"] == reference.get_last_lr()[0] == LR / 4  # DeepSpeed's optimizer's
    finally:
        engine.close()


@pytest.mark.parametrize("keyword", ["load_optimizer_states", "load_module_only"])
def test_a_deepspeed_save_loads_without_its_optimizer_states(tmp_path, keyword):
    """DeepSpeed's keywords on the import: the weights are DeepSpeed's fp32 masters, bit for bit; the optimizer
    is fresh (the next steps are a new torch AdamW's from those weights); the counters are DeepSpeed's, or
    with load_module_only the engine's own."""
    (params, states), _, _ = torch_run()
    write_deepspeed(tmp_path / "ds", 2, params, states)
    (tmp_path / "swap").mkdir()
    engine, _, _, _ = infinity.initialize(model=model(), config=config(tmp_path / "swap"))
    try:
        kw = {"load_optimizer_states": False} if keyword == "load_optimizer_states" else {"load_module_only": True}
        folder, client_state = engine.load_checkpoint(str(tmp_path / "ds"), **kw)
        assert folder.endswith("global_step5") and client_state == {"epoch": 2}
        assert engine.global_steps == (5 if keyword == "load_optimizer_states" else 0)
        loaded = engine.parameter_values()
        assert all(torch.equal(loaded[n], params[n]) for n in params)
        for x, y in batches()[5:7]:
            engine.backward(engine(x, y))
            engine.step()
        got = engine.parameter_values()
    finally:
        engine.close()
    m = model()
    m.load_state_dict(params)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD)
    for x, y in batches()[5:7]:
        m(x, y).backward()
        opt.step()
        opt.zero_grad()
    for name, p in m.named_parameters():
        assert torch.allclose(got[name], p.detach(), rtol=0, atol=1e-5), name


def test_an_fp16_engine_takes_deepspeeds_dynamic_loss_scale(tmp_path, monkeypatch):
    """DeepSpeed pickles its DynamicLossScaler object; the import reads it as an inert stand-in and gives the
    engine its scale, hysteresis and good steps since the last overflow (cur_iter - last_overflow_iter - 1)."""
    module = types.ModuleType("deepspeed.runtime.fp16.loss_scaler")  # the class DeepSpeed's file names
    scaler_class = type("DynamicLossScaler", (), {"__module__": module.__name__})
    module.DynamicLossScaler = scaler_class
    for parent in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16"):  # pickle imports the module
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    saved = scaler_class()
    saved.__dict__.update(cur_scale=2.0 ** 12, cur_iter=5, last_overflow_iter=1, cur_hysteresis=1, scale_window=3,
                          delayed_shift=2, min_scale=1.0, consecutive_hysteresis=False, dynamic=True)
    (params, states), _, _ = torch_run()
    write_deepspeed(tmp_path / "ds", 2, params, states, loss_scaler=saved)
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.fp16", module.__name__):
        monkeypatch.delitem(sys.modules, name)  # the reader needs no DeepSpeed
    (tmp_path / "swap").mkdir()
    cfg = {**config(tmp_path / "swap"), "fp16": {"enabled": True, "loss_scale_window": 3}}
    engine, _, _, _ = infinity.initialize(model=model(), config=cfg)
    try:
        engine.load_checkpoint(str(tmp_path / "ds"))
        assert engine.scaler.state_dict() == {"scale": 4096.0, "good_steps": 3, "hysteresis": 1, "skipped_steps": 0}
        x, y = batches()[5]
        engine.backward(engine(x.half(), y.half()))
        engine.step()  # a fourth good step after a run of 3 = the window: the scale doubles, as DeepSpeed's would
        assert engine.scaler.scale == 8192.0
    finally:
        engine.close()


def test_a_bf16_or_static_deepspeed_scaler_leaves_the_engines_own(tmp_path):
    (params, states), _, _ = torch_run()
    write_deepspeed(tmp_path / "ds", 1, params, states)  # {"cur_scale": 1.0}: DeepSpeed's static scaler
    (tmp_path / "swap").mkdir()
    engine, _, _, _ = infinity.initialize(model=model(), config={**config(tmp_path / "swap"), "fp16": {"enabled": True}})
    try:
        engine.load_checkpoint(str(tmp_path / "ds"))
        assert engine.scaler.state_dict() == {"scale": 65536.0, "good_steps": 0, "hysteresis": 2, "skipped_steps": 0}
    finally:
        engine.close()


@pytest.mark.parametrize("world", [1, 3])
def test_frozen_parameters_take_the_values_deepspeed_saved_of_them(tmp_path, world):
    """DeepSpeed keeps frozen parameters out of param_shapes and its optimizer: each rank's model states hold
    its fragment of each (frozen_param_fragments, as zero_to_fp32.py merges them)."""
    (params, states), _, _ = torch_run()
    frozen = {n: torch.full_like(params.pop(n), 0.25 + i) for i, n in enumerate(["body.1.weight", "body.1.bias"])}
    for n in frozen:
        states.pop(n)
    write_deepspeed(tmp_path / "ds", world, params, states, frozen=frozen)
    (tmp_path / "swap").mkdir()
    net = model()
    net.body[1].requires_grad_(False)
    engine, _, _, _ = infinity.initialize(model=net, config=config(tmp_path / "swap"))
    try:
        engine.load_checkpoint(str(tmp_path / "ds"))
        loaded = engine.parameter_values()
        assert all(torch.equal(loaded[n], v) for n, v in {**params, **frozen}.items())
    finally:
        engine.close()


def test_a_rank_without_its_fragment_of_a_frozen_parameter_is_named(tmp_path):
    (params, states), _, _ = torch_run()
    frozen = {n: params.pop(n) for n in ["body.1.weight", "body.1.bias"]}
    for n in frozen:
        states.pop(n)
    write_deepspeed(tmp_path / "ds", 2, params, states, frozen=frozen)
    path = tmp_path / "ds" / "global_step5" / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    saved = torch.load(path, weights_only=False)
    del saved["frozen_param_fragments"]["body.1.bias"]
    torch.save(saved, path)
    (tmp_path / "swap").mkdir()
    net = model()
    net.body[1].requires_grad_(False)
    engine, _, _, _ = infinity.initialize(model=net, config=config(tmp_path / "swap"))
    try:
        with pytest.raises(CheckpointError, match="'body.1.bias' but rank 1's model states hold no fragment"):
            engine.load_checkpoint(str(tmp_path / "ds"))
    finally:
        engine.close()
