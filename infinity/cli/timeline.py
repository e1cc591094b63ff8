"""`infinity-timeline`: draws a trace that `infinity-train --trace` wrote as an SVG picture.

    infinity-timeline step.json step.svg
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from infinity.outputs import write_output
from infinity.timeline_svg import render

PROG = "infinity-timeline"
EXIT_OK, EXIT_INVALID = 0, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("trace", metavar="TRACE.json", help="Chrome trace events (infinity-train --trace FILE.json)")
    p.add_argument("svg", metavar="OUT.svg", help="the picture to write (its folder must exist)")
    p.add_argument("--title", help="the picture's title (default: the trace's file name)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    trace, svg = Path(ns.trace), Path(ns.svg)
    try:
        loaded = json.loads(trace.read_text())
    except OSError as err:
        print(f"{PROG}: {trace} cannot be read: {err.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except json.JSONDecodeError as err:
        print(f"{PROG}: {trace} is not JSON ({err}); pass the file infinity-train --trace wrote", file=sys.stderr)
        return EXIT_INVALID
    events = loaded.get("traceEvents") if isinstance(loaded, dict) else loaded  # the object or the array form
    if not isinstance(events, list):
        print(f"{PROG}: {trace} has no traceEvents list; pass the file infinity-train --trace wrote", file=sys.stderr)
        return EXIT_INVALID
    if not svg.resolve().parent.is_dir():
        print(f"{PROG}: {svg}: the folder {svg.resolve().parent} does not exist; create it or name a file in an "
              "existing folder", file=sys.stderr)
        return EXIT_INVALID
    write_output(svg, render(events, title=ns.title or trace.name))  # replaces a symlink there, never follows it
    print(f"{PROG}: wrote {svg}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
