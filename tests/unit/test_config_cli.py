"""infinity-config check: resolved JSON with sources, problems, exit status 0 or 2."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from infinity.cli import config as cli

REFERENCE = str(Path(__file__).resolve().parents[2] / "infinity" / "config" / "shipped" / "hf-zero3-nvme.json")
ARGS = ["--learning-rate", "3e-5", "--adam-beta1", "0.9", "--adam-beta2", "0.999", "--adam-epsilon", "1e-8",
        "--weight-decay", "0", "--max-grad-norm", "1", "--per-device-train-batch-size", "4",
        "--gradient-accumulation-steps", "1", "--world-size", "1", "--hidden-size", "1024",
        "--precision", "fp16", "--warmup-steps", "10"]


def run(capsys, *argv: str) -> tuple[int, dict]:
    status = cli.main(["check", *argv])
    return status, json.loads(capsys.readouterr().out)


def test_valid_config_prints_values_and_sources(capsys):
    status, report = run(capsys, REFERENCE, *ARGS, "--set", "aio.queue_depth=64")
    assert status == 0 and report["valid"] and report["problems"] == []
    assert report["config"]["zero_optimization"]["reduce_bucket_size"] == 1024 * 1024
    assert report["config"]["aio"]["queue_depth"] == 64
    sources = report["sources"]
    assert sources["aio.queue_depth"] == "override"
    assert sources["zero_optimization.reduce_bucket_size"] == "auto"
    assert sources["zero_optimization.stage"] == "file"
    assert sources["prometheus.port"] == "default"
    assert any(e["key"] == "zero_optimization.overlap_comm" for e in report["no_effect"])


def test_unfilled_auto_fails_unless_deferred(capsys):
    status, report = run(capsys, REFERENCE)
    assert status == 2 and not report["valid"]
    assert any(p["key"] == "optimizer.params.lr" and "--learning-rate" in p["fix"] for p in report["problems"])
    status, report = run(capsys, REFERENCE, "--defer-auto")
    assert status == 0 and "optimizer.params.lr" in report["pending_auto"]


def test_problems_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}},
                               "aio": {"block_size": 1000, "thread_count": 2}}))
    status, report = run(capsys, str(bad), "--set", "fp16.enabled=true", "--set", "bf16.enabled=true")
    assert status == 2
    assert {p["key"] for p in report["problems"]} == {
        "zero_optimization.offload_param.nvme_path", "aio.block_size", "bf16.enabled"}


def test_round_trip_through_the_printed_json(capsys, tmp_path):
    from infinity import Config

    _, report = run(capsys, REFERENCE, *ARGS)
    printed = tmp_path / "resolved.json"
    printed.write_text(json.dumps(report["config"]))
    status, again = run(capsys, str(printed))
    assert status == 0 and again["config"] == report["config"]
    assert Config.load(printed) == Config.load(report["config"])


def test_rechecking_the_printed_json_names_no_key_without_effect(capsys, tmp_path, caplog):
    # Every key is printed, each at its value; those at their default must not read as given.
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                                "zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2}))
    status, report = run(capsys, str(base))
    assert status == 0 and report["no_effect"] == []
    assert report["config"]["optimizer"]["params"]["torch_adam"] is False
    printed = tmp_path / "printed.json"
    printed.write_text(json.dumps(report["config"]))
    with caplog.at_level(logging.WARNING, logger="infinity.config"):
        status, again = run(capsys, str(printed))
    assert status == 0 and again["no_effect"] == [] and again["config"] == report["config"]
    assert [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()] == []


def test_a_config_without_batch_sizes_is_a_problem_as_the_engine_finds_it(capsys, tmp_path):
    path = tmp_path / "no-batch.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}))
    status, report = run(capsys, str(path))
    assert status == 2 and [p["key"] for p in report["problems"]] == ["train_micro_batch_size_per_gpu"]
    assert "train_batch_size" in report["problems"][0]["message"]
    path.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 3}))
    status, report = run(capsys, str(path))
    assert status == 2 and report["problems"][0]["key"] == "train_batch_size"


def test_every_shipped_config_passes_check(capsys):
    # every file in infinity/config/shipped/ is a config (the Grafana dashboard lives in dashboards/)
    paths = sorted((Path(REFERENCE).parent).glob("*.json"))
    assert len(paths) >= 3
    for path in paths:
        status, report = run(capsys, str(path), "--defer-auto")
        assert status == 0 and report["valid"], (path.name, report.get("problems"))
