"""engine.save_checkpoint / load_checkpoint: exact resumption (also in a fresh process), durability
against SIGKILL mid-save, damaged files named, other models and world sizes refused, nothing unpickled."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from checkpoint_run import PAUSED, SAVE_AT, STEPS, settings, train
from tmpfs import size_limited_tmpfs
from training_reference import SPEC, fresh_model, make_batches, train_with_schedule
from infinity.checkpoint.format import (ALIGNMENT, LATEST, MANIFEST, MODEL_FILE, OPTIMIZER_FILE, STATE_FILE,
                                        open_rank, read_latest)
from infinity.checkpoint.tensors import read_header
from infinity.errors import CheckpointError, EngineFailed, UsageError
from infinity.models.gpt import Gpt, GptSpec
from infinity.swap.params import Tier
from infinity.zero import Engine, Precision

SCRIPT = Path(__file__).with_name("checkpoint_run.py")
TIERS = [(Tier.NVME, Tier.NVME, Precision.FP32), (Tier.HOST, Tier.HOST, Precision.FP32),
         (Tier.COMPUTE, Tier.COMPUTE, Precision.FP32), (Tier.NVME, Tier.HOST, Precision.FP32),
         (Tier.HOST, Tier.NVME, Precision.FP32), (Tier.NVME, Tier.NVME, Precision.BF16),
         (Tier.NVME, Tier.NVME, Precision.FP16)]


@pytest.fixture(scope="module")
def batches():
    return make_batches()[:STEPS]


def uninterrupted(nvme: Path, batches, **extra) -> tuple[list[float], dict[str, torch.Tensor]]:
    engine = Engine(fresh_model(), settings(str(nvme), **extra))
    try:
        return train(engine, batches), engine.parameter_values()
    finally:
        engine.close()


def saved_at_step_5(nvme: Path, ckpt: Path, batches, client_state=None, model=None, **extra) -> Engine:
    """An engine trained SAVE_AT steps that has saved ckpt (left open: the caller closes it)."""
    engine = Engine(model or fresh_model(), settings(str(nvme), **extra))
    train(engine, batches[:SAVE_AT])
    engine.save_checkpoint(str(ckpt), client_state=client_state)
    return engine


def test_resume_in_a_fresh_process_equals_an_uninterrupted_run(tmp_path, batches):
    want_losses, want_weights = uninterrupted(tmp_path, batches)
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches).close()
    out = tmp_path / "resumed.safetensors"
    subprocess.run([sys.executable, str(SCRIPT), "resume", str(tmp_path / "ckpt"), str(tmp_path), str(out)],
                   check=True, timeout=300)
    got = load_file(str(out))
    assert got.pop("__losses__").tolist() == want_losses[SAVE_AT:]
    assert got.keys() == want_weights.keys()
    assert all(torch.equal(got[name], want_weights[name]) for name in want_weights)


@pytest.mark.parametrize("param,optimizer,precision", TIERS,
                         ids=[f"param-{p.value}-opt-{o.value}-{x.value}" for p, o, x in TIERS])
def test_resume_equals_an_uninterrupted_run(tmp_path, batches, param, optimizer, precision):
    extra = dict(param=param, optimizer=optimizer, precision=precision)
    want_losses, want_weights = uninterrupted(tmp_path, batches, **extra)
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches, client_state={"epoch": 3, "seen": [1, 2]}, **extra).close()
    engine = Engine(fresh_model(), settings(str(tmp_path), **extra))
    try:
        path, client_state = engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert path == str(tmp_path / "ckpt" / "global_step5") and client_state == {"epoch": 3, "seen": [1, 2]}
        assert engine.global_steps == SAVE_AT
        assert train(engine, batches[SAVE_AT:]) == want_losses[SAVE_AT:]
        got = engine.parameter_values()
    finally:
        engine.close()
    assert all(torch.equal(got[name], want_weights[name]) for name in want_weights)


@pytest.mark.parametrize("same_tag", [False, True], ids=["new_tag", "same_tag"])
def test_sigkill_while_saving_keeps_the_previous_checkpoint(tmp_path, batches, same_tag):
    """Killed while writing the step-7 save: `latest` still names the step-5 save, which loads and
    resumes exactly, also when the killed save was under the same tag (its files were written aside)."""
    ckpt = tmp_path / "ckpt"
    tags = ["keep", "keep"] if same_tag else ["global_step5", "global_step7"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "hang", str(ckpt), str(tmp_path), *tags],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == PAUSED  # optimizer.safetensors of step 7 written, not renamed
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert read_latest(ckpt) == tags[0]
    aside = ckpt / tags[1] / ".rank_0.saving"
    assert any(p.name.startswith(f".{OPTIMIZER_FILE}.tmp-") for p in aside.iterdir())
    assert (ckpt / tags[0] / "rank_0" / MANIFEST).exists()  # the previous save, whole
    assert (ckpt / tags[1] / "rank_0").exists() == same_tag  # a new tag has no rank folder until it is complete
    want_losses, want_weights = uninterrupted(tmp_path, batches)
    engine = Engine(fresh_model(), settings(str(tmp_path)))
    try:
        if not same_tag:
            with pytest.raises(CheckpointError, match="the save of tag 'global_step7' did not finish"):
                engine.load_checkpoint(str(ckpt), tag="global_step7")
        engine.load_checkpoint(str(ckpt))
        assert engine.global_steps == SAVE_AT
        assert train(engine, batches[SAVE_AT:]) == want_losses[SAVE_AT:]
        # saving the interrupted tag again clears what the killed save left
        engine.save_checkpoint(str(ckpt), tag=tags[1])
        assert read_latest(ckpt) == tags[1] and not aside.exists()
        assert sorted(p.name for p in (ckpt / tags[1]).iterdir()) == ["rank_0"]
    finally:
        engine.close()


def damaged(tmp_path: Path, batches) -> tuple[Engine, Path]:
    """A fresh engine beside a checkpoint saved at step 5."""
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches).close()
    return Engine(fresh_model(), settings(str(tmp_path))), tmp_path / "ckpt" / "global_step5" / "rank_0"


def test_a_truncated_file_is_named_with_its_sizes(tmp_path, batches):
    engine, folder = damaged(tmp_path, batches)
    try:
        size = (folder / MODEL_FILE).stat().st_size
        os.truncate(folder / MODEL_FILE, size - ALIGNMENT)
        with pytest.raises(CheckpointError) as err:
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert str(folder / MODEL_FILE) in str(err.value)
        assert f"is {size - ALIGNMENT} bytes, the manifest says {size}" in str(err.value)
        train(engine, batches[:1])  # refused before anything changed: the engine goes on
    finally:
        engine.close()


@pytest.mark.parametrize("name", [OPTIMIZER_FILE, MODEL_FILE, STATE_FILE])
def test_one_altered_byte_is_named_with_its_checksums(tmp_path, batches, name):
    engine, folder = damaged(tmp_path, batches)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        want = next(f["checksum"] for f in manifest["files"] if f["name"] == name)
        data = bytearray((folder / name).read_bytes())
        data[-5] ^= 0x01
        (folder / name).write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as err:
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert str(folder / name) in str(err.value) and f"the manifest says {want}" in str(err.value)
        assert "crc32c is" in str(err.value) and "altered" in str(err.value)
        if name != STATE_FILE:  # found while streaming in: the engine's state is no longer trusted
            with pytest.raises(EngineFailed, match="CheckpointError"):
                train(engine, batches[:1])
    finally:
        engine.close()


def test_a_checkpoint_checksummed_with_sha256_still_loads(tmp_path, batches):
    """Checkpoints of infinity before crc32c name sha256 in the manifest: they load exactly, and a damaged
    file is named with sha256; a manifest naming an unknown algorithm is refused, naming the manifest."""
    want_losses, want_weights = uninterrupted(tmp_path, batches)
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches).close()
    folder = tmp_path / "ckpt" / "global_step5" / "rank_0"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["checksum"] == "crc32c"
    manifest["checksum"] = "sha256"
    for entry in manifest["files"]:
        entry["checksum"] = hashlib.sha256((folder / entry["name"]).read_bytes()).hexdigest()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    engine = Engine(fresh_model(), settings(str(tmp_path)))
    try:
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert train(engine, batches[SAVE_AT:]) == want_losses[SAVE_AT:]
        assert all(torch.equal(w, engine.parameter_values()[n]) for n, w in want_weights.items())
    finally:
        engine.close()
    data = bytearray((folder / STATE_FILE).read_bytes())
    data[-2] ^= 0x01
    (folder / STATE_FILE).write_bytes(bytes(data))
    engine = Engine(fresh_model(), settings(str(tmp_path)))
    try:
        with pytest.raises(CheckpointError, match="sha256 is [0-9a-f]{64}, the manifest says"):
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        manifest["checksum"] = "md5"
        (folder / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError) as err:
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert str(folder / MANIFEST) in str(err.value) and "names checksum 'md5'" in str(err.value)
        assert "crc32c, sha256" in str(err.value)
    finally:
        engine.close()


def test_another_model_is_refused_with_what_differs(tmp_path, batches):
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches).close()
    other = Gpt(GptSpec(vocab=SPEC.vocab, context=SPEC.context, hidden=SPEC.hidden, layers=SPEC.layers + 1,
                        heads=SPEC.heads))
    other.tokens.weight = torch.nn.Parameter(torch.zeros(SPEC.vocab + 1, SPEC.hidden))
    engine = Engine(other, settings(str(tmp_path)))
    try:
        with pytest.raises(CheckpointError) as err:
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        message = str(err.value)
        assert "holds another model" in message and "infinity-consolidate" in message
        assert "parameters only in this model: blocks.2.ln1.weight, blocks.2.ln1.bias" in message
        assert "parameters that differ: tokens.weight shape [256, 64] in the checkpoint, [257, 64] here" in message
        assert "length 16384 in the checkpoint, 16448 here" in message
    finally:
        engine.close()


def test_another_world_size_is_refused(tmp_path, batches):
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches).close()
    path = tmp_path / "ckpt" / "global_step5" / "rank_0" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["world"] = 2  # as if rank 0 of two ranks had written it
    path.write_text(json.dumps(manifest))
    engine = Engine(fresh_model(), settings(str(tmp_path)))
    try:
        with pytest.raises(CheckpointError, match="rank 0 of a world of 2 ranks; this is rank 0 of 1") as err:
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert "infinity-consolidate CKPT_DIR OUT" in str(err.value)
    finally:
        engine.close()


class Opaque:
    """Something torch.load(weights_only=True) will not build."""


def test_unsafe_client_state_is_refused_before_anything_is_written(tmp_path, batches):
    engine = Engine(fresh_model(), settings(str(tmp_path)))
    try:
        train(engine, batches[:1])
        with pytest.raises(CheckpointError, match="client_state holds an object that torch.load.weights_only=True. "
                                                  "refuses") as err:
            engine.save_checkpoint(str(tmp_path / "ckpt"), client_state={"fine": 1, "bad": Opaque()})
        assert "Opaque" in str(err.value)
        assert not (tmp_path / "ckpt").exists()
    finally:
        engine.close()


def test_every_file_loads_without_unpickling(tmp_path, batches):
    state = {"step": torch.tensor(5), "name": "run", "lrs": [0.1, 0.2], "nested": {"a": (1, 2.5, None)}}
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches, client_state=state).close()
    assert (tmp_path / "ckpt" / LATEST).read_text() == "global_step5\n"
    folder = tmp_path / "ckpt" / "global_step5" / "rank_0"
    for path in folder.iterdir():
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert all(f.get_tensor(k) is not None for k in f.keys())
            head, entries = read_header(path)
            if path.name in (MODEL_FILE, OPTIMIZER_FILE):  # data and every tensor 4096-aligned: O_DIRECT
                assert len(head) % ALIGNMENT == 0
                assert all(e["data_offsets"][0] % ALIGNMENT == 0 for e in entries.values())
        elif path.suffix == ".pt":
            loaded = torch.load(path, weights_only=True)
            assert loaded["nested"] == state["nested"] and torch.equal(loaded["step"], state["step"])
        else:
            assert path.suffix == ".json"
            json.loads(path.read_text())
    open_rank(tmp_path / "ckpt").verify()


def test_random_generators_and_counters_come_back(tmp_path, batches):
    engine = saved_at_step_5(tmp_path, tmp_path / "ckpt", batches)
    try:
        draws = (torch.rand(3), random.random(), np.random.rand())
        train(engine, batches[SAVE_AT:SAVE_AT + 1])
        engine.load_checkpoint(str(tmp_path / "ckpt"))  # into the same engine, a step later
        assert engine.global_steps == SAVE_AT and engine.micro_steps == SAVE_AT
        again = (torch.rand(3), random.random(), np.random.rand())
        assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]
        assert all(float(s) == SAVE_AT for s in engine.optimizer.steps)
    finally:
        engine.close()


def test_buffers_and_frozen_parameters_round_trip(tmp_path, batches):
    def model():
        m = fresh_model()
        m.register_buffer("seen", torch.arange(7, dtype=torch.int64))
        m.frozen = torch.nn.Parameter(torch.linspace(0, 1, 5000), requires_grad=False)
        return m

    engine = saved_at_step_5(tmp_path, tmp_path / "ckpt", batches, model=model())
    engine.close()
    fresh = model()
    fresh.seen.zero_()
    fresh.frozen.data.zero_()
    engine = Engine(fresh, settings(str(tmp_path)))
    try:
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        # the frozen parameter lives on the param tier like the others (docs/engine.md, "Frozen parameters")
        frozen = engine.parameter_values()["frozen"]
        assert torch.equal(fresh.seen, torch.arange(7)) and torch.equal(frozen, torch.linspace(0, 1, 5000))
        files = open_rank(tmp_path / "ckpt")
        assert torch.equal(files.buffer("seen"), torch.arange(7))
        assert files.param("frozen").frozen and not files.param("head.weight").frozen
    finally:
        engine.close()


def test_save_and_load_refuse_a_step_half_done(tmp_path, batches):
    engine = Engine(fresh_model(), settings(str(tmp_path), gradient_accumulation_steps=2))
    try:
        x, y = batches[0]
        loss = engine(x, y)
        with pytest.raises(UsageError, match="step half done"):
            engine.save_checkpoint(str(tmp_path / "ckpt"))
        engine.backward(loss)
        engine.step()  # the first micro-batch of two: the window is still open
        with pytest.raises(UsageError, match="step half done"):
            engine.load_checkpoint(str(tmp_path / "ckpt"))
        train(engine, batches[1:2])
        engine.save_checkpoint(str(tmp_path / "ckpt"), tag="window-closed")
        assert read_latest(tmp_path / "ckpt") == "window-closed"
    finally:
        engine.close()


def test_a_checkpoint_loads_into_other_tiers_and_sub_groups(tmp_path, batches):
    want_losses, want_weights = uninterrupted(tmp_path, batches)
    saved_at_step_5(tmp_path, tmp_path / "ckpt", batches).close()
    engine = Engine(fresh_model(), settings(str(tmp_path), param=Tier.HOST, optimizer=Tier.HOST,
                                            sub_group_size=5_000))
    try:
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert train(engine, batches[SAVE_AT:]) == want_losses[SAVE_AT:]
        got = engine.parameter_values()
    finally:
        engine.close()
    assert all(torch.equal(got[name], want_weights[name]) for name in want_weights)


def test_loading_into_a_live_engine_refreshes_kept_host_copies(tmp_path, batches):
    """offload_param.max_in_cpu: parameters keep host copies beside their swap files; a load into the
    same engine, two steps on, overwrites both, and the run goes on as if it had stopped at step 5."""
    want_losses, _ = uninterrupted(tmp_path, batches, param_max_in_cpu=10 ** 9)
    engine = saved_at_step_5(tmp_path, tmp_path / "ckpt", batches, param_max_in_cpu=10 ** 9)
    try:
        train(engine, batches[SAVE_AT:SAVE_AT + 2])
        assert engine.run.homes[0].kept  # host copies are in use
        engine.load_checkpoint(str(tmp_path / "ckpt"))
        assert train(engine, batches[SAVE_AT:]) == want_losses[SAVE_AT:]
    finally:
        engine.close()


def test_a_full_disk_fails_the_save_and_training_goes_on(tmp_path, batches):
    """The checkpoint folder on a real 1 MiB tmpfs: optimizer.safetensors (1.8 MB) does not fit.  The
    save raises a CheckpointError naming the file and the cause (the AioError: ENOSPC or a short write, the
    temporary file's path), removes what it wrote, the tag folder included, leaves `latest` alone, and the
    run trains on exactly as if no save had been tried."""
    import errno

    from infinity.errors import AioError, CheckpointError

    with size_limited_tmpfs(tmp_path / "small", "1m") as folder:
        want_losses, _ = uninterrupted(tmp_path, batches)
        engine = Engine(fresh_model(), settings(str(tmp_path)))
        try:
            train(engine, batches[:SAVE_AT])
            with pytest.raises(CheckpointError) as err:
                engine.save_checkpoint(str(folder))
            cause = err.value.__cause__
            # ENOSPC, or a short write when the kernel wrote what fitted; both name the path and free space
            assert isinstance(cause, AioError) and cause.errno in (errno.ENOSPC, errno.EIO)
            assert f".{OPTIMIZER_FILE}.tmp-" in err.value.path and err.value.path in str(err.value)
            assert "free space" in str(err.value)
            assert not (folder / LATEST).exists() and list(folder.iterdir()) == []  # nothing left, not even the tag
            assert train(engine, batches[SAVE_AT:]) == want_losses[SAVE_AT:]
        finally:
            engine.close()


def test_initialize_with_a_warmup_schedule_resumes_its_position(tmp_path, batches):
    """Through infinity.initialize: the lr schedule continues where it was, and the manifest holds the
    resolved config."""
    import infinity

    from training_reference import ADAM

    zero = {"stage": 3, "sub_group_size": 20_000, "stage3_param_persistence_threshold": 0,
            "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)},
            "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 4}}
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": ADAM.lr, "weight_decay": ADAM.weight_decay}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                         "warmup_num_steps": 8, "warmup_type": "linear"}}}

    def run(steps, save=False, load=False):
        engine, _, _, scheduler = infinity.initialize(model=fresh_model(), config=cfg)
        try:
            if load:
                engine.load_checkpoint(str(tmp_path / "ckpt"))
            lrs_and_losses = train_with_schedule(engine, scheduler, steps)
            if save:
                engine.save_checkpoint(str(tmp_path / "ckpt"))
            return lrs_and_losses, engine.config.to_dict()
        finally:
            engine.close()

    (want_lrs, want_losses), resolved = run(batches)
    run(batches[:SAVE_AT], save=True)
    (lrs, losses), _ = run(batches[SAVE_AT:], load=True)
    assert lrs == want_lrs[SAVE_AT:] and losses == want_losses[SAVE_AT:]  # steps 6-10
    assert open_rank(tmp_path / "ckpt").manifest.config == resolved
