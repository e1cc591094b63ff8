"""Non-finite training (infinity/zero/nonfinite.py): lr 1e308 makes the loss NaN after the first step.  Each
such step is named in the progress line, the step report, the JSON record and a metric, with a warning
naming the step; "stop_on_nonfinite" stops the run with a NonFiniteError (exit 1), after that step."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from infinity import metrics
from infinity.cli.train import main
from infinity.config import shipped
from infinity.errors import NonFiniteError
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings, NonFinite

from training_reference import ADAM, fresh_model, make_batches, train

SMALL = ["--steps", "3", "--hidden", "64", "--layers", "1", "--heads", "4", "--vocab", "256", "--seq", "16",
         "--batch", "2"]


def huge_lr_config(tmp_path, **extra) -> str:
    config = json.loads(shipped.read_text("nvme-local"))
    del config["scheduler"]
    config["optimizer"]["params"]["lr"] = 1e308
    config.update(extra)
    path = tmp_path / "huge-lr.json"
    path.write_text(json.dumps(config))
    return str(path)


def run_cli(tmp_path, config: str) -> tuple[int, dict | None]:
    swap = tmp_path / "swap"
    swap.mkdir(exist_ok=True)
    out = tmp_path / "run.json"
    code = main(["--config", config, "--nvme_path", str(swap), "--json", str(out), *SMALL])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_nan_loss_is_reported_in_progress_report_metric_and_warning(tmp_path, capsys, caplog):
    metrics.enable()
    try:
        before = metrics.TALLY.snapshot()
        code, record = run_cli(tmp_path, huge_lr_config(tmp_path))
        after = metrics.TALLY.snapshot()
    finally:
        metrics.disable()
    assert code == 0 and record is not None
    flagged = [s["step"] for s in record["steps"] if "loss" in s["nonfinite"]]
    assert flagged == [2, 3]  # step 1's loss comes from the initial weights; its update made them infinite
    grew = after.counters[("infinity_nonfinite_steps_total", ("loss",))] - \
        before.counters[("infinity_nonfinite_steps_total", ("loss",))]
    assert grew == 2
    progress = [line for line in capsys.readouterr().err.splitlines() if "tok/s" in line]
    assert ["NON-FINITE loss" in line for line in progress] == [False, True, True]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "non-finite" in r.getMessage()]
    assert any(w.startswith("optimizer step 2: non-finite loss nan") for w in warned), warned


def test_stop_on_nonfinite_stops_the_run_with_a_clear_error(tmp_path, capsys):
    code, record = run_cli(tmp_path, huge_lr_config(tmp_path, stop_on_nonfinite=True))
    assert code == 1 and record is None
    err = capsys.readouterr().err
    assert "NonFiniteError: optimizer step 2: non-finite loss nan" in err and "stop_on_nonfinite" in err
    assert "Traceback" not in err
    assert not any((tmp_path / "swap" / "infinity-swap" / "rank-0").iterdir())  # the run was cleaned up


def test_nonfinite_gradient_norm_skips_the_step_and_is_reported(tmp_path):
    """fp32: a NaN gradient skips the step (no weights change) and says so; under NonFinite.STOP it stops,
    the engine still usable for a checkpoint."""
    settings = EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(tmp_path),
                              optimizer_nvme_path=str(tmp_path), adam=ADAM, sub_group_size=20_000,
                              nonfinite=NonFinite.STOP)
    engine = Engine(fresh_model(), settings)
    batches = make_batches()
    try:
        train(engine, batches[:1])
        x, y = batches[1]
        loss = engine(x, y)
        engine.backward(loss * torch.tensor(float("inf")) * 0)  # inf * 0: NaN loss and NaN gradients
        with pytest.raises(NonFiniteError, match=r"optimizer step 2: non-finite loss nan, gradient norm nan"):
            engine.step()
        report = engine.step_report()
        assert report.nonfinite == ("loss", "grad_norm") and engine.global_steps == 2 and engine.skipped_steps == 1  # skipped, counted as DeepSpeed counts it
        assert "NON-FINITE loss, grad_norm" in report.line()
        engine.save_checkpoint(str(tmp_path / "ckpt"))  # the run stopped cleanly, between steps
    finally:
        engine.close()
