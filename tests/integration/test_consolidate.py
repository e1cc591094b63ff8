"""infinity-consolidate: a real checkpoint of the small GPT (world 1, and split into 2 ranks per the
shard layout) becomes one state dict equal to the engine's parameters that the plain model loads
strictly; bad input is exit status 2 naming the path, with nothing overwritten."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from infinity.checkpoint.consolidate import OutputDtype, consolidate
from infinity.checkpoint.format import MANIFEST, OPTIMIZER_FILE, RankFiles, rank_dir
from infinity.checkpoint.state_dict_file import StateDictFormat
from infinity.cli.consolidate import EXIT_INVALID, EXIT_OK, main
from infinity.swap.params import Tier
from infinity.zero import Engine, EngineSettings

from checkpoint_split import split
from test_save_16bit_model import Tagged, trained
from training_reference import ADAM, fresh_model

TAG = "global_step3"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint folder of world 1, its 2-rank split, the engine's parameter values, buffers)."""
    root = tmp_path_factory.mktemp("ckpt")
    swap = root / "swap"
    swap.mkdir()
    settings = EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(swap),
                              optimizer_nvme_path=str(swap), adam=ADAM, sub_group_size=20_000,
                              persistence_threshold=100)
    engine = trained(Engine(Tagged(), settings), steps=3)
    try:
        engine.save_checkpoint(root / "one")
        values = engine.parameter_values()
    finally:
        engine.close()
    # layer norms held whole by every rank, as the persistence threshold keeps them; the rest split
    replicated = frozenset(n for n in values if ".ln" in n or n.startswith("gpt.ln"))
    split(root / "one", TAG, root / "two", world=2, replicated=replicated)
    split(root / "one", TAG, root / "three", world=3)  # 3 does not divide 64 x n: the last part is padded
    assert torch.equal(values["scale"], torch.full((3,), 0.5))  # frozen: a parameter of the engine, unchanged
    return root / "one", root / "two", values, {"seen": torch.arange(5)}


def load_strictly(state: dict[str, torch.Tensor]) -> Tagged:
    model = Tagged()
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("which", ["one", "two", "three"])
def test_consolidation_equals_the_engines_parameters_and_loads_strictly(saved, tmp_path, which):
    one, two, values, buffers = saved
    ckpt = one.parent / which
    if which == "two":  # the split is real: rank 1 holds the second half of a weight, a layer norm whole
        head, norm = (RankFiles(rank_dir(two, TAG, 1)).param(n) for n in ("gpt.head.weight", "gpt.ln.weight"))
        assert (head.start, head.length, head.real) == (head.numel // 2, head.numel // 2, head.numel // 2)
        assert norm.replicated and (norm.start, norm.length) == (0, norm.numel)
    if which == "three":
        last = RankFiles(rank_dir(ckpt, TAG, 2)).param("gpt.ln.weight")
        assert (last.numel, last.start, last.length, last.real) == (64, 44, 22, 20)
    assert main([str(ckpt), str(tmp_path / "model.safetensors")]) == EXIT_OK
    got = load_file(tmp_path / "model.safetensors")
    assert got.keys() == values.keys() | buffers.keys()
    assert all(torch.equal(got[k], v) for k, v in values.items())  # fp32 run: the masters are the weights
    assert all(torch.equal(got[k], v) for k, v in buffers.items())
    model = load_strictly(got)
    assert torch.equal(model.gpt.blocks[1].up.weight, values["gpt.blocks.1.up.weight"])


def test_dtype_tag_and_torch_format(saved, tmp_path):
    _, two, values, _ = saved
    done = consolidate(two, tmp_path / "m.bin", tag=TAG, dtype=OutputDtype.BF16, how=StateDictFormat.TORCH)
    assert done.world == 2 and done.tag == TAG and done.params == len(values) and done.buffers == 1
    got = torch.load(tmp_path / "m.bin", weights_only=True)
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.bfloat16()) for k, v in values.items())
    assert got["seen"].dtype == torch.int64
    load_strictly(got)


def tied_model() -> torch.nn.Module:
    """The small GPT with its output head tied to the token embedding (as GPT-2 and many others are):
    named_parameters lists the weight once, state_dict under both keys."""
    model = fresh_model()
    model.head.weight = model.tokens.weight
    return model


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("how", [StateDictFormat.SAFETENSORS, StateDictFormat.TORCH])
def test_a_tied_parameter_is_written_under_each_of_its_keys(tmp_path, world, how):
    (tmp_path / "swap").mkdir()
    settings = EngineSettings(param_tier=Tier.NVME, optimizer_tier=Tier.NVME, param_nvme_path=str(tmp_path / "swap"),
                              optimizer_nvme_path=str(tmp_path / "swap"), adam=ADAM, sub_group_size=20_000)
    engine = trained(Engine(tied_model(), settings), steps=2)
    try:
        engine.save_checkpoint(tmp_path / "one", tag=TAG)
        values = engine.parameter_values()
    finally:
        engine.close()
    assert "head.weight" not in values and RankFiles(rank_dir(tmp_path / "one", TAG, 0)).param(
        "tokens.weight").aliases == ("head.weight",)
    ckpt = tmp_path / "one"
    if world == 2:
        split(tmp_path / "one", TAG, tmp_path / "two", world=2)
        ckpt = tmp_path / "two"
    out = tmp_path / ("model.safetensors" if how is StateDictFormat.SAFETENSORS else "model.bin")
    consolidate(ckpt, out, how=how)
    got = load_file(out) if how is StateDictFormat.SAFETENSORS else torch.load(out, weights_only=True)
    assert torch.equal(got["head.weight"], values["tokens.weight"]) and torch.equal(got["tokens.weight"],
                                                                                   values["tokens.weight"])
    model = tied_model()
    model.load_state_dict(got, strict=True)
    assert model.head.weight is model.tokens.weight and torch.equal(model.head.weight, values["tokens.weight"])


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    subprocess.run(["cp", "-r", str(folder), str(target)], check=True)
    return target


def refused(argv, capsys) -> str:
    assert main([str(a) for a in argv]) == EXIT_INVALID
    return capsys.readouterr().err


def test_bad_input_is_exit_2_naming_the_path_and_the_fix(saved, tmp_path, capsys):
    _, two, _, _ = saved
    out = tmp_path / "out.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no `latest` file" in (err := refused([empty, out], capsys)) and str(empty) in err and "--tag" in err
    assert "is not a folder" in refused([tmp_path / "nowhere", out], capsys)
    err = refused([two, out, "--tag", "global_step9"], capsys)
    assert "no tag 'global_step9'" in err and f"tags found: {TAG}" in err
    ckpt = copy_of(two, tmp_path)
    os.rename(rank_dir(ckpt, TAG, 1), tmp_path / "moved")
    err = refused([ckpt, out], capsys)
    assert str(rank_dir(ckpt, TAG, 1)) in err and "says 2 ranks" in err and "copy every rank's folder" in err
    os.rename(tmp_path / "moved", rank_dir(ckpt, TAG, 1))
    manifest = rank_dir(ckpt, TAG, 1) / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace('"world": 2', '"world": 3'))
    assert "rank 1 of world 3; expected rank 1 of 2" in refused([ckpt, out], capsys)
    manifest.write_text(text)
    opt = rank_dir(ckpt, TAG, 1) / OPTIMIZER_FILE
    data = bytearray(opt.read_bytes())
    data[-5] ^= 0xFF
    opt.write_bytes(bytes(data))
    err = refused([ckpt, out], capsys)
    assert str(opt) in err and "crc32c is" in err and "altered" in err
    assert not out.exists()


def test_an_existing_out_is_left_as_it_is(saved, tmp_path, capsys):
    one, _, _, _ = saved
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    assert "exists already" in refused([one, out], capsys)
    assert out.read_bytes() == b"keep me"


def test_the_console_front_end_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                       os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "infinity.cli.consolidate", str(tmp_path), str(tmp_path / "o")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == EXIT_INVALID and "Traceback" not in run.stderr
    assert run.stderr.startswith("infinity-consolidate: checkpoint ") and str(tmp_path) in run.stderr
