"""The partition state machine: every legal transition works, every illegal one raises."""
from __future__ import annotations

import itertools

import pytest

from infinity.memory.partition import LEGAL, IllegalTransition, Partition, State

PAIRS = list(itertools.product(State, State))


@pytest.mark.parametrize("current,wanted", PAIRS, ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_table_is_enforced(current, wanted):
    p = Partition("layer.0.weight", numel=10, element_size=4, state=current)
    if wanted in LEGAL[current]:
        assert p.move_to(wanted) is current and p.state is wanted
    else:
        with pytest.raises(IllegalTransition) as err:
            p.move_to(wanted)
        assert p.state is current  # nothing changed
        assert "layer.0.weight" in str(err.value) and current.value in str(err.value)


def test_clean_data_has_no_path_to_a_write():
    assert State.WRITING not in LEGAL[State.HOST_CLEAN]
    assert State.WRITING not in LEGAL[State.ON_COMPUTE]


def test_a_full_swap_cycle():
    p = Partition("w", numel=3, element_size=2)
    for s in (State.READING, State.HOST_CLEAN, State.ON_COMPUTE, State.HOST_DIRTY, State.WRITING,
              State.HOST_CLEAN, State.ON_NVME):
        p.move_to(s)
    assert p.state is State.ON_NVME and p.nbytes == 6
