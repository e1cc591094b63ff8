"""The main job: train a GPT (or a Transformers model) through infinity.initialize, on synthetic tokens or on
a file's (infinity.models.data); save the run's checkpoint at the end and resume from one.

`run(job)` yields one StepStats per optimizer step; infinity-train (cli/train.py) draws them.  The
model is built under infinity.zero.Init when parameters go to NVMe, so it never has to fit in RAM.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from infinity.config import Config, Source, TrainingArgs
from infinity.config.auto import hidden_size_of
from infinity.config.zero import OffloadDevice
from infinity.errors import UsageError
from infinity.exporter import from_config
from infinity.errors import ConfigError, Problem
from infinity.models.data import Target, read_tokens
from infinity.models.gpt import Gpt, GptSpec, synthetic_batches
from infinity.timeline import Timeline
from infinity.zero import Engine, Init, initialize
from infinity.zero.ranks import init_distributed
from infinity.zero.step_report import PerParamBytes, PrefetchCounts

log = logging.getLogger("infinity.train")


@dataclass(frozen=True)
class TrainJob:
    config: str | Mapping[str, Any]  # a path, JSON string or dict, DeepSpeed-style
    spec: GptSpec = field(default_factory=GptSpec)
    steps: int = 10
    micro_batch: int | None = None  # None: the config's train_micro_batch_size_per_gpu
    nvme_path: str | None = None  # overrides both offload blocks' nvme_path
    seed: int = 0
    hf_config: str | None = None  # a Transformers config (name or path) instead of the repo's GPT
    metrics_port: int | None = None  # serve Prometheus metrics there (the config's prometheus block otherwise)
    trace: str | None = None  # write the last TRACED_STEPS steps' timeline there (Chrome/Perfetto trace events)
    data: str | None = None  # a text, .npy or .bin file of tokens (infinity.models.data); None: synthetic tokens
    tokenizer: str | None = None  # a local folder holding the tokenizer for a text --data; None: byte-level
    save: str | None = None  # write the engine's checkpoint there at the end
    resume: str | None = None  # start from the engine's checkpoint there; `steps` more steps follow


TRACED_STEPS = 2
"""infinity-train --trace keeps the timeline of the last two optimizer steps (earlier ones are dropped as the
run goes, so a long run's trace stays small); the first step records the module order and is never among
them unless the run is that short."""


@dataclass(frozen=True)
class StepStats(PerParamBytes):
    step: int  # optimizer steps done
    loss: float  # mean of the window's micro-batch losses
    step_s: float
    tokens: int
    bytes_read: int  # NVMe, this step
    bytes_written: int
    lr: float
    stall_ratio: float = 0.0  # of the last optimizer step: time waiting on I/O / step time (step_report)
    prefetch_hits: int = 0  # of the last optimizer step, as StepReport (infinity_prefetch_total{outcome})
    prefetch_late: int = 0
    prefetch_misses: int = 0
    peak_rss_bytes: int = 0  # the largest peak RSS (ru_maxrss) of any rank so far, at the end of the step
    nonfinite: tuple[str, ...] = ()  # "loss", "grad_norm": NaN or infinite in this step (StepReport.nonfinite)
    params: int = 0  # parameters this rank trains (StepReport.params): what the per-parameter figures divide by

    def to_dict(self) -> dict[str, Any]:
        """The step's --json record: its fields and the per-parameter byte figures."""
        return {**asdict(self), "bytes_read_per_param": self.bytes_read_per_param,
                "bytes_written_per_param": self.bytes_written_per_param}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s if self.step_s > 0 else 0.0

    @property
    def prefetch(self) -> PrefetchCounts:
        return PrefetchCounts(self.prefetch_hits, self.prefetch_late, self.prefetch_misses)


@dataclass(frozen=True)
class RunSummary:
    """The end of a run as infinity-train prints it (`line()`) and writes it (--json's "summary").

    [Note: what the means cover]  Step 1 records the module order, fetches everything on demand and pays
    for first touches, so the means (time, tokens/s, I/O per step, stall, prefetch) cover steps
    `averaged_from`..`steps` (all of them in a one-step run); the line says so.  Bytes are decimal GB
    (1e9), RSS included.  With several ranks, step time, I/O, stall and prefetch are rank 0's and
    `peak_rss_gb` is the largest of every rank's peak (`rss_of` says so)."""

    steps: int
    first_loss: float
    last_loss: float
    averaged_from: int  # the first step the means cover (2 unless the run had one step)
    mean_step_s: float
    tokens_per_s: float  # tokens of the global batch (every rank's) per second
    gb_read_per_step: float  # this rank's NVMe reads, GB (1e9 bytes) per step
    gb_written_per_step: float
    stall_ratio: float  # time waiting on I/O / step time, over the averaged steps
    prefetch_hits: int  # summed over the averaged steps
    prefetch_late: int
    prefetch_misses: int
    peak_rss_gb: float
    ranks: int = 1
    rss_of: str = "this process"  # or "the largest of 2 ranks"

    def line(self) -> str:
        world = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        who = " (rank 0's)" if self.ranks > 1 else ""
        last = self.averaged_from + max(self.steps - 1, 1) - 1  # a resumed run's steps go on from its checkpoint's
        span = f"step {last}" if last == self.averaged_from else f"steps {self.averaged_from}-{last}"
        left_out = (f" (step {self.averaged_from - 1}, which records the module order, left out)" if self.steps > 1
                    else "")
        prefetch = PrefetchCounts(self.prefetch_hits, self.prefetch_late, self.prefetch_misses)
        return (f"{self.steps} steps{world}: loss {self.first_loss:.4f} -> {self.last_loss:.4f}; mean of {span}"
                f"{left_out}: {self.mean_step_s:.2f} s/step, {self.tokens_per_s:.0f} tokens/s, per step "
                f"{self.gb_read_per_step:.3f} GB read and {self.gb_written_per_step:.3f} GB written{who}, stalled "
                f"{100 * self.stall_ratio:.1f}% of the time, prefetch {prefetch.shares()}{who}; peak RSS "
                f"{self.peak_rss_gb:.2f} GB ({self.rss_of})")


def summarize(steps: list[StepStats], ranks: int = 1) -> RunSummary:
    """The run's summary; the means leave step 1 out when there are more (RunSummary's note)."""
    if not steps:
        raise UsageError("summarize() needs at least one step's StepStats")
    steady = steps[1:] or steps
    seconds = sum(s.step_s for s in steady)
    return RunSummary(
        steps=len(steps), first_loss=steps[0].loss, last_loss=steps[-1].loss, averaged_from=steady[0].step,
        mean_step_s=seconds / len(steady), tokens_per_s=sum(s.tokens for s in steady) / seconds if seconds else 0.0,
        gb_read_per_step=sum(s.bytes_read for s in steady) / len(steady) / 1e9,
        gb_written_per_step=sum(s.bytes_written for s in steady) / len(steady) / 1e9,
        stall_ratio=sum(s.stall_ratio * s.step_s for s in steady) / seconds if seconds else 0.0,
        prefetch_hits=sum(s.prefetch_hits for s in steady), prefetch_late=sum(s.prefetch_late for s in steady),
        prefetch_misses=sum(s.prefetch_misses for s in steady), peak_rss_gb=steps[-1].peak_rss_bytes / 1e9,
        ranks=ranks, rss_of=f"the largest of {ranks} ranks" if ranks > 1 else "this process")


def load_config(job: TrainJob) -> Config:
    overrides: dict[str, Any] = {}
    if job.nvme_path is not None:
        overrides = {"zero_optimization.offload_param.nvme_path": job.nvme_path,
                     "zero_optimization.offload_optimizer.nvme_path": job.nvme_path}
    if job.micro_batch is not None:
        overrides["train_micro_batch_size_per_gpu"] = job.micro_batch
    if job.metrics_port is not None:
        overrides.update({"prometheus.enabled": True, "prometheus.port": job.metrics_port})
    config = _fill_auto(Config.load(job.config, overrides=overrides), job)
    if not any(config.sources.get(k, Source.DEFAULT) is not Source.DEFAULT for k in BATCH_SIZE_KEYS):
        raise ConfigError([Problem("train_micro_batch_size_per_gpu", "neither it nor train_batch_size is in "
                                   f"{job.config}; DeepSpeed refuses such a config too",
                                   'pass --batch N, or add "train_micro_batch_size_per_gpu": N to the config')],
                          source="infinity-train")
    return config


BATCH_SIZE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu")


TRAINER_DEFAULTS = TrainingArgs(learning_rate=5e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                                weight_decay=0.0, max_grad_norm=1.0, gradient_accumulation_steps=1, warmup_steps=0)
"""What "auto" becomes in infinity-train, which has no flags for these: Transformers' TrainingArguments defaults."""


def _fill_auto(config: Config, job: TrainJob) -> Config:
    """A config with "auto" values (the Transformers guide's has 14) resolved as Trainer would with its default
    arguments, --batch, the world size, --steps and the model's hidden size; the precision is the config's."""
    if not config.pending_auto:
        return config
    micro = config.train_micro_batch_size_per_gpu
    args = replace(TRAINER_DEFAULTS, per_device_train_batch_size=micro if isinstance(micro, int) else
                   job.micro_batch or 1, world_size=int(os.environ.get("WORLD_SIZE", "1") or 1),
                   hidden_size=_hidden_size(job), precision=config.precision, max_steps=job.steps)
    log.warning("filled %s from Transformers' default TrainingArguments (learning_rate %g, max_grad_norm %g, ...), "
                "--batch and the model; write values in the config to choose others", ", ".join(config.pending_auto),
                args.learning_rate, args.max_grad_norm)
    return config.resolve(args)


def _hidden_size(job: TrainJob) -> int | None:
    if job.hf_config is None:
        return job.spec.hidden
    import transformers  # _hf_model says how to install it when missing, a moment later
    return hidden_size_of(SimpleNamespace(config=transformers.AutoConfig.from_pretrained(job.hf_config)))


NVME_FOLDER_MODE = 0o700


def make_nvme_folders(config: Config) -> list[str]:
    """Creates each offload block's nvme_path (device nvme) that is missing, when its parent is an existing
    writable folder: the one folder the job was told to use, mode 0700, never a chain of parents.  The
    paths created; a folder it cannot create is left to the engine, whose NvmePathError says how.

    [Note: only the main job does this] infinity-train is told a folder by --nvme_path or its config and a
    user expects it made, as `mkdir` would; the library (initialize, zero.Init) refuses a missing folder
    instead, since a mistyped path there would otherwise put swap files somewhere nobody looks.
    """
    created = []
    zero = config.zero_optimization
    for key, block in (("offload_param", zero.offload_param), ("offload_optimizer", zero.offload_optimizer)):
        path = block.nvme_path
        if block.device is not OffloadDevice.NVME or not path or os.path.lexists(path):
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            continue
        try:
            os.mkdir(path, NVME_FOLDER_MODE)
        except FileExistsError:  # another rank of this job made it first
            continue
        except OSError as err:
            log.warning("could not create %s for zero_optimization.%s.nvme_path: %s", path, key, err.strerror)
            continue
        created.append(path)
        log.warning("created the folder %s (mode 0700) for zero_optimization.%s.nvme_path", path, key)
    return created


def build_model(job: TrainJob, config: Config) -> nn.Module:
    """The GPT, built under zero.Init when parameters are offloaded to NVMe (with several ranks each rank
    writes only its pieces, of rank 0's values).

    [Note: Transformers models are built plainly] their constructors end with post_init(), which
    re-initialises every weight of the finished model; under zero.Init those weights would already be
    placeholders.  So a Transformers model is built in host memory and placed by initialize.
    """
    torch.manual_seed(job.seed)
    if job.hf_config:
        return _hf_model(job.hf_config)
    on_nvme = config.zero_optimization.offload_param.device is OffloadDevice.NVME
    with Init(config=config, enabled=on_nvme):
        return Gpt(job.spec)


def run(job: TrainJob) -> Iterator[StepStats]:
    config = load_config(job)
    make_nvme_folders(config)
    # Metrics start before the build, so zero.Init's writes are counted; initialize shares this server.
    ranks = init_distributed()  # under torchrun (infinity-train --nproc N): the process group first
    exporter = from_config(config.prometheus, rank=ranks.rank,
                           setting="--metrics-port" if job.metrics_port else "prometheus.port")
    try:
        model = build_model(job, config)
        spec = _data_spec(job, model)  # --seq against the model's positions, before any swap file is made
        engine, *_ = initialize(model=model, config=config)
        try:
            if job.resume is not None:
                engine.load_checkpoint(job.resume)
            yield from _loop(engine, job, config, model, spec)
            if job.save is not None:
                engine.save_checkpoint(job.save, client_state={"seed": job.seed, "data": job.data or "synthetic"})
        finally:
            engine.close()
    finally:
        if exporter is not None:
            exporter.stop()


def _loop(engine: Engine, job: TrainJob, config: Config, model: nn.Module, spec: GptSpec) -> Iterator[StepStats]:
    micro = engine.train_micro_batch_size_per_gpu()  # the config's, or derived from its train_batch_size
    window = engine.gradient_accumulation_steps()
    # Data parallelism: every rank draws the same global batches and trains on its own part of each.
    world, rank, start = engine.run.world, engine.run.rank, engine.global_steps
    batches = [(x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]) for x, y in
               _global_batches(job, spec, micro * world, start * window, job.steps * window, model)]
    engine.train()
    timeline = Timeline(enabled=job.trace is not None)
    engine.trace_to(timeline)
    try:
        for step in range(job.steps):
            if step <= job.steps - TRACED_STEPS:  # drops the steps before the last TRACED_STEPS
                timeline.clear()
            yield _step(engine, job, batches[step * window:(step + 1) * window], start + step,
                        micro * world * spec.context)
    finally:
        if job.trace is not None:
            log.info("wrote the timeline of the last %d steps to %s", TRACED_STEPS, timeline.write(job.trace))


def _step(engine: Engine, job: TrainJob, window: list, step: int, tokens: int) -> StepStats:
    before, start, losses = engine.io_stats(), time.perf_counter(), []
    lr = engine.get_lr()[0]  # the lr this step uses (get_lr() after it is the next step's)
    for x, y in window:
        loss = _forward(engine, x, y, hf=job.hf_config is not None)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach().float())
    mean = torch.stack(losses).mean()
    if engine.run.world > 1:
        engine.run.ranks.all_reduce_mean(mean, "the step's loss")  # the global batch's loss
    after, report = engine.io_stats(), engine.step_report()
    _, peak_rss = engine.run.ranks.low_high(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS")
    return StepStats(step=step + 1, loss=float(mean), step_s=time.perf_counter() - start,
                     tokens=len(window) * tokens, bytes_read=after.bytes_read - before.bytes_read,
                     bytes_written=after.bytes_written - before.bytes_written, lr=lr,
                     stall_ratio=report.stall_ratio if report else 0.0,
                     prefetch_hits=report.prefetch_hits if report else 0,
                     prefetch_late=report.prefetch_late if report else 0,
                     prefetch_misses=report.prefetch_misses if report else 0, peak_rss_bytes=peak_rss,
                     nonfinite=report.nonfinite if report else (),
                     params=report.params if report else 0)


def _global_batches(job: TrainJob, spec: GptSpec, batch: int, first: int, count: int,
                    model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches first..first+count-1 of the run (the same ones whichever step it resumed at)."""
    if job.data is None:
        return synthetic_batches(spec, batch=batch, steps=first + count, seed=job.seed + 1)[first:]
    target = Target.CONTINUATION if _is_seq2seq(model) else Target.NEXT_TOKEN
    return read_tokens(job.data, spec.vocab, job.tokenizer).batches(batch, spec.context, first, count, target)


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _forward(engine: Engine, x: torch.Tensor, y: torch.Tensor, hf: bool) -> torch.Tensor:
    if not hf:
        return engine(x, y)
    if _is_seq2seq(engine.module):
        return engine(input_ids=x, labels=y).loss
    logits = engine(input_ids=x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _data_spec(job: TrainJob, model: nn.Module) -> GptSpec:
    """Token data shaped for the model: the GPT's own spec, or vocabulary and context of a Transformers one."""
    if job.hf_config is None:
        return job.spec
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and job.spec.context > limit:
        raise ConfigError([Problem("--seq", f"{job.spec.context} is longer than the model's limit of {limit} "
                                            f"positions ({job.hf_config})", f"use --seq {limit} or less")],
                          source="command line")
    vocab = int(getattr(model.config, "vocab_size"))
    return replace(job.spec, vocab=vocab)


def _hf_model(name: str) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise UsageError(f"--hf-config {name}: the transformers package is not installed; pip install "
                         "transformers, or train the built-in GPT (leave out --hf-config)") from None
    hf_config = transformers.AutoConfig.from_pretrained(name)
    if hf_config.is_encoder_decoder:  # T5 and the like: trained on continuations (infinity.models.data.Target)
        return transformers.AutoModelForSeq2SeqLM.from_config(hf_config)
    return transformers.AutoModelForCausalLM.from_config(hf_config)
