"""`infinity-estimate`: what a model will need on each tier (accelerator, host, NVMe) before trying.

    infinity-estimate --params 2783e6 --largest-layer 65e6 [--num-gpus 8 --num-nodes 2] [--config ds.json]
    infinity-estimate --model my_models:build_llama --step-seconds 2 --json
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Sequence

from infinity.config import Config
from infinity.config import Problems, as_count
from infinity.errors import ConfigError, Problem
from infinity.estimate import Cluster, ModelSize, build_on_meta, count_module, estimate
from infinity.estimate.report import table, to_json

EXIT_OK, EXIT_INVALID = 0, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinity-estimate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--params", type=float, metavar="N", help="total parameters (2783e6 is fine)")
    what.add_argument("--model", metavar="MODULE:FACTORY",
                      help="a callable returning an nn.Module; built on the meta device, nothing allocated")
    parser.add_argument("--largest-layer", type=float, metavar="N", help="parameters of the largest layer "
                        "(with --params)")
    parser.add_argument("--trained-params", type=float, metavar="N", help="of --params, those trained "
                        "(requires_grad; default all): frozen ones have no optimizer states")
    parser.add_argument("--num-gpus", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--config", metavar="FILE", help="a DeepSpeed-style config: its NVMe settings are used "
                        "and its own option is marked")
    parser.add_argument("--step-seconds", type=float, metavar="S", help="add the NVMe bytes per step and the "
                        "bandwidth that hides them in S seconds")
    parser.add_argument("--json", action="store_true", help="print JSON (bytes) instead of the table")
    return parser


def model_size(ns: argparse.Namespace) -> ModelSize:
    if ns.model:
        return count_module(build_on_meta(ns.model))
    problems = Problems()
    if ns.largest_layer is None:
        problems.add("--largest-layer", "is needed with --params", "give the parameters of the largest layer")
    total = as_count(ns.params, "--params", problems, minimum=1)
    layer = as_count(ns.largest_layer, "--largest-layer", problems, minimum=0) if ns.largest_layer is not None \
        else None
    trained = as_count(ns.trained_params, "--trained-params", problems, minimum=0) \
        if ns.trained_params is not None else None
    if problems or total is None or layer is None:
        raise ConfigError(problems.items, source="command line")
    return ModelSize(total, layer, trained_params=trained)


def run(ns: argparse.Namespace) -> str:
    if ns.step_seconds is not None and not 0 < ns.step_seconds < math.inf:  # NaN fails this too
        raise ConfigError([Problem("--step-seconds", f"must be a finite number above 0, got {ns.step_seconds}",
                                   "give the time of one training step in seconds")], source="command line")
    config = Config.load(ns.config) if ns.config else None
    result = estimate(model_size(ns), Cluster(ns.num_gpus, ns.num_nodes), config, ns.step_seconds)
    return json.dumps(to_json(result), indent=2) if ns.json else table(result)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ns = build_parser().parse_args(argv)
    try:
        print(run(ns))
    except ConfigError as err:
        print(f"infinity-estimate: {err}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
