"""The preemption choice (infinity/schedule/preempt.py) as pure functions on hand-written traces."""
from __future__ import annotations

from infinity.schedule import Phase, Trace, Use, preempt_for_miss, preempt_for_read_ahead

F, B = Phase.FORWARD, Phase.BACKWARD
SIZES = {0: 10, 1: 20, 2: 30, 3: 40}
# forward 0..3, then backward 3..0: the last forward module is the first backward one
TRACE = Trace((Use(0, F, (0,)), Use(1, F, (1,)), Use(2, F, (2,)), Use(3, F, (3,)),
               Use(3, B, (3,)), Use(2, B, (2,)), Use(1, B, (1,)), Use(0, B, (0,))), SIZES)


def test_a_read_ahead_used_later_gives_way_to_one_used_sooner():
    # after forward 3 (position 3): 3 is needed again at once, 2 next; reads ahead of 1 and 0 are farther
    assert preempt_for_read_ahead(TRACE, 3, 3, [1, 0]) == 0  # 0's backward is the farthest use
    assert preempt_for_read_ahead(TRACE, 3, 2, [1]) == 1


def test_no_read_ahead_gives_way_to_one_used_later():
    assert preempt_for_read_ahead(TRACE, 3, 0, [2, 1]) is None  # both are used before 0 is
    assert preempt_for_read_ahead(TRACE, 3, 1, [1]) is None  # not farther than itself
    assert preempt_for_read_ahead(TRACE, 3, 3, []) is None


def test_a_read_ahead_with_no_later_use_goes_first():
    # after backward 1 only 0 is used again: 2 and 3 never are (infinite distance; the higher goes on a tie)
    assert preempt_for_read_ahead(TRACE, 6, 0, [2, 3]) == 3
    assert preempt_for_miss(TRACE, 7, [2, 3]) == 3


def test_a_miss_always_takes_the_farthest_read_ahead():
    assert preempt_for_miss(TRACE, 0, [1, 2, 3]) == 3  # its forward is the farthest use: 20 + 30 elements away
    assert preempt_for_miss(TRACE, 3, [1, 2]) == 1  # backward 1 (70 elements away) is after backward 2 (40)
    assert preempt_for_miss(TRACE, 4, [0, 1]) == 0
    assert preempt_for_miss(TRACE, 0, []) is None


def test_off_the_trace_a_miss_takes_the_highest_partition():
    assert preempt_for_miss(None, None, [1, 3, 2]) == 3
    assert preempt_for_miss(TRACE, None, [0, 1]) == 1
