"""The models, data, config and timed training loop benchmarks/ds_step_time.py runs in both engines.  Plain
torch and plain dicts only: the same file is imported by infinity's side (the project's .venv) and by
DeepSpeed's side (its own environment, which has torch but not infinity).  The main job's GPT is
infinity/models/gpt.py itself, loaded by its file path (it imports only torch), so neither side carries a
copy of it.  Benchmark-only."""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
MLP_WIDTH, MLP_LAYERS, MLP_BATCH = 3584, 6, 8  # issue 18: 6 x Linear(3584, 3584), 77,091,840 parameters
GPT_BATCH = 8  # the shipped nvme-local config's train_micro_batch_size_per_gpu
MODELS = ("mlp", "gpt")


def gpt_module() -> Any:
    """infinity/models/gpt.py as a module of its own (not through the infinity package)."""
    name = "ds_step_gpt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "infinity" / "models" / "gpt.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look the module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def gpt_spec() -> Any:
    """infinity-train's default GPT (infinity/cli/train.py DEFAULT_SPEC): 21,064,704 parameters."""
    return gpt_module().GptSpec(vocab=8192, context=128, hidden=512, layers=4, heads=8)


class Mlp(nn.Module):
    """MLP_LAYERS x Linear(width, width) with GELU between; mean squared error against a target."""

    def __init__(self, width: int = MLP_WIDTH, layers: int = MLP_LAYERS) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for k in range(layers):
            mods.append(nn.Linear(width, width))
            if k < layers - 1:
                mods.append(nn.GELU())
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x), y)


def model(name: str) -> nn.Module:
    """Built from seed 0 (call it inside the engine's zero.Init)."""
    torch.manual_seed(0)
    if name == "mlp":
        return Mlp()
    return gpt_module().Gpt(gpt_spec())


def batches(name: str, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if name == "mlp":
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(MLP_BATCH, MLP_WIDTH, generator=g), torch.randn(MLP_BATCH, MLP_WIDTH, generator=g))
                for _ in range(steps)]
    return gpt_module().synthetic_batches(gpt_spec(), batch=GPT_BATCH, steps=steps, seed=1)


PERSISTENCE_THRESHOLD = 100_000  # nvme-local's stage3_param_persistence_threshold


def offloaded_params(name: str) -> tuple[int, int]:
    """(how many parameters are above the persistence threshold, the largest one's elements), from the
    model built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        sizes = [p.numel() for p in model(name).parameters()]
    return sum(n > PERSISTENCE_THRESHOLD for n in sizes), max(sizes)


def config(name: str, nvme: str | None, threads: int = 2) -> dict[str, Any]:
    """The shipped nvme-local config's ZeRO-3 block in fp32, with no lr schedule; nvme None: everything
    resident (offload none, the compute-only step).  Both engines read these keys with the same meaning.

    offload_param's pool holds every offloaded parameter, each buffer the largest one: with
    stage3_max_reuse_distance 1e9 DeepSpeed keeps every parameter it used in a swap buffer of its own until
    the step ends, and with nvme-local's 5 buffers of 1e8 it stops at the first step's backward ("Not
    enough swap in buffers 0 for 1 params")."""
    offload_param: dict[str, Any] = {"device": "none"}
    offload_optimizer: dict[str, Any] = {"device": "none"}
    if nvme is not None:
        count, largest = offloaded_params(name)
        offload_param = {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "buffer_count": count,
                         "buffer_size": largest, "max_in_cpu": 0}
        offload_optimizer = {"device": "nvme", "nvme_path": nvme, "pin_memory": True, "buffer_count": 4,
                             "pipeline_read": True, "pipeline_write": True}
    return {"train_micro_batch_size_per_gpu": MLP_BATCH if name == "mlp" else GPT_BATCH,
            "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "steps_per_print": 1000000,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1}},
            "zero_optimization": {"stage": 3, "sub_group_size": 1e8, "stage3_prefetch_bucket_size": 5e7,
                                  "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD, "stage3_max_live_parameters": 1e9,
                                  "stage3_max_reuse_distance": 1e9, "offload_param": offload_param,
                                  "offload_optimizer": offload_optimizer},
            "aio": {"block_size": 1048576, "queue_depth": 32, "intra_op_parallelism": threads,
                    "single_submit": False, "overlap_events": True}}


def proc_io() -> dict[str, int]:
    """This process's bytes to and from the storage layer, all threads (/proc/self/io): O_DIRECT included,
    so it counts either engine's swap traffic the same way."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"read": int(fields["read_bytes"]), "written": int(fields["write_bytes"])}


def timed_run(build: Callable[[], Any], data: list[tuple[torch.Tensor, torch.Tensor]],
              engine_counters: Callable[[Any], dict[str, int]] | None = None) -> tuple[Any, dict[str, Any]]:
    """build() (the model under the engine's zero.Init, then its initialize) and one optimizer step per
    batch, each timed from forward to the end of step(); the bytes /proc/self/io (and engine_counters, if
    given: cumulative counters of the engine's own) counted during the build and each step."""
    def counters(engine: Any) -> dict[str, int]:
        out = {f"proc_{k}": v for k, v in proc_io().items()}
        if engine is not None and engine_counters is not None:
            out.update(engine_counters(engine))
        return out

    start, before = time.perf_counter(), counters(None)
    engine = build()
    built_s, after = time.perf_counter() - start, counters(engine)
    record: dict[str, Any] = {"build_s": built_s, "build_io": {k: after[k] - before.get(k, 0) for k in after},
                              "steps": []}
    for x, y in data:
        before, started = counters(engine), time.perf_counter()
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        seconds, after = time.perf_counter() - started, counters(engine)
        record["steps"].append({"s": seconds, "loss": float(loss.detach().float()),
                                **{k: after[k] - before[k] for k in after}})
    return engine, record


def summary(record: dict[str, Any]) -> dict[str, float]:
    """The figures the issue names, from one timed_run record (steps 3..N make the steady step)."""
    steps = record["steps"]
    steady = steps[2:]
    out = {"init_to_step1_s": record["build_s"] + steps[0]["s"], "build_s": record["build_s"],
           "step1_s": steps[0]["s"], "step2_s": steps[1]["s"], "steps12_s": steps[0]["s"] + steps[1]["s"],
           "steady_s": statistics.median(s["s"] for s in steady)}
    for key in steps[0]:
        if key not in ("s", "loss"):
            out[f"steady_{key}"] = statistics.median(s[key] for s in steady)
            out[f"step1_{key}"] = steps[0][key]
    return out
