"""infinity-train on real data: --hf-config with a seq2seq model (T5), --data from a text, .npy or .bin file,
--save and --resume, and --seq checked against the model's positions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infinity.cli.train import EXIT_INVALID, main
from infinity.models.data import Target, read_tokens

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30


def small(tmp_path: Path, *more: str) -> list[str]:
    swap = tmp_path / "swap"
    swap.mkdir(exist_ok=True)
    return ["--nvme_path", str(swap), "--batch", "2", "--seq", "16", *more]


def steps_of(path: Path) -> list[tuple[int, float]]:
    return [(s["step"], s["loss"]) for s in json.loads(path.read_text())["steps"]]


def test_t5_on_a_text_file_saved_and_resumed_equals_the_run_that_went_on(tmp_path):
    transformers.T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                          eos_token_id=1).save_pretrained(tmp_path / "t5")
    (tmp_path / "text.txt").write_text(TEXT)
    run = small(tmp_path, "--hf-config", str(tmp_path / "t5"), "--data", str(tmp_path / "text.txt"))
    assert main([*run, "--steps", "4", "--json", str(tmp_path / "whole.json")]) == 0
    assert main([*run, "--steps", "2", "--save", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "latest").read_text().strip() == "global_step2"
    assert main([*run, "--steps", "2", "--resume", str(tmp_path / "ck"), "--json", str(tmp_path / "more.json")]) == 0
    whole, more = steps_of(tmp_path / "whole.json"), steps_of(tmp_path / "more.json")
    assert [s for s, _ in more] == [3, 4]
    assert more == whole[2:]


def test_seq_beyond_the_models_positions_is_refused_clearly(tmp_path, capsys):
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=256,
                            n_positions=32).save_pretrained(tmp_path / "gpt2")
    argv = ["--hf-config", str(tmp_path / "gpt2"), "--nvme_path", str(tmp_path), "--seq", "64", "--steps", "1"]
    assert main(argv) == EXIT_INVALID
    err = capsys.readouterr().err
    assert "--seq: 64 is longer than the model's limit of 32 positions" in err and "Traceback" not in err
    assert main(["--tokenizer", str(tmp_path), "--steps", "1"]) == EXIT_INVALID
    assert "tokenizes a text --data FILE; give --data too" in capsys.readouterr().err


def test_token_files_npy_and_bin_and_a_local_tokenizer(tmp_path):
    ids = np.arange(300, dtype=np.int64) % 200
    np.save(tmp_path / "ids.npy", ids)
    ids.astype("<u2").tofile(tmp_path / "ids.bin")
    npy, binary = read_tokens(str(tmp_path / "ids.npy"), 256), read_tokens(str(tmp_path / "ids.bin"), 256)
    assert torch.equal(npy.ids, binary.ids) and npy.ids.tolist() == ids.tolist()
    (x, y), = npy.batches(batch=2, context=8, first=1, count=1)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x[0, 0] == 2 * 9  # batch 1 starts at sequence 2
    (x, y), = npy.batches(batch=1, context=8, first=0, count=1, target=Target.CONTINUATION)
    assert x.tolist() == [list(range(8))] and y.tolist() == [list(range(8, 16))]
    with pytest.raises(ValueError, match="token id 199, beyond the model's vocabulary of 100"):
        read_tokens(str(tmp_path / "ids.npy"), 100)
    (tmp_path / "t.txt").write_text("héllo")
    assert read_tokens(str(tmp_path / "t.txt"), 256).ids.tolist() == list("héllo".encode())
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    (tmp_path / "w.txt").write_text("hello world hello")
    assert read_tokens(str(tmp_path / "w.txt"), 256, str(tmp_path / "tok")).ids.tolist() == [1, 2, 1]


def test_the_built_in_gpt_trains_on_a_npy_file(tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(2000) % 97)
    out = tmp_path / "run.json"
    assert main(small(tmp_path, "--steps", "2", "--hidden", "64", "--layers", "1", "--heads", "4", "--vocab",
                      "128", "--data", str(tmp_path / "ids.npy"), "--json", str(out))) == 0
    assert [s for s, _ in steps_of(out)] == [1, 2]


def test_the_guides_config_with_its_auto_values_drives_infinity_train(tmp_path, caplog):
    """The 14 "auto" values of the Transformers guide's config take Transformers' default TrainingArguments,
    --batch and the model's hidden size."""
    guide = json.loads((Path(__file__).parents[2] / "infinity/config/shipped/hf-zero3-nvme.json").read_text())
    for block in ("offload_param", "offload_optimizer"):
        guide["zero_optimization"][block]["nvme_path"] = str(tmp_path / "swap")
    (tmp_path / "guide.json").write_text(json.dumps(guide))
    out = tmp_path / "run.json"
    argv = small(tmp_path, "--config", str(tmp_path / "guide.json"), "--steps", "2", "--hidden", "64", "--layers",
                 "1", "--heads", "4", "--vocab", "128", "--json", str(out))
    assert main(argv) == 0
    assert "from Transformers' default TrainingArguments" in caplog.text
    # warmup_steps 0 fills warmup_num_steps 0, which DeepSpeed's WarmupLR stretches to 2 steps, spending its
    # first value (warmup_min_lr "auto" = 0) twice (docs/config.md): both steps run at lr 0
    assert [s["lr"] for s in json.loads(out.read_text())["steps"]] == [0.0, 0.0]
