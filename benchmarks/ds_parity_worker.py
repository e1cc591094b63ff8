"""DeepSpeed's side of benchmarks/ds_parity.py; runs in DeepSpeed's own environment (DS_ACCELERATOR=cpu).

    DS_ACCELERATOR=cpu ../dsvenv/bin/python benchmarks/ds_parity_worker.py   # prints one JSON object

Every case of ds_parity_cases.py through deepspeed.initialize (ZeRO-3), and the fp16 loss-scale sequence
through DeepSpeed's own DynamicLossScaler, the class its ZeRO-3 optimizer steps (fp16 training itself needs
an accelerator with fp16 kernels).  Benchmark-only: DeepSpeed is never a dependency of infinity."""
import json
import os
import sys

import deepspeed
import torch
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ds_parity_cases as cases  # noqa: E402

for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631", "RANK": "0", "WORLD_SIZE": "1",
                   "LOCAL_RANK": "0"}.items():
    os.environ.setdefault(key, value)
deepspeed.init_distributed(dist_backend="gloo")


def run(case, steps=cases.STEPS, **kw):
    engine, *_ = deepspeed.initialize(model=cases.model(), config=cases.config(case))
    return cases.train(engine, steps, **kw)


def loss_scales(consecutive):
    scaler = DynamicLossScaler(init_scale=2 ** 16, scale_window=3, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=consecutive)
    scales = []
    for k in range(16):
        scales.append(scaler.cur_scale)
        scaler.update_scale(k in cases.OVERFLOW_STEPS)
    return scales


def batch(case):
    try:
        engine, *_ = deepspeed.initialize(model=cases.model(), config=cases.config(case))
    except Exception as err:  # DeepSpeed refuses with an AssertionError
        return {"refused": f"{type(err).__name__}: {err}"}
    return {"micro": engine.train_micro_batch_size_per_gpu(), "gas": engine.gradient_accumulation_steps(),
            "train": engine.train_batch_size()}


def config_keys():
    """Every key of DeepSpeed's pydantic config models for the blocks infinity reads, as dotted paths."""
    from pydantic import BaseModel
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            key = f"{prefix}.{field.alias or name}"
            inner = [a for a in (field.annotation, *getattr(field.annotation, "__args__", ()))
                     if isinstance(a, type) and issubclass(a, BaseModel)]
            yield from walk(inner[0], key) if inner else (key,)

    return sorted({*walk(DeepSpeedZeroConfig, "zero_optimization"), *walk(DeepSpeedFP16Config, "fp16"),
                   *walk(DeepSpeedBF16Config, "bf16")})


out = {"version": deepspeed.__version__, "keys": config_keys(),
       "schedules": {name: run(name) for name in cases.SCHEDULERS},
       "counters": run("counters", steps=3, gas=4),
       "losses": run("losses"),
       "loss_scale": {"plain": loss_scales(False), "consecutive": loss_scales(True)},
       "batch": {case: batch(case) for case in ("derived micro", "mismatch")}}
print("JSON " + json.dumps(out), flush=True)
