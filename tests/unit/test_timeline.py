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
    assert complete[0]["tid"].startswith("compute ")
    begin, end = (next(e for e in events if e["ph"] == ph) for ph in ("b", "e"))
    assert begin["id"] == end["id"] and begin["ts"] <= end["ts"] and end["args"] == {"bytes": 4096}
    assert begin["ts"] >= complete[0]["ts"]
    assert any(e["ph"] == "i" and e["name"] == "step 1" for e in events)


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
    assert report.peak_live_elements == 150 and report.hit_ratio == 0.9
    assert report.step_s >= report.other_s >= 0
    assert set(report.to_dict()) >= {"step", "step_s", "other_s", "read_wait_s", "write_wait_s", "optimizer_s",
                                     "optimizer_io_wait_s", "bytes_read", "bytes_written", "prefetch_hits",
                                     "prefetch_late", "prefetch_misses", "peak_live_elements", "stall_ratio"}
    clock.live_changed(30)
    clock.reset()
    assert clock.peak_live == 30  # what is resident carries into the next step
