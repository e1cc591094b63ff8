"""The coordinator's residency verbs (infinity/memory/residency.py) over each parameter's record: users,
kept and read ahead as one state per parameter with a table of legal moves."""
from __future__ import annotations

import pytest

from infinity.memory.record import IllegalTransition, Record, Residency
from infinity.memory.residency import Residence


def records(n: int) -> list[Record]:
    return [Record.resident_only(f"parameter {i}") for i in range(n)]


def test_a_use_a_keep_and_a_release():
    r = Residence(records(4), offloaded={1, 2, 3})
    r.read_ahead(2)
    assert r.reading() == {2} and r.resident() == set()
    assert r.use(2) is Residency.READ_AHEAD  # a use of a read ahead: hit or late
    assert r.use(2) is Residency.IN_USE and r.users(2) == 2  # a second module shares it
    assert not r.leave(2) and r.leave(2)  # the last user leaves
    r.keep(2)
    assert r.state(2) is Residency.KEPT and r.resident() == {2} and r.reading() == set()
    assert r.use(2) is Residency.KEPT  # a kept parameter's use is a hit
    r.rest(2)
    assert r.state(2) is Residency.AT_REST and r.users(2) == 0 and r.resident() == set()


def test_a_read_ahead_given_up_rests():
    r = Residence(records(2), offloaded={0, 1})
    r.read_ahead(0)
    r.rest(0)
    assert r.state(0) is Residency.AT_REST and r.reading() == set()


@pytest.mark.parametrize("moves", [("read_ahead", "read_ahead"), ("keep",), ("read_ahead", "keep")])
def test_moves_the_table_does_not_list_raise(moves):
    r = Residence(records(1), offloaded={0})
    with pytest.raises(IllegalTransition, match="parameter 0"):
        for move in moves:
            getattr(r, move)(0)


def test_the_moves_land_on_the_records_themselves():
    rs = records(2)
    r = Residence(rs, offloaded={0, 1})
    r.use(1)
    assert rs[1].residency is Residency.IN_USE and rs[1].users == 1 and r.resident() == {1}


def test_a_leave_without_a_use_raises_and_leaves_the_count_at_zero():
    from infinity.errors import InfinityError

    r = Residence(records(1), offloaded={0})
    r.use(0)
    assert r.leave(0)
    r.keep(0)
    with pytest.raises(InfinityError, match="a user left that never came"):
        r.leave(0)  # its one user left already
    assert r.users(0) == 0
