"""The streaming safetensors writer: what safetensors itself reads back, alignment, checksum, and
that a failed or incomplete write leaves the file that was there."""
from __future__ import annotations

import crc32c

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from infinity.checkpoint.tensor_file import TensorFileWriter, TensorSpec, layout
from infinity.errors import CheckpointError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 5, generator=g).bfloat16(), "ids": torch.arange(199), "empty": torch.zeros(0),
            "flag": torch.tensor(True), "half": torch.randn(4096 * 10 + 1, generator=g).half(),
            "t": torch.randn(2, 3, generator=g).t()}  # not contiguous


def write(path, items, align=8, metadata=None):
    with TensorFileWriter(path, [TensorSpec.of(k, v) for k, v in items.items()], metadata, align) as out:
        for k, v in items.items():
            out.write(k, v)
    return out


@pytest.mark.parametrize("align", [8, 4096])
def test_safetensors_reads_back_every_tensor_and_the_checksum_is_the_files(tmp_path, align):
    items = tensors()
    out = write(tmp_path / "x.safetensors", items, align, {"format": "pt"})
    got = load_file(tmp_path / "x.safetensors")
    assert got.keys() == items.keys() and all(torch.equal(got[k], v) for k, v in items.items())
    data = (tmp_path / "x.safetensors").read_bytes()
    assert out.checksum == f"{crc32c.crc32c(data):08x}" and out.nbytes == len(data)
    assert out.layout.offsets[0][0] % align == 0
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left


def test_layout_offsets_tile_the_data():
    specs = [TensorSpec("a", torch.float32, (3,)), TensorSpec("b", torch.int8, (5,)), TensorSpec("c", torch.bool, ())]
    plan = layout(specs, align=4096)
    assert len(plan.header) == 4096 and plan.offsets == ((4096, 4108), (4108, 4113), (4113, 4114))
    with pytest.raises(CheckpointError, match="named twice"):
        layout(specs + specs[:1])
    with pytest.raises(CheckpointError, match="cannot be stored"):
        layout([TensorSpec("z", torch.complex64, (1,))])


def test_incomplete_or_wrong_writes_leave_the_previous_file(tmp_path):
    path = tmp_path / "x.safetensors"
    items = tensors()
    write(path, items)
    before = path.read_bytes()
    specs = [TensorSpec.of(k, v) for k, v in items.items()]
    with pytest.raises(CheckpointError, match="closed after 1 of"):
        with TensorFileWriter(path, specs) as out:
            out.write("w", items["w"])
    with pytest.raises(CheckpointError, match="should be 'w'"):
        with TensorFileWriter(path, specs) as out:
            out.write("ids", items["ids"])
    with pytest.raises(CheckpointError, match="should be 'w'"):
        with TensorFileWriter(path, specs) as out:
            out.write("w", items["w"].float())
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


def test_the_checkpoint_header_puts_every_tensor_on_a_4096_byte_boundary():
    """The checkpoint writer (infinity/checkpoint/tensors.py) builds its header with layout(): its data
    starts on ALIGNMENT and, with stored lengths of whole ALIGNMENT bytes, so does every tensor (O_DIRECT)."""
    import json
    import struct

    from infinity.checkpoint import tensors
    from infinity.checkpoint.format import ALIGNMENT, stored_numel
    from infinity.memory.stream import HostPart

    stored = [tensors.StoredTensor(n, d, stored_numel(k, d.itemsize), HostPart(torch.zeros(k, dtype=d)))
              for n, d, k in (("master/a", torch.float32, 5), ("b", torch.bfloat16, 3000), ("c", torch.int64, 1))]
    head = tensors.header(stored, {"k": "v"})
    assert len(head) % ALIGNMENT == 0
    entries = json.loads(head[8:8 + struct.unpack("<Q", head[:8])[0]])
    assert entries["__metadata__"] == {"k": "v"}
    assert all(entries[s.name]["data_offsets"][0] % ALIGNMENT == 0 for s in stored)
    assert [entries[s.name]["shape"] for s in stored] == [[s.numel] for s in stored]
