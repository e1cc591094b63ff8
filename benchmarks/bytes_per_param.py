"""NVMe bytes per parameter per step (issue 18) on a small fp32 MLP, parameters and optimizer on NVMe:
the steady step's report, and its bytes by kind (parameter, gradient, optimizer state) from the metrics'
transfer counters.  The byte counts are exact; the times are not the point.

    .venv/bin/python benchmarks/bytes_per_param.py --nvme_path swap [--sub_group_size 200000]
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch
from torch import nn

from infinity import metrics
from infinity.swap.optimizer import AdamSettings
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings


class Mlp(nn.Module):
    """layers × Linear(width, width, no bias) with ReLU, mean squared error against a target."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width, bias=False), nn.ReLU())])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x), y)


def by_kind(before: dict, after: dict, params: int) -> dict[str, float]:
    """Bytes per parameter moved between tiers in the step, by route and kind."""
    return {f"{k[1][0]}->{k[1][1]} {k[1][2]}": (after[k] - before.get(k, 0)) / params for k in after
            if k[0] == "infinity_tier_transfer_bytes_total" and after[k] != before.get(k, 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvme_path", required=True)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sub_group_size", type=int, default=1_000_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.nvme_path) as folder:
        settings = EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=folder,
                                  optimizer_nvme_path=folder, adam=AdamSettings(), sub_group_size=args.sub_group_size,
                                  optimizer_buffer_count=4)
        metrics.enable()
        engine = Engine(Mlp(args.width, args.layers), settings)
        gen = torch.Generator().manual_seed(1)
        try:
            for _ in range(args.steps):
                before = dict(metrics.TALLY.counters)
                x, y = torch.randn(8, args.width, generator=gen), torch.randn(8, args.width, generator=gen)
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                report = engine.step_report()
                print(report.line())
                print(json.dumps({"params": report.params, "loss": float(loss),
                                  "by_kind": by_kind(before, metrics.TALLY.counters, report.params)}))
        finally:
            engine.close()
            metrics.disable()


if __name__ == "__main__":
    main()
