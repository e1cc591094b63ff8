"""Two engines in one process on one nvme_path: a student that trains and a reference model held fixed (run
forward only, under no_grad, never stepped), both built under zero.Init, as a distillation or a DPO
recipe does.  Each has its own run folder, locked for its life; neither takes the other's for dead."""
from __future__ import annotations

import pytest
import torch

import infinity
from infinity.errors import UsageError
from infinity.io.lock import Liveness, claim
from infinity.models.gpt import Gpt

from test_initialize import close_to, config
from training_reference import SPEC, make_batches, plain_torch_run


def student_and_reference(tmp_path):
    """The batches, plain torch's student losses, the config, a plain reference model, and a student and a
    reference built under zero.Init (the reference from the plain one's seed)."""
    batches = make_batches()[:4]
    want_losses, _ = plain_torch_run(batches)
    cfg = config(tmp_path)
    torch.manual_seed(1)
    plain_reference = Gpt(SPEC)
    torch.manual_seed(0)
    with infinity.zero.Init(config=cfg):
        student = Gpt(SPEC)
    torch.manual_seed(1)
    with infinity.zero.Init(config=cfg):
        reference = Gpt(SPEC)
    return batches, want_losses, cfg, plain_reference, student, reference


def test_a_student_and_a_fixed_reference_model_share_one_nvme_path(tmp_path):
    batches, want_losses, cfg, plain_reference, student, reference = student_and_reference(tmp_path)
    student_engine, *_ = infinity.initialize(model=student, config=cfg)
    try:
        reference_engine, *_ = infinity.initialize(model=reference, config=cfg)  # main: FileExistsError
        try:
            runs = sorted((tmp_path / "infinity-swap" / "rank-0").iterdir())
            assert len(runs) == 2 and all(claim(run / "lock")[0] is Liveness.LIVE for run in runs)
            losses, reference_losses, want_reference = [], [], []
            for x, y in batches:
                with torch.no_grad():
                    reference_losses.append(reference_engine(x, y).item())
                    want_reference.append(plain_reference(x, y).item())
                loss = student_engine(x, y)
                student_engine.backward(loss)
                student_engine.step()
                losses.append(loss.item())
        finally:
            reference_engine.close()
    finally:
        student_engine.close()
    assert close_to(losses, want_losses)
    assert reference_losses == want_reference  # bit for bit: the reference never changed
    assert list((tmp_path / "infinity-swap" / "rank-0").iterdir()) == []


def test_a_student_and_a_reference_frozen_with_requires_grad_false_share_one_nvme_path(tmp_path):
    """The reference frozen as DPO and distillation recipes freeze it (requires_grad_(False)): its parameters
    live in its own run's param swap file and no optimizer state is made for it anywhere."""
    batches, want_losses, cfg, plain_reference, student, reference = student_and_reference(tmp_path)
    reference.requires_grad_(False)
    student_engine, *_ = infinity.initialize(model=student, config=cfg)
    try:
        reference_engine, *_ = infinity.initialize(model=reference, config=cfg)
        try:
            folder = reference_engine.run.managers[0].store.folder
            assert sorted(p.name for p in folder.iterdir()) == ["lock", "param.swp"]  # no optimizer swap file
            losses, logits, want_logits = [], [], []
            for x, y in batches:
                with torch.no_grad():
                    logits.append(reference_engine(x))
                    want_logits.append(plain_reference(x))
                loss = student_engine(x, y)
                student_engine.backward(loss)
                student_engine.step()
                losses.append(loss.item())
            with pytest.raises(UsageError, match="no trainable parameters"):
                reference_engine.step()
        finally:
            reference_engine.close()
    finally:
        student_engine.close()
    assert close_to(losses, want_losses)
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))  # bit for bit
    assert list((tmp_path / "infinity-swap" / "rank-0").iterdir()) == []
