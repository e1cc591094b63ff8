"""`infinity-config check FILE [--set key.path=value ...] [training arguments]`.

Prints the resolved config as JSON with where each value came from, and the problems.
Exit status: 0 valid, 2 not.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from typing import Any, Sequence

from infinity.config import Config, Precision, TrainingArgs
from infinity.config.batch import BATCH_KEYS, batch_sizes
from infinity.config.auto import Unfilled
from infinity.errors import ConfigError, Problem

EXIT_VALID, EXIT_INVALID = 0, 2


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`key.path=value` pairs; a value is read as JSON when it parses (3, true, 1e8, "auto", [0.9, 0.99]),
    else taken as a string."""
    overrides: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(Problem(item, "is not key.path=value", "write it as zero_optimization.stage=3"))
            continue
        try:
            overrides[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            overrides[key.strip()] = text
    if problems:
        raise ConfigError(problems, source="--set")
    return overrides


def training_args(ns: argparse.Namespace) -> TrainingArgs:
    values = {f.name: getattr(ns, f.name) for f in fields(TrainingArgs) if getattr(ns, f.name) is not None}
    if "precision" in values:
        values["precision"] = Precision(values["precision"])
    return TrainingArgs(**values)


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training arguments (fill \"auto\"; names as in transformers)")
    kinds = {"learning_rate": float, "adam_beta1": float, "adam_beta2": float, "adam_epsilon": float,
             "weight_decay": float, "max_grad_norm": float, "warmup_min_lr": float}
    for f in fields(TrainingArgs):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "precision":
            group.add_argument(flag, choices=[p.value for p in Precision], default=None)
        else:
            group.add_argument(flag, type=kinds.get(f.name, int), default=None, metavar="N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinity-config", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a config, resolve \"auto\", print it with sources")
    check.add_argument("file", help="a DeepSpeed-style JSON config")
    check.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override one key (repeatable); the value is read as JSON when it parses")
    check.add_argument("--defer-auto", action="store_true",
                       help='leave "auto" that no argument fills pending (listed) instead of an error')
    _add_training_args(check)
    return parser


def check(ns: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """The report printed by `check`, and the exit status."""
    report: dict[str, Any] = {"file": ns.file, "valid": False}
    try:
        config = Config.load(ns.file, overrides=parse_set(ns.set))
        args = training_args(ns)
        config = config.resolve(args, Unfilled.KEEP if ns.defer_auto else Unfilled.ERROR)
        if not set(BATCH_KEYS) & set(config.pending_auto):
            batch_sizes(config, args.world_size or 1)  # the rules the engine applies at start
    except ConfigError as err:
        report["problems"] = [{"key": p.key, "message": p.message, "fix": p.fix} for p in err.problems]
        return report, EXIT_INVALID
    report.update(valid=True, config=config.to_dict(),
                  sources={key: source.value for key, source in sorted(config.sources.items())},
                  pending_auto=config.pending_auto,
                  no_effect=[{"key": key, "why": why} for key, why in config.no_effect()], problems=[])
    return report, EXIT_VALID


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ns = build_parser().parse_args(argv)
    report, status = check(ns)
    print(json.dumps(report, indent=2))
    for problem in report.get("problems", []):
        line = f"{problem['key']}: {problem['message']}" + (f" ({problem['fix']})" if problem["fix"] else "")
        print(f"problem: {line}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
