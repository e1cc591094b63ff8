"""checkpoint.tag_validation across two gloo ranks: the same tag passes, different tags fail or warn."""
from __future__ import annotations

import torch.distributed as dist
import torch.multiprocessing as mp

from infinity.config.training import TagValidation
from infinity.errors import CheckpointError

CASES = [(("a", "a"), TagValidation.FAIL, "ok"), (("a", "b"), TagValidation.WARN, "ok"),
         (("a", "b"), TagValidation.IGNORE, "ok"), (("a", "b"), TagValidation.FAIL, "ranks save under different")]


def _rank(rank: int, init: str, results) -> None:
    from infinity.checkpoint.save import validate_tag
    from infinity.zero.ranks import current

    dist.init_process_group("gloo", init_method=init, world_size=2, rank=rank)
    try:
        ranks = current()
        for i, (tags, policy, _) in enumerate(CASES):
            try:
                validate_tag(tags[rank], policy, ranks)
                ranks.barrier("the next case")
                results[(rank, i)] = "ok"
            except CheckpointError as err:
                results[(rank, i)] = str(err)
    finally:
        dist.destroy_process_group()


def test_ranks_compare_their_tags(tmp_path):
    results = mp.Manager().dict()
    mp.start_processes(_rank, args=(f"file://{tmp_path / 'rendezvous'}", results), nprocs=2, start_method="spawn")
    for i, (_, _, want) in enumerate(CASES):
        assert want in results[(0, i)] and want in results[(1, i)], (CASES[i], dict(results))
