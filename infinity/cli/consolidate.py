"""`infinity-consolidate`: one full state dict from the per-rank folders of a checkpoint.

    infinity-consolidate CKPT_DIR OUT [--tag TAG] [--dtype fp32|bf16|fp16] [--format safetensors|torch]

Reads CKPT_DIR/TAG/rank_<r>/ (TAG: the one CKPT_DIR/latest names), joins each parameter's fp32 master
pieces in rank order, converts them to --dtype and writes OUT, which the plain torch model loads with
load_state_dict.  Exit status 2 for anything that is not one complete checkpoint, naming the path.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from infinity.checkpoint.consolidate import OutputDtype, consolidate
from infinity.checkpoint.state_dict_file import StateDictFormat
from infinity.errors import CheckpointError

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infinity-consolidate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="the folder engine.save_checkpoint saved into")
    parser.add_argument("out", metavar="OUT", help="the file to write (never overwritten)")
    parser.add_argument("--tag", help="the checkpoint tag (default: the one CKPT_DIR/latest names)")
    parser.add_argument("--dtype", choices=[d.value for d in OutputDtype], default=OutputDtype.FP32.value,
                        help="dtype of the parameters (default fp32, the master weights; buffers keep theirs)")
    parser.add_argument("--format", choices=[f.value for f in StateDictFormat], default="safetensors",
                        help="safetensors (default; streamed, memory near the largest tensor) or torch "
                        "(torch.save of the whole dict: memory near the whole model)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ns = build_parser().parse_args(argv)
    try:
        done = consolidate(ns.ckpt_dir, ns.out, ns.tag, OutputDtype(ns.dtype), StateDictFormat(ns.format))
    except CheckpointError as err:
        print(f"infinity-consolidate: {err}", file=sys.stderr)
        return EXIT_FAILED if err.__cause__ is not None else EXIT_INVALID  # writing OUT failed / bad input
    except OSError as err:
        print(f"infinity-consolidate: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{done.path}: {done.params} parameters and {done.buffers} buffers of tag {done.tag} from {done.world} "
          f"rank(s), {done.nbytes / 1e6:.1f} MB")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
