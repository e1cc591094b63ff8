"""Checks of Chrome/Perfetto trace events, written from the Trace Event Format's rules (not from infinity's
writer): duration events of one (pid, tid) track pair up and nest strictly; async events pair up by id."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

Interval = tuple[float, float, str]


def thread_tracks(events: list[dict[str, Any]]) -> dict[tuple[Any, Any], list[Interval]]:
    """(pid, tid) -> the track's slices as (start, end, name): X events, and B/E pairs matched last-in
    first-out.  Raises AssertionError on an E without its B, a B never ended, or mismatched names."""
    tracks: dict[tuple[Any, Any], list[Interval]] = defaultdict(list)
    open_: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    for e in sorted((e for e in events if e["ph"] in "XBE"), key=lambda e: e["ts"]):
        key = (e["pid"], e["tid"])
        if e["ph"] == "X":
            tracks[key].append((e["ts"], e["ts"] + e["dur"], e["name"]))
        elif e["ph"] == "B":
            open_[key].append(e)
        else:
            assert open_[key], f"E of {e.get('name')} at {e['ts']} on {key} has no B"
            begin = open_[key].pop()
            assert e.get("name") in (None, begin["name"]), f"E {e['name']} closes B {begin['name']} on {key}"
            tracks[key].append((begin["ts"], e["ts"], begin["name"]))
    unended = {k: [b["name"] for b in v] for k, v in open_.items() if v}
    assert not unended, f"B events never ended: {unended}"
    return dict(tracks)


def partial_overlaps(slices: list[Interval]) -> list[tuple[Interval, Interval]]:
    """Pairs (enclosing, next) where next starts inside enclosing and ends after it."""
    found, stack = [], []
    for s in sorted(slices, key=lambda s: (s[0], -s[1])):
        while stack and stack[-1][1] <= s[0]:
            stack.pop()
        if stack and s[1] > stack[-1][1]:
            found.append((stack[-1], s))
        stack.append(s)
    return found


def async_pairs_problems(events: list[dict[str, Any]]) -> list[str]:
    """Nestable async events ("b"/"e") must pair up per (pid, cat, id), each e after its b."""
    opened: dict[tuple[Any, Any, Any], list[float]] = defaultdict(list)
    problems = []
    for e in sorted((e for e in events if e["ph"] in "be"), key=lambda e: (e["ts"], e["ph"] == "e")):
        key = (e["pid"], e.get("cat"), e["id"])
        if e["ph"] == "b":
            opened[key].append(e["ts"])
        elif not opened[key]:
            problems.append(f"e {e['name']} id {e['id']} has no b")
        else:
            opened[key].pop()
    problems += [f"b id {k[2]} never ended" for k, v in opened.items() if v]
    return problems
