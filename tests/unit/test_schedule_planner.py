"""The stage-3 planner as pure functions on hand-written traces."""
from __future__ import annotations

import logging
import math

from infinity.schedule import Budgets, Cursor, Phase, Trace, Use, fetches_from, make_room, next_use_distance, \
    persistent_set, releases_after
from infinity.schedule.trace import CursorState

F, B = Phase.FORWARD, Phase.BACKWARD
SIZES = {0: 10, 1: 20, 2: 30, 3: 40, 9: 1}
# modules 0..3 each own partition of the same number; module 0 also owns the tiny partition 9
TRACE = Trace((Use(0, F, (0, 9)), Use(1, F, (1,)), Use(2, F, (2,)), Use(3, F, (3,)),
               Use(3, B, (3,)), Use(2, B, (2,)), Use(1, B, (1,)), Use(0, B, (0, 9))), SIZES)
NONE: frozenset[int] = frozenset()


def budgets(**kw) -> Budgets:
    return Budgets(**{"persistence_threshold": 0, **kw})


def test_prefetch_fills_the_bucket_in_order_of_use():
    assert fetches_from(TRACE, -1, NONE, budgets(prefetch_elements=61)) == (0, 9, 1, 2)
    assert fetches_from(TRACE, -1, NONE, budgets(prefetch_elements=60)) == (0, 9, 1)  # 2 would pass it
    assert fetches_from(TRACE, 0, frozenset({0, 9}), budgets(prefetch_elements=50)) == (1, 2)


def test_prefetch_stops_at_max_live_counting_what_is_held():
    assert fetches_from(TRACE, 0, frozenset({0}), budgets(max_live_elements=35)) == (1,)  # 10+20; +30 passes
    assert fetches_from(TRACE, 0, frozenset({0, 1}), budgets(max_live_elements=35)) == ()
    assert fetches_from(TRACE, 0, frozenset({0}), budgets(max_live_elements=60)) == (1, 2)


def test_persistence_threshold_and_model_total():
    parts = [(9, 1), (0, 10), (1, 20), (2, 30)]
    assert persistent_set(parts, Budgets(persistence_threshold=20)) == {9, 0, 1}
    assert persistent_set(parts, Budgets(persistence_threshold=20, model_persistence_threshold=11)) == {9, 0}
    assert persistent_set(parts, Budgets(persistence_threshold=0)) == frozenset()


def test_reuse_distance_counts_the_elements_in_between():
    assert next_use_distance(TRACE, 3, 3) == 0  # forward of 3, then straight to its backward
    assert next_use_distance(TRACE, 2, 2) == 80  # forward 3 (40) and backward 3 (40) in between
    assert next_use_distance(TRACE, 7, 0) == math.inf
    assert releases_after(TRACE, 2, frozenset({2}), budgets(max_reuse_distance=80)) == (2,)
    assert releases_after(TRACE, 2, frozenset({2}), budgets(max_reuse_distance=81)) == ()
    assert releases_after(TRACE, 3, frozenset({3}), budgets(max_reuse_distance=0)) == (3,)


def test_everything_goes_at_the_end_of_the_step():
    assert releases_after(TRACE, 7, frozenset({0, 1, 9}), budgets()) == (0, 1, 9)


def test_make_room_evicts_farthest_next_use_first_and_spares_the_needed():
    held = frozenset({0, 1, 2})
    assert make_room(TRACE, 2, held, 40, budgets(max_live_elements=70), frozenset({2})) == (0, 1)
    assert make_room(TRACE, 2, held, 10, budgets(max_live_elements=70)) == ()


def run_step(cursor: Cursor, uses) -> list[int | None]:
    out = [cursor.observe(u.module, u.phase, {p: SIZES[p] for p in u.partitions}) for u in uses]
    cursor.end_step()
    return out


def test_cursor_records_then_follows():
    cursor = Cursor()
    assert run_step(cursor, TRACE.uses) == [None] * 8
    assert cursor.trace is not None and cursor.trace.uses == TRACE.uses and dict(cursor.trace.sizes) == SIZES
    assert run_step(cursor, TRACE.uses) == list(range(8))
    assert cursor.invalidations == 0


def test_divergence_goes_on_demand_logs_once_and_retraces(caplog):
    cursor = Cursor()
    run_step(cursor, TRACE.uses)
    skipped = [u for u in TRACE.uses if u.module != 2]  # a module skipped (data-dependent control flow)
    with caplog.at_level(logging.WARNING, logger="infinity.schedule"):
        assert run_step(cursor, skipped) == [0, 1, None, None, None, None]
        assert cursor.state is CursorState.RECORDING and cursor.invalidations == 1
        assert run_step(cursor, skipped) == [None] * 6  # records the new order
        assert run_step(cursor, skipped) == list(range(6))  # and follows it
        run_step(cursor, TRACE.uses)  # diverges again
    assert cursor.invalidations == 2
    assert len([r for r in caplog.records if "left the recorded module order" in r.message]) == 1


def test_a_step_cut_short_is_a_divergence():
    cursor = Cursor()
    run_step(cursor, TRACE.uses)
    assert run_step(cursor, TRACE.uses[:4]) == [0, 1, 2, 3]
    assert cursor.invalidations == 1 and cursor.state is CursorState.RECORDING
