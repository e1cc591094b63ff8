"""Bytes per parameter per step (issue 18): the step report's, infinity-train's and the metric's figures
are the step's NVMe bytes over the parameters this rank trains, on a small fp32 MLP with parameters and
optimizer states on NVMe."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from infinity import metrics
from infinity.cli.train import describe
from infinity.config.training import Precision
from infinity.swap.optimizer import AdamSettings
from infinity.swap.params import Tier
from infinity.train import StepStats
from infinity.zero import Engine, EngineSettings

WIDTH, LAYERS = 256, 4  # no biases: every parameter is a whole number of 4 KiB blocks, so the bytes are exact


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU())])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x), y)


def mlp_engine(tmp_path, sub_group_size: int = 2 * WIDTH * WIDTH, optimizer_path=None,
               precision: Precision = Precision.FP32) -> Engine:
    settings = EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(tmp_path),
                              optimizer_nvme_path=str(optimizer_path or tmp_path), adam=AdamSettings(),
                              sub_group_size=sub_group_size, optimizer_buffer_count=4, precision=precision)
    return Engine(Mlp(), settings)


def reports(engine: Engine, steps: int, dtype: torch.dtype = torch.float32) -> list:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        loss = engine(torch.randn(8, WIDTH, generator=g).to(dtype), torch.randn(8, WIDTH, generator=g).to(dtype))
        engine.backward(loss)
        engine.step()
        out.append(engine.step_report())
    return out


def test_per_parameter_figures_are_the_steps_bytes_over_the_parameters(tmp_path):
    engine = mlp_engine(tmp_path)
    try:
        steps = reports(engine, 3)
    finally:
        engine.close()
    params = LAYERS * WIDTH * WIDTH
    for r in steps:
        assert r.params == params
        assert r.bytes_read_per_param == r.bytes_read / params
        assert r.bytes_written_per_param == r.bytes_written / params
        d = r.to_dict()
        assert (d["params"], d["bytes_read_per_param"]) == (params, r.bytes_read_per_param)
        assert f"{r.bytes_read_per_param:.1f} / {r.bytes_written_per_param:.1f} B per parameter" in r.line()
    steady = steps[-1]
    # Sanity: an fp32 AdamW step reads the moments and the fp32 values (12 B) and writes them back (12 B); it
    # reads each parameter at most once for forward and once for backward, and its gradient at most once (12 B).
    assert 12 <= steady.bytes_read_per_param <= 24 and 12 <= steady.bytes_written_per_param <= 20


def steady_step(tmp_path, sub_group_size: int):
    tmp_path.mkdir()
    engine = mlp_engine(tmp_path, sub_group_size)
    try:
        return reports(engine, 3)[-1]
    finally:
        engine.close()


def test_the_first_sub_groups_gradient_never_goes_to_nvme(tmp_path):
    """[Note: the first sub-group's gradient stays in host memory] (swap/optimizer.py): with one sub-group a
    steady fp32 step writes the moments and the master, which is the parameter's partition too (12 B per
    parameter: [Note: a partition inside another] in memory/views.py), and no gradient; with four, the
    gradients of the last three go to NVMe and back (4 B written and read per parameter of them: 3 B per
    parameter of the model), and the parameter reads are the same."""
    one = steady_step(tmp_path / "one", 10**9)
    four = steady_step(tmp_path / "four", WIDTH * WIDTH)
    assert one.bytes_written_per_param == 12.0
    assert four.bytes_written_per_param - one.bytes_written_per_param == 3.0
    assert four.bytes_read_per_param - one.bytes_read_per_param == 3.0


@pytest.mark.parametrize("case", ["one path", "two paths", "bf16"])
def test_a_parameters_partition_is_its_master_range_where_both_are_fp32_on_one_path(tmp_path, case):
    """[Note: a partition inside another] (memory/views.py): with fp32 parameters and the optimizer on one
    nvme_path, each parameter's partition is its range of the master file, so the master's write is its write
    (12 B written per parameter).  On two paths (two memory managers) or with bf16 parameters the parameter
    keeps a file of its own and is written besides: 4 B more in fp32, 2 B in bf16."""
    other = tmp_path / "optimizer"
    other.mkdir()
    engine = mlp_engine(tmp_path, 10**9, optimizer_path=other if case == "two paths" else None,
                        precision=Precision.BF16 if case == "bf16" else Precision.FP32)
    try:
        steady = reports(engine, 3, torch.bfloat16 if case == "bf16" else torch.float32)[-1]
        home = engine.run.homes[0]
        bases = {home.manager.base_of(home.key(i)) for i in range(LAYERS)}
        following = home.following
    finally:
        engine.close()
    if case == "one path":
        assert bases == {"optimizer/0/master"} and steady.bytes_written_per_param == 12.0
    else:
        assert bases == {None}
        assert steady.bytes_written_per_param == (16.0 if case == "two paths" else 14.0)
        # bf16 on one path follows the master ([Note: a follower]): the forward converts from its buffer
        assert following == (set(range(LAYERS)) if case == "bf16" else set())


def test_infinity_train_step_records_carry_the_figures():
    stats = StepStats(step=1, loss=1.0, step_s=1.0, tokens=8, bytes_read=18 << 20, bytes_written=20 << 20,
                      lr=1e-3, params=1 << 20)
    d = stats.to_dict()
    assert (d["params"], d["bytes_read_per_param"], d["bytes_written_per_param"]) == (1 << 20, 18.0, 20.0)
    assert "(18.0 / 20.0 B/param)" in describe(stats)
    assert StepStats(step=1, loss=1.0, step_s=1.0, tokens=8, bytes_read=0, bytes_written=0, lr=0.0).to_dict()[
        "bytes_read_per_param"] == 0.0



def optimizer_state_reads() -> int:
    """Bytes the memory managers have read from NVMe into host memory for the optimizer (master and moments)."""
    return sum(v for k, v in metrics.TALLY.counters.items() if k[0] == "infinity_tier_transfer_bytes_total"
               and k[1][:3] == ("nvme", "host", "optimizer_state"))


def test_the_first_step_does_not_read_the_moments_it_never_wrote(tmp_path):
    """[Note: an extent never written reads as zeros] (memory/manager.py): Adam's moments start as zeros
    that nothing wrote, so the first step reads only the fp32 master (4 B per parameter) and the second
    master and moments (12 B), and the updates are unchanged: the losses equal plain torch's AdamW's within
    1e-5 (tests/integration/test_training.py compares the weights of longer runs)."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, WIDTH, generator=g), torch.randn(8, WIDTH, generator=g)) for _ in range(3)]
    metrics.enable()
    engine = mlp_engine(tmp_path, 10**9)
    try:
        reads, losses = [], []
        for x, y in batches:
            before = optimizer_state_reads()
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            reads.append((optimizer_state_reads() - before) / (LAYERS * WIDTH * WIDTH))
            losses.append(float(loss.detach()))
    finally:
        engine.close()
        metrics.disable()
    assert reads == [4.0, 12.0, 12.0]
    want = torch_losses(batches)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, want)) <= 1e-5


def torch_losses(batches: list) -> list[float]:
    model = Mlp()
    adam = AdamSettings()
    optimizer = torch.optim.AdamW(model.parameters(), lr=adam.lr, betas=adam.betas, eps=adam.eps,
                                  weight_decay=adam.weight_decay)
    out = []
    for x, y in batches:
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out.append(float(loss))
    return out
