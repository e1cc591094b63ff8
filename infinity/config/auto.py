"""Filling "auto" from the training arguments, as the Transformers integration does."""
from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from infinity.config.training import Precision
from infinity.errors import Problem


class Unfilled(enum.Enum):
    """What resolve does with an "auto" that no training argument fills."""

    ERROR = "error"  # the default: a ConfigError naming the key and the argument
    KEEP = "keep"  # leave it "auto" (infinity-config check --defer-auto); the engine resolves later


@dataclass(frozen=True)
class TrainingArgs:
    """The values "auto" is filled from.  Names follow transformers.TrainingArguments; None means not given.

    world_size is the number of processes (GPUs) in the job; hidden_size is the model's.
    """

    learning_rate: float | None = None
    adam_beta1: float | None = None
    adam_beta2: float | None = None
    adam_epsilon: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None
    per_device_train_batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    world_size: int | None = None
    hidden_size: int | None = None
    precision: Precision | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    warmup_min_lr: float | None = None  # "auto" takes 0 when not given, as the Transformers integration does

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_training_arguments(cls, args: Any, hidden_size: int | None = None,
                                max_steps: int | None = None) -> "TrainingArgs":
        """The values of a transformers.TrainingArguments (read by name: this layer does not import
        Transformers), as its DeepSpeed integration takes them.  max_steps: the run's optimizer steps
        (Trainer computes them from the data when args.max_steps is not set; None here leaves
        total_num_steps and warmup_num_steps to args.max_steps); hidden_size: the model's.

        [Note: precision] fp16 and bf16 are enabled by args.fp16 / args.bf16 or their *_full_eval
        variants, as the Transformers integration fills "auto"; neither is fp32."""
        steps = max_steps if max_steps is not None else (args.max_steps if getattr(args, "max_steps", -1) > 0
                                                         else None)
        warmup = None
        if steps is not None and hasattr(args, "get_warmup_steps"):
            warmup = int(args.get_warmup_steps(steps))
        elif isinstance(getattr(args, "warmup_steps", None), int):
            warmup = args.warmup_steps
        if getattr(args, "fp16", False) or getattr(args, "fp16_full_eval", False):
            precision = Precision.FP16
        elif getattr(args, "bf16", False) or getattr(args, "bf16_full_eval", False):
            precision = Precision.BF16
        else:
            precision = Precision.FP32
        return cls(learning_rate=args.learning_rate, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
                   adam_epsilon=args.adam_epsilon, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
                   per_device_train_batch_size=args.per_device_train_batch_size,
                   gradient_accumulation_steps=args.gradient_accumulation_steps,
                   world_size=int(getattr(args, "world_size", 1)), hidden_size=hidden_size, precision=precision,
                   warmup_steps=warmup, max_steps=steps)


def hidden_size_of(model: Any) -> int | None:
    """The hidden size of a Transformers model or of its config (hidden_size, which T5's maps to d_model;
    the largest of hidden_sizes; a multimodal model's text_config), as the Transformers integration reads
    it for the bucket sizes; None for a model without a config."""
    config = getattr(model, "config", model)
    for source in (config, getattr(config, "text_config", None)):
        if source is None:
            continue
        if isinstance(getattr(source, "hidden_size", None), int):
            return int(source.hidden_size)
        if getattr(source, "hidden_sizes", None):
            return int(max(source.hidden_sizes))
    return None


# [Note: each filler gets the arguments and the config's JSON form as filled so far, and returns
# the value, or None when an argument it needs is missing.  train_batch_size comes last because
# it is the product of two other keys that may themselves be "auto".]
Filler = Callable[[TrainingArgs, Mapping[str, Any]], Any]


def _hidden(scale: float) -> Filler:
    return lambda a, d: None if a.hidden_size is None else int(scale * a.hidden_size * a.hidden_size)


def _arg(name: str) -> Filler:
    return lambda a, d: getattr(a, name)


def _betas(a: TrainingArgs, d: Mapping[str, Any]) -> list[float] | None:
    return None if a.adam_beta1 is None or a.adam_beta2 is None else [a.adam_beta1, a.adam_beta2]


def _enabled(precision: Precision) -> Filler:
    return lambda a, d: None if a.precision is None else a.precision is precision


def _train_batch(a: TrainingArgs, d: Mapping[str, Any]) -> int | None:
    micro, steps = d.get("train_micro_batch_size_per_gpu"), d.get("gradient_accumulation_steps")
    if not isinstance(micro, int) or not isinstance(steps, int) or a.world_size is None:
        return None
    return micro * steps * a.world_size


FILL_ONLY: frozenset[str] = frozenset({
    "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold"})
FILLERS: dict[str, tuple[str, Filler]] = {
    "zero_optimization.reduce_bucket_size": ("hidden_size", _hidden(1.0)),
    "zero_optimization.stage3_prefetch_bucket_size": ("hidden_size", _hidden(0.9)),
    "zero_optimization.stage3_param_persistence_threshold": ("hidden_size", lambda a, d: (
        None if a.hidden_size is None else 10 * a.hidden_size)),
    "optimizer.params.lr": ("learning_rate", _arg("learning_rate")),
    "optimizer.params.betas": ("adam_beta1, adam_beta2", _betas),
    "optimizer.params.eps": ("adam_epsilon", _arg("adam_epsilon")),
    "optimizer.params.weight_decay": ("weight_decay", _arg("weight_decay")),
    "scheduler.params.warmup_min_lr": ("warmup_min_lr", lambda a, d: a.warmup_min_lr or 0.0),
    "scheduler.params.warmup_max_lr": ("learning_rate", _arg("learning_rate")),
    "scheduler.params.warmup_num_steps": ("warmup_steps", _arg("warmup_steps")),
    "scheduler.params.total_num_steps": ("max_steps", _arg("max_steps")),
    "fp16.enabled": ("precision", _enabled(Precision.FP16)),
    "bf16.enabled": ("precision", _enabled(Precision.BF16)),
    "gradient_clipping": ("max_grad_norm", _arg("max_grad_norm")),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", _arg("gradient_accumulation_steps")),
    "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", _arg("per_device_train_batch_size")),
    "train_batch_size": ("per_device_train_batch_size, gradient_accumulation_steps, world_size", _train_batch),
}


def fill_in(data: dict[str, Any], pending: list[str], defaulted: list[str], args: TrainingArgs,
            unfilled: Unfilled = Unfilled.ERROR) -> tuple[list[str], list[Problem]]:
    """Fills `data` (the config's JSON form) in place from `args`: every `pending` "auto" key (an
    error when nothing fills it), and every `defaulted` key the arguments give, so that say
    gradient_accumulation_steps=4 in the arguments is not lost to the default 1.  Returns the keys
    filled and the problems."""
    filled: list[str] = []
    for path in defaulted:
        value = FILLERS[path][1](args, data) if path not in FILL_ONLY else None
        if value is not None and _get(data, path) is not _MISSING:
            _set(data, path, value)
            filled.append(path)
    problems: list[Problem] = []
    for path in sorted(pending, key=lambda p: p == "train_batch_size"):
        needs, filler = FILLERS[path]
        value = filler(args, data)
        if value is None and unfilled is Unfilled.KEEP:
            continue
        if value is None:
            names = [n.strip() for n in needs.split(",")]
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in names)
            keywords = ", ".join(f"{n}=..." for n in names)
            problems.append(Problem(path, f'is "auto" and nothing fills it: it is taken from {needs}',
                                    f"pass TrainingArgs({keywords}), or {flags} on the command line"))
            continue
        _set(data, path, value)
        filled.append(path)
    return filled, problems


def mismatches(data: Mapping[str, Any], written: list[str], args: TrainingArgs) -> list[Problem]:
    """Keys written out in the config that the training arguments give differently (the
    Transformers integration refuses these too).  The hidden-size buckets are exempt."""
    problems = []
    for path in written:
        needs, filler = FILLERS[path]
        if path in FILL_ONLY or (path == "scheduler.params.warmup_min_lr" and args.warmup_min_lr is None):
            continue
        given, wanted = _get(data, path), filler(args, data)
        if wanted is not None and given is not _MISSING and _normal(given) != _normal(wanted):
            problems.append(Problem(path, f"is {given!r} in the config but the training arguments give "
                                          f"{wanted!r} ({needs})", f'make them agree, or write "auto"'))
    return problems


_MISSING = object()


def _get(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _normal(value: Any) -> Any:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        data = data[key]
    data[last] = value
