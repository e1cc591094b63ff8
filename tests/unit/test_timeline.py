"""The timeline writes Chrome trace events that Perfetto reads; the step report adds up."""
from __future__ import annotations

import json
import threading

from infinity.timeline import NO_TIMELINE, Timeline, Track
from infinity.zero.step_report import Outcome, StepClock, Wait


def test_spans_and_async_spans_become_trace_events(tmp_path):
    timeline = Timeline()
    with timeline.span("forward blocks.0", Track.COMPUTE, module=3):
        token = timeline.begin("read blocks.0.up.weight", Track.IO)
    done = threading.Thread(target=timeline.end, args=(token,), kwargs={"bytes": 4096}, name="aio")
    done.start()
    done.join()
    timeline.mark("step 1")
    events = json.loads(timeline.write(tmp_path / "t.json").read_text())["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert len(complete) == 1 and complete[0]["dur"] >= 0 and complete[0]["args"] == {"module": 3}
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert isinstance(complete[0]["tid"], int) and names[complete[0]["tid"]] == "compute MainThread"
    assert all(isinstance(e["tid"], int) and isinstance(e["pid"], int) for e in events)
    assert {names[e["tid"]] for e in events if e["ph"] != "M"} == {"compute MainThread", "io", "steps"}
    begin, end = (next(e for e in events if e["ph"] == ph) for ph in ("b", "e"))
    assert begin["id"] == end["id"] and begin["ts"] <= end["ts"] and end["args"] == {"bytes": 4096}
    assert begin["ts"] >= complete[0]["ts"]
    assert any(e["ph"] == "i" and e["name"] == "step 1" for e in events)


def test_rows_are_numbered_named_and_sorted_by_kind(tmp_path):
    """Each (kind, thread) row is its own numeric tid with thread_name and thread_sort_index metadata;
    compute sorts before waits, the optimizer and I/O whatever order they were first used in."""
    timeline = Timeline(process_name="infinity rank 0")
    with timeline.span("optimizer step", Track.OPTIMIZER):
        with timeline.span("wait read 0", Track.WAIT):
            pass
    worker = threading.Thread(target=lambda: timeline.complete("backward blocks.0", Track.COMPUTE,
                                                                timeline.now_us()), name="autograd")
    worker.start()
    worker.join()
    with timeline.span("forward", Track.COMPUTE):
        pass
    events = timeline.events()
    meta = [e for e in events if e["ph"] == "M"]
    assert {"name": "process_name", "ph": "M", "pid": meta[0]["pid"], "tid": 0,
            "args": {"name": "infinity rank 0"}} in meta
    names = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    sort = {names[e["tid"]]: e["args"]["sort_index"] for e in meta if e["name"] == "thread_sort_index"}
    assert set(names.values()) == {"optimizer MainThread", "wait MainThread", "compute autograd",
                                   "compute MainThread"}
    assert len(set(names)) == 4  # one tid each
    order = sorted(sort, key=sort.get)
    assert order[:2] == ["compute autograd", "compute MainThread"] and order[2:] == ["wait MainThread",
                                                                                     "optimizer MainThread"]


def test_back_to_back_spans_touch_and_never_overlap_after_rounding():
    """A span closed where the next begins (complete(..., end_us=)) ends at exactly the next one's start,
    however the fractional microseconds round; nested spans stay inside their parent."""
    timeline = Timeline()
    starts = [10.4, 10.6, 11.5, 12.49, 12.51, 20.0]
    for start, end in zip(starts, starts[1:]):
        timeline.complete("backward m", Track.COMPUTE, start, end)
    timeline.complete("backward", Track.COMPUTE, 10.4, 20.0)
    spans = [e for e in timeline.events() if e["ph"] == "X"]
    assert all(isinstance(e["ts"], int) and isinstance(e["dur"], int) for e in spans)
    modules = [e for e in spans if e["name"] == "backward m"]
    assert all(a["ts"] + a["dur"] == b["ts"] for a, b in zip(modules, modules[1:]))
    parent = next(e for e in spans if e["name"] == "backward")
    assert parent["ts"] == modules[0]["ts"] and parent["ts"] + parent["dur"] == modules[-1]["ts"] + modules[-1]["dur"]


def test_a_disabled_timeline_records_nothing():
    with NO_TIMELINE.span("x", Track.COMPUTE):
        NO_TIMELINE.end(NO_TIMELINE.begin("y", Track.IO))
    NO_TIMELINE.mark("z")
    assert NO_TIMELINE.events() == []


def test_step_clock_splits_the_step_and_tracks_peak_live():
    clock = StepClock()
    clock.live_changed(100)
    clock.live_changed(50)
    clock.live_changed(-150)
    clock.add_wait(Wait.READ, 0.0)
    clock.count(Outcome.HIT, 8)
    clock.count(Outcome.LATE)
    clock.count(Outcome.MISS)
    report = clock.report(step=1, bytes_read=10, bytes_written=20, invalidations=0)
    assert report.peak_live_elements == 150 and report.prefetch_uses == 10
    assert (report.hit_ratio, report.late_ratio, report.miss_ratio) == (0.8, 0.1, 0.1)  # late is not a hit
    assert report.step_s >= report.other_s >= 0
    assert set(report.to_dict()) >= {"step", "step_s", "other_s", "read_wait_s", "write_wait_s", "optimizer_s",
                                     "optimizer_io_wait_s", "bytes_read", "bytes_written", "prefetch_hits",
                                     "prefetch_late", "prefetch_misses", "peak_live_elements", "stall_ratio"}
    clock.live_changed(30)
    clock.reset()
    assert clock.peak_live == 30  # what is resident carries into the next step
