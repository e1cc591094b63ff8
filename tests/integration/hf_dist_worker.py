"""One rank of a two-rank from_pretrained / save_pretrained round trip, launched by
tests/integration/test_hf_pretrained.py as torchrun would start it (RANK, WORLD_SIZE, MASTER_*):

    python tests/integration/hf_dist_worker.py PRETRAINED OUT NVME_ROOT

Loads GPT-2 from PRETRAINED with each rank's piece of every parameter on its own NVMe folder, saves it
with engine.save_pretrained to OUT/before, trains 3 steps (each rank its half of each batch), saves to
OUT/after in small shards; rank 0 writes the trained values (engine.parameter_values()) to OUT/weights.pt."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import infinity  # noqa: E402
from infinity.integrations.transformers import from_pretrained  # noqa: E402
from hf_models import auto_class, batches, loss_of  # noqa: E402
from hf_rss_worker import config  # noqa: E402


def main() -> None:
    pretrained, out, nvme_root = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    nvme = os.path.join(nvme_root, f"rank{rank}")
    os.makedirs(nvme, exist_ok=True)
    cfg = config(nvme)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 100  # some replicated, the rest split
    model = from_pretrained(auto_class("gpt2"), pretrained, cfg)  # starts the process group
    engine, *_ = infinity.initialize(model=model, config=cfg)
    engine.save_pretrained(out / "before")
    for x in batches(3):
        loss = loss_of(engine, x[rank::world])
        engine.backward(loss)
        engine.step()
    weights = engine.parameter_values()
    engine.save_pretrained(out / "after", max_shard_size="20KB")
    if rank == 0:
        torch.save(weights, out / "weights.pt")
    engine.close()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
