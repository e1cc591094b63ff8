"""infinity.initialize and infinity.zero.Init, driven by DeepSpeed-style configs, against plain PyTorch."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

import infinity
from infinity.errors import ConfigError, UsageError
from infinity.models.gpt import Gpt
from infinity.zero.init import placed

from test_training import assert_same_weights, final_weights, train
from training_reference import ADAM, SPEC, fresh_model, make_batches, plain_torch_run, train_with_schedule


@pytest.fixture(scope="module")
def batches():
    return make_batches()


def config(path, param_device="nvme", optimizer_device="nvme", **top):
    zero = {"stage": 3, "sub_group_size": 20_000, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": param_device, "nvme_path": str(path),
                              **({"max_in_cpu": 0} if param_device == "nvme" else {})},
            "offload_optimizer": {"device": optimizer_device, "nvme_path": str(path), "buffer_count": 4}}
    adamw = {"type": "AdamW", "params": {"lr": ADAM.lr, "betas": list(ADAM.betas), "eps": ADAM.eps,
                                         "weight_decay": ADAM.weight_decay}}
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "zero_optimization": zero,
            "optimizer": adamw, **top}


def close_to(got, want, rel=1e-5):
    return all(abs(a - b) <= rel * abs(b) for a, b in zip(got, want))


def test_initialize_returns_deepspeeds_four_and_matches_plain_pytorch(tmp_path, batches):
    want_losses, want_weights = plain_torch_run(batches)
    model = fresh_model()
    engine, optimizer, loader, scheduler = infinity.initialize(model=model, model_parameters=model.parameters(),
                                                               config=config(tmp_path))
    try:
        assert loader is None and scheduler is None
        assert optimizer.param_groups[0]["lr"] == ADAM.lr and engine.train_micro_batch_size_per_gpu() == 4
        losses = train(engine, batches)
        weights = final_weights(engine)
    finally:
        engine.close()
    assert close_to(losses, want_losses)
    assert_same_weights(weights, want_weights, len(batches))


def deepspeed_warmup_lr(step: int, low: float, high: float, steps: int) -> float:
    """DeepSpeed's WarmupLR with log warm-up, written out from its documentation."""
    if step >= steps:
        return high
    return low + (high - low) * math.log(step + 1) / math.log(steps)


def test_warmup_lr_scheduler_matches_a_plain_run_with_the_same_lrs(tmp_path, batches):
    low, high, steps = 1e-4, 2e-3, 8
    # DeepSpeed spends the first value twice: optimizer step k uses the schedule's value at k - 1 (-1: warmup_min_lr)
    lrs = [deepspeed_warmup_lr(max(k - 1, 0), low, high, steps) for k in range(len(batches))]
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lrs[0], betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    want = []
    for lr, (x, y) in zip(lrs, batches):
        for group in opt.param_groups:
            group["lr"] = lr
        loss = model(x, y)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    cfg = config(tmp_path, scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": low, "warmup_max_lr": high,
                                                                    "warmup_num_steps": steps}})
    engine, _, _, scheduler = infinity.initialize(model=fresh_model(), config=cfg)
    try:
        seen, losses = train_with_schedule(engine, scheduler, batches)
    finally:
        engine.close()
    assert seen == pytest.approx(lrs, rel=1e-12)
    assert close_to(losses, want)
    assert scheduler.last_batch_iteration == len(batches) - 1


def test_adam_without_decoupled_decay_matches_torch_adam(tmp_path, batches):
    model = fresh_model()
    opt = torch.optim.Adam(model.parameters(), lr=ADAM.lr, weight_decay=0.1)
    want = []
    for x, y in batches[:8]:
        loss = model(x, y)
        loss.backward()
        want.append(loss.item())
        opt.step()
        opt.zero_grad()
    cfg = config(tmp_path, gradient_clipping=0.0,
                 optimizer={"type": "Adam", "params": {"lr": ADAM.lr, "weight_decay": 0.1, "adam_w_mode": False}})
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    try:
        losses = train(engine, batches[:8])
    finally:
        engine.close()
    assert close_to(losses, want)


def test_zero_init_writes_the_values_a_plain_build_makes(tmp_path):
    plain = fresh_model()
    cfg = config(tmp_path)
    torch.manual_seed(0)
    with infinity.zero.Init(config=cfg):
        model = Gpt(SPEC)
    assert all(p.data.numel() == 0 and placed(p) is not None for p in model.parameters())  # nothing left in RAM
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        got = final_weights(engine)
    finally:
        engine.close()
    for name, p in plain.named_parameters():
        assert torch.equal(got[name], p.detach()), name


def test_zero_init_leaves_parameters_under_the_persistence_threshold_resident(tmp_path, batches):
    want_losses, want_weights = plain_torch_run(batches)
    threshold = 2 * SPEC.hidden  # layer norms and most biases stay; the matrices go to NVMe
    cfg = config(tmp_path)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    torch.manual_seed(0)
    with infinity.zero.Init(config=cfg):
        model = Gpt(SPEC)
    small = {n for n, p in model.named_parameters() if placed(p) is None}
    assert small and all(p.numel() <= threshold and p.numel() > 0 for n, p in model.named_parameters() if n in small)
    assert all(p.data.numel() == 0 for n, p in model.named_parameters() if n not in small)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        assert {engine.run.names[i] for i in engine.run.offloaded} == {n for n, _ in model.named_parameters()} - small
        losses = train(engine, batches)
        weights = final_weights(engine)
    finally:
        engine.close()
    assert close_to(losses, want_losses)
    assert_same_weights(weights, want_weights, len(batches))


def test_zero_init_that_places_nothing_leaves_no_swap_store_behind(tmp_path, batches):
    cfg = config(tmp_path)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 10 ** 9  # everything stays resident
    torch.manual_seed(0)
    with infinity.zero.Init(config=cfg):
        model = Gpt(SPEC)
    assert all(placed(p) is None for p in model.parameters())
    assert not list(tmp_path.glob("infinity-swap/rank-0/run-*"))
    engine, *_ = infinity.initialize(model=model, config=cfg)  # opens its own store in the same folder
    try:
        train(engine, batches[:1])
    finally:
        engine.close()


def test_zero_init_model_trains_like_plain_pytorch(tmp_path, batches):
    want_losses, want_weights = plain_torch_run(batches)
    cfg = config(tmp_path)
    torch.manual_seed(0)
    with infinity.zero.Init(config=cfg):
        model = Gpt(SPEC)
    engine, *_ = infinity.initialize(model=model, config=cfg)
    try:
        home = next(h for i, h in enumerate(engine.run.homes) if i in engine.run.offloaded)
        # zero.Init's partitions moved into their master ranges ([Note: a partition inside another]), and the
        # blocks of the file zero.Init wrote them to went back to the drive (holes punched; the size stays)
        assert all(home.manager.base_of(home.key(i)) is not None for i in engine.run.offloaded)
        written = os.stat(home.manager.store.folder / "param.swp")
        assert written.st_size > 500_000 and written.st_blocks * 512 <= written.st_size // 100
        losses = train(engine, batches)
        weights = final_weights(engine)
    finally:
        engine.close()
    assert close_to(losses, want_losses)
    assert_same_weights(weights, want_weights, len(batches))


def test_zero_init_keeps_parents_reinitialising_their_children(tmp_path):
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.child = nn.Linear(8, 8)
            nn.init.constant_(self.child.weight, 3.0)  # after the child's constructor returned

    with infinity.zero.Init(config=config(tmp_path)):
        model = Parent()
    engine, *_ = infinity.initialize(model=model, config=config(tmp_path))
    try:
        assert torch.equal(final_weights(engine)["child.weight"], torch.full((8, 8), 3.0))
    finally:
        engine.close()


def test_zero_init_removes_its_swap_files_when_the_build_fails(tmp_path):
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        with infinity.zero.Init(config=config(tmp_path)):
            Broken()
    assert not any((tmp_path / "infinity-swap" / "rank-0").iterdir())
    assert nn.Linear.__init__ is nn.Linear.__dict__["__init__"] and not hasattr(nn.Linear.__init__, "_infinity_wrapped")


def test_zero_init_and_initialize_must_agree(tmp_path):
    with infinity.zero.Init(config=config(tmp_path)):
        model = fresh_model()
    with pytest.raises(UsageError, match="same config"):
        infinity.initialize(model=model, config=config(tmp_path, param_device="cpu"))


def test_pending_auto_names_every_key_and_the_fix(tmp_path):
    cfg = config(tmp_path, gradient_clipping="auto")
    cfg["optimizer"]["params"]["lr"] = "auto"
    with pytest.raises(ConfigError) as err:
        infinity.initialize(model=fresh_model(), config=cfg)
    assert "gradient_clipping" in str(err.value) and "optimizer.params.lr" in str(err.value)
    assert "TrainingArgs" in str(err.value)
    engine, optimizer, *_ = infinity.initialize(
        model=fresh_model(), config=cfg, training_args=infinity.TrainingArgs(learning_rate=2e-4, max_grad_norm=0.5))
    try:
        assert optimizer.param_groups[0]["lr"] == 2e-4 and engine.settings.gradient_clipping == 0.5
    finally:
        engine.close()


def test_no_optimizer_block_is_a_config_error(tmp_path):
    cfg = config(tmp_path)
    del cfg["optimizer"]
    with pytest.raises(ConfigError, match='"type": "AdamW"'):
        infinity.initialize(model=fresh_model(), config=cfg)


@pytest.mark.parametrize("keyword", ["optimizer", "lr_scheduler"])
def test_a_client_object_that_is_no_optimizer_or_scheduler_is_refused(tmp_path, keyword):
    with pytest.raises(UsageError, match=f"initialize\\({keyword}=...\\): got object"):
        infinity.initialize(model=fresh_model(), config=config(tmp_path), **{keyword: object()})


def test_model_parameters_must_cover_what_requires_grad(tmp_path):
    model = fresh_model()
    with pytest.raises(UsageError, match="requires_grad=False"):
        infinity.initialize(model=model, model_parameters=list(model.parameters())[:3], config=config(tmp_path))


def test_a_missing_optimizer_folder_is_named_by_its_own_key(tmp_path):
    from infinity.errors import NvmePathError

    cfg = config(tmp_path, param_device="cpu")
    missing = tmp_path / "no-such-folder"
    cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] = str(missing)
    with pytest.raises(NvmePathError) as caught:
        infinity.initialize(model=fresh_model(), config=cfg)
    message = str(caught.value)
    assert "zero_optimization.offload_optimizer.nvme_path" in message and str(missing) in message
    assert f"mkdir -p {missing}" in message and not missing.exists()


def test_zero_init_writes_in_chunks_left_in_flight_read_back_bit_for_bit(tmp_path):
    """[Note: writes left in flight] in zero/init.py: parameters split into chunks of a quarter of the largest so
    far (a last chunk shorter than a block), a larger one replacing the write buffers midway, a rewrite of a
    parameter whose writes may still be in flight, and GatheredParameters reading them all back."""
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(1000, 37), nn.Linear(37, 3001), nn.Embedding(11, 5), nn.Linear(3001, 2))

    plain = build()
    with infinity.zero.Init(config=config(tmp_path)):
        model = build()
        with torch.no_grad():
            model[2].weight.fill_(0.5)  # read back whole and written again, inside the context
            plain[2].weight.fill_(0.5)
    assert all(p.data.numel() == 0 and placed(p) is not None for p in model.parameters())
    run = placed(model[0].weight).run
    try:
        for (name, p), want in zip(model.named_parameters(), plain.parameters()):
            with infinity.zero.GatheredParameters(p):
                assert torch.equal(p.data, want.detach()), name
    finally:
        run.close()
