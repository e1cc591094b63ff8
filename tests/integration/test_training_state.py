"""The engine's TrainingState (zero/state.py): the legal moves, and a bare loss.backward() refused."""
from __future__ import annotations

import pytest

from infinity.errors import EngineFailed, UsageError
from infinity.swap.params import Tier
from infinity.zero import Engine
from infinity.zero.state import LEGAL, Phase, TrainingState

from test_training import settings
from training_reference import fresh_model, make_batches


def test_every_state_can_fail_and_failed_is_the_end():
    for state, nexts in LEGAL.items():
        assert (TrainingState.FAILED in nexts) is (state is not TrainingState.FAILED)
    phase = Phase()
    phase.fail(RuntimeError("disk gone"))
    with pytest.raises(UsageError, match="cannot go from failed to forward"):
        phase.to(TrainingState.FORWARD)
    with pytest.raises(EngineFailed, match="disk gone"):
        phase.check()


def test_step_from_idle_is_not_a_legal_move():
    phase = Phase()
    with pytest.raises(UsageError, match="cannot go from idle to stepping"):
        phase.to(TrainingState.STEPPING)


@pytest.mark.parametrize("param", [Tier.COMPUTE, Tier.NVME])
def test_a_bare_loss_backward_is_refused_and_latches_the_engine(tmp_path, param):
    """Before, it failed with an AttributeError (_boundary was first set in engine.backward)."""
    (x, y), = make_batches()[:1]
    engine = Engine(fresh_model(), settings(tmp_path, param, Tier.NVME))
    try:
        loss = engine(x, y)
        assert engine.phase.state is TrainingState.FORWARD
        with pytest.raises(UsageError, match=r"call engine\.backward\(loss\)"):
            loss.backward()
        assert engine.phase.state is TrainingState.FAILED
        with pytest.raises(EngineFailed, match=r"loss\.backward\(\) was called directly"):
            engine.step()
    finally:
        engine.close()


def test_the_states_of_one_accumulation_window(tmp_path):
    batches = make_batches()[:2]
    engine = Engine(fresh_model(), settings(tmp_path, Tier.NVME, Tier.NVME, gradient_accumulation_steps=2))
    seen = [engine.phase.state]
    try:
        for x, y in batches:
            loss = engine(x, y)
            seen.append(engine.phase.state)
            engine.backward(loss)
            seen.append(engine.phase.state)
            engine.step()
            seen.append(engine.phase.state)
    finally:
        engine.close()
    S = TrainingState
    assert seen == [S.IDLE, S.FORWARD, S.ACCUMULATING, S.ACCUMULATING, S.FORWARD, S.ACCUMULATING, S.IDLE]
    assert engine.global_steps == 1 and engine.micro_steps == 2
