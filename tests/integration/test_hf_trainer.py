"""InfinityTrainer and InfinitySeq2SeqTrainer against Transformers' own Trainer and Seq2SeqTrainer: tiny GPT-2
and T5 built from configs, fp32, parameters and optimizer states on NVMe, the same seed and data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")
pytest.importorskip("accelerate", reason="Trainer needs the accelerate package")

import infinity  # noqa: E402
from infinity.config import shipped  # noqa: E402
from infinity.errors import ConfigError  # noqa: E402
from infinity.integrations.transformers import from_pretrained  # noqa: E402

from hf_trainer_runs import losses, nvme_config, tiny_gpt2, trainer  # noqa: E402

RUNS = Path(__file__).with_name("hf_trainer_runs.py")
STEPS = 4


def assert_same_logs(got: list[dict], want: list[dict], rel: float = 1e-5) -> None:
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):
        assert g["step"] == w["step"]
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - w[key]) <= rel * abs(w[key]), (key, g, w)
        assert g["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-12), (g, w)


def test_gpt2_trainer_on_nvme_equals_plain_trainer(tmp_path):
    """Every logged loss, grad_norm (clipped at max_grad_norm 1.0 in both) and lr; eval loss; save_model."""
    plain = trainer("gpt2", "plain", tmp_path / "plain", None, STEPS)
    plain.train()
    ours = trainer("gpt2", "infinity", tmp_path / "ours", tmp_path / "nvme", STEPS)
    ours.train()
    try:
        assert ours.engine.run.offloaded  # the weights live on NVMe
        assert max(g["grad_norm"] for g in losses(plain)) > 1.0  # clipping took part
        assert_same_logs(losses(ours), losses(plain))
        want, got = plain.evaluate()["eval_loss"], ours.evaluate()["eval_loss"]
        assert abs(got - want) <= 1e-5 * abs(want)
        ours.save_model(str(tmp_path / "saved"))
        reloaded = dict(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").named_parameters())
        values, trained = ours.engine.parameter_values(), dict(plain.model.named_parameters())
        assert set(reloaded) == set(values) == set(trained)
        for name, value in values.items():
            assert torch.equal(reloaded[name].detach(), value), name
            # Adam's first steps magnify rounding noise in small gradients (test_training.assert_same_weights)
            assert float((value - trained[name].detach()).norm()) <= 1e-3 * float(trained[name].norm()), name
    finally:
        ours.engine.close()


def test_t5_seq2seq_trainer_equals_plain_and_predicts_with_generate(tmp_path):
    plain = trainer("t5", "plain", tmp_path / "plain", None, STEPS)
    plain.train()
    ours = trainer("t5", "infinity", tmp_path / "ours", tmp_path / "nvme", STEPS)
    ours.train()
    try:
        assert_same_logs(losses(ours), losses(plain))
        want, got = plain.predict(plain.eval_dataset), ours.predict(ours.eval_dataset)
        assert abs(got.metrics["test_loss"] - want.metrics["test_loss"]) <= 1e-5 * abs(want.metrics["test_loss"])
        assert got.predictions.shape == want.predictions.shape and (got.predictions == want.predictions).all()
    finally:
        ours.engine.close()


def guide_config(tmp_path: Path) -> Path:
    """The Transformers guide's ZeRO-3 NVMe config with only nvme_path changed."""
    data = json.loads(shipped.find("hf-zero3-nvme").read_text())
    for block in ("offload_param", "offload_optimizer"):
        data["zero_optimization"][block]["nvme_path"] = str(tmp_path / "nvme")
    (tmp_path / "nvme").mkdir()
    path = tmp_path / "ds_config_zero3.json"
    path.write_text(json.dumps(data))
    return path


def test_the_guides_config_drives_trainer_with_nothing_filled_by_hand(tmp_path, caplog):
    """14 "auto" values, all from TrainingArguments and the model.  warmup_steps 0 fills warmup_num_steps 0,
    which DeepSpeed's WarmupLR (log) stretches to 2 steps and whose first value it spends twice
    (docs/config.md): lr 0, 0, then 1e-3 (the guide's warmup_min_lr "auto" is 0).  Plain Trainer is given
    that lr sequence as a LambdaLR over its own AdamW."""
    used = [0.0, 0.0] + [1.0] * STEPS  # of learning_rate, per optimizer step
    plain = trainer("gpt2", "plain", tmp_path / "plain", None, STEPS, warmup_steps=0,
                    lr_lambda=lambda k: used[k])
    plain.train()
    ours = trainer("gpt2", "infinity", tmp_path / "ours", None, STEPS, config=str(guide_config(tmp_path)),
                   warmup_steps=0)
    with caplog.at_level("INFO", logger="infinity.integrations.transformers"):
        ours.train()
    try:
        config = ours.engine.config
        assert config.pending_auto == [] and config.optimizer.params.lr == 1e-3
        assert config.train_batch_size == 8 and config.gradient_clipping == 1.0
        assert config.zero_optimization.reduce_bucket_size == 64 * 64
        assert sum("resolved from TrainingArguments" in r.message for r in caplog.records) == 1
        assert_same_logs(losses(ours), losses(plain))
    finally:
        ours.engine.close()


def test_a_model_loaded_into_partitions_trains_as_the_plain_one(tmp_path):
    """from_pretrained streams a saved model's weights into NVMe partitions; InfinityTrainer trains it as plain
    Trainer trains Transformers' own from_pretrained of the same folder, and num_parameters() is the real count."""
    tiny_gpt2().save_pretrained(tmp_path / "pretrained")
    config = nvme_config(tmp_path / "nvme")
    (tmp_path / "nvme").mkdir()
    config.update(optimizer={"type": "AdamW", "params": {"lr": 1e-3}}, train_micro_batch_size_per_gpu=4,
                  gradient_accumulation_steps=2, train_batch_size=8, gradient_clipping=1.0)
    partitioned = from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "pretrained", config)
    plain = trainer("gpt2", "plain", tmp_path / "plain", None, STEPS,
                    model=transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pretrained"))
    plain.train()
    ours = trainer("gpt2", "infinity", tmp_path / "ours", None, STEPS, model=partitioned, config=config)
    ours.train()
    try:
        assert ours.engine.run.offloaded
        assert_same_logs(losses(ours), losses(plain))
        assert ours.model.num_parameters() == plain.model.num_parameters()
    finally:
        ours.engine.close()


def test_values_that_disagree_with_training_arguments_are_listed(tmp_path):
    config = nvme_config(tmp_path / "nvme")
    (tmp_path / "nvme").mkdir()
    config.update(optimizer={"type": "AdamW", "params": {"lr": 5e-5}}, gradient_accumulation_steps=3)
    ours = trainer("gpt2", "infinity", tmp_path / "ours", None, STEPS, config=config)
    with pytest.raises(ValueError) as err:
        ours.train()
    assert isinstance(err.value, ConfigError)
    assert set(err.value.keys) == {"optimizer.params.lr", "gradient_accumulation_steps"}
    assert "5e-05 in the config but the training arguments give 0.001" in str(err.value)


def test_initialize_takes_transformers_training_arguments(tmp_path):
    (tmp_path / "nvme").mkdir()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                                          learning_rate=3e-4, max_steps=10, report_to=[], use_cpu=True)
    config = {**nvme_config(tmp_path / "nvme"), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
              "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}}
    engine, *_ = infinity.initialize(model=tiny_gpt2(), config=config, training_args=args)
    try:
        assert engine.config.optimizer.params.lr == 3e-4 and engine.config.train_micro_batch_size_per_gpu == 2
        assert engine.config.scheduler.params.total_num_steps == 10
    finally:
        engine.close()


def run(tmp_path: Path, name: str, *extra: str, nproc: int = 1, kind: str = "gpt2", steps: int = STEPS) -> dict:
    out, nvme = tmp_path / name, tmp_path / f"{name}-nvme"
    nvme.mkdir()
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(RUNS.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([*launcher, str(RUNS), kind, "infinity", str(out), str(nvme), str(steps), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "log.json").read_text())


def test_resume_in_a_fresh_process_continues_exactly(tmp_path):
    """Saved at step 2 of 4; a fresh process resumes from checkpoint-2: steps 3 and 4 log the same losses,
    grad norms and lrs as the run that went on (the data order and the scheduler are Trainer's)."""
    whole = run(tmp_path, "whole", "--save-steps", "2")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert {"trainer_state.json", "latest", "global_step2", "model.safetensors"} <= set(os.listdir(checkpoint))
    resumed = run(tmp_path, "resumed", "--resume", str(checkpoint))
    assert [g["step"] for g in resumed["logs"]] == [1, 2, 3, 4]  # 1 and 2 from the checkpoint's trainer_state
    assert resumed["logs"][2:] == whole["logs"][2:]
    assert resumed["eval_loss"] == whole["eval_loss"]


@pytest.mark.parametrize("kind", ["gpt2", "t5"])
def test_two_ranks_under_torchrun_equal_one_rank(tmp_path, kind):
    """T5's evaluation generates (predict_with_generate), with synced_gpus across the ranks."""
    one = run(tmp_path, "one", kind=kind)
    two = run(tmp_path, "two", "--batch", "2", "--save-steps", "2", nproc=2, kind=kind)
    assert (one["world"], two["world"]) == (1, 2)
    checkpoint = tmp_path / "two" / "checkpoint-2"  # each rank's engine checkpoint, Trainer's files once
    assert {"rank_0", "rank_1"} <= set(os.listdir(checkpoint / "global_step2"))
    assert {"trainer_state.json", "model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= set(
        os.listdir(checkpoint))
    for g, w in zip(two["logs"], one["logs"], strict=True):
        for key in ("loss", "grad_norm"):
            assert abs(g[key] - w[key]) <= 1e-4 * abs(w[key]), (key, g, w)
    assert abs(two["eval_loss"] - one["eval_loss"]) <= 1e-4 * abs(one["eval_loss"])


def test_the_example_script_fine_tunes_a_saved_model_streamed_into_partitions(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    (tmp_path / "nvme").mkdir()
    example = Path(__file__).parents[2] / "examples" / "trainer_nvme.py"
    done = subprocess.run([sys.executable, str(example), "--nvme", str(tmp_path / "nvme"), "--steps", "2", "--model",
                           str(tmp_path / "gpt2"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    assert reloaded.num_parameters() == tiny_gpt2().num_parameters()
