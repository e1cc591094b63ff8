"""One record per partition (infinity/memory/record.py): every legal transfer move and residency move
works, every illegal one raises and changes nothing; a record with no swap file has no transfer state."""
from __future__ import annotations

import itertools

import pytest

from infinity.memory.record import LEGAL, RESIDENCY_LEGAL, IllegalTransition, Record, Residency, State

PAIRS = list(itertools.product(State, State))
RESIDENCY_PAIRS = list(itertools.product(Residency, Residency))


@pytest.mark.parametrize("current,wanted", PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_table_is_enforced(current, wanted):
    p = Record("layer.0.weight", numel=10, element_size=4, state=current)
    if wanted in LEGAL[current]:
        assert p.move_to(wanted) is current and p.state is wanted
    else:
        with pytest.raises(IllegalTransition) as err:
            p.move_to(wanted)
        assert p.state is current  # nothing changed
        assert "layer.0.weight" in str(err.value) and current.value in str(err.value)


@pytest.mark.parametrize("current,wanted", RESIDENCY_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in RESIDENCY_PAIRS])
def test_residency_table_is_enforced_beside_the_transfer_state(current, wanted):
    p = Record("layer.0.weight", numel=10, element_size=4, state=State.HOST_CLEAN, residency=current)
    if wanted in RESIDENCY_LEGAL[current]:
        assert p.reside(wanted) is current and p.residency is wanted
    else:
        with pytest.raises(IllegalTransition, match="residency move") as err:
            p.reside(wanted)
        assert p.residency is current and "layer.0.weight" in str(err.value)
    assert p.state is State.HOST_CLEAN  # a residency move leaves the transfer state alone


def test_clean_data_has_no_path_to_a_write():
    assert State.WRITING not in LEGAL[State.HOST_CLEAN]
    assert State.WRITING not in LEGAL[State.ON_COMPUTE]


def test_a_full_swap_cycle():
    p = Record("w", numel=3, element_size=2)
    for s in (State.READING, State.HOST_CLEAN, State.ON_COMPUTE, State.HOST_DIRTY, State.WRITING,
              State.HOST_CLEAN, State.ON_NVME):
        p.move_to(s)
    assert p.state is State.ON_NVME and p.nbytes == 6


def test_a_record_without_a_swap_file_has_residency_but_no_transfer_state():
    p = Record.resident_only("parameter 3")
    assert p.state is None and p.residency is Residency.AT_REST
    p.reside(Residency.IN_USE)
    with pytest.raises(IllegalTransition, match="no swap file"):
        p.move_to(State.READING)
    assert p.state is None and p.residency is Residency.IN_USE
