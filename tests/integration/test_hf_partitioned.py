"""Transformers models whose parameters live in partitions (issue 15): zero.Init keeps Transformers'
initialisation, GatheredParameters, parameters read outside their module, resize_token_embeddings."""
from __future__ import annotations

import pytest
import torch

import infinity

transformers = pytest.importorskip("transformers", reason="the transformers package is not installed")


def nvme_config(path, **zero):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                       "weight_decay": 0.01}},
            "zero_optimization": {"stage": 3, "sub_group_size": 20_000, "stage3_param_persistence_threshold": 0,
                                  "offload_param": {"device": "nvme", "nvme_path": str(path), "max_in_cpu": 0},
                                  "offload_optimizer": {"device": "nvme", "nvme_path": str(path), "buffer_count": 4},
                                  **zero}}


TINY = {
    "gpt2": lambda: (transformers.AutoModelForCausalLM, transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: (transformers.AutoModelForCausalLM, transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=64)),
    "t5": lambda: (transformers.AutoModelForSeq2SeqLM, transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, vocab_size=256)),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_from_config_under_init_starts_from_the_plain_builds_weights(tmp_path, name):
    auto, cfg = TINY[name]()
    torch.manual_seed(0)
    plain = dict(auto.from_config(cfg).named_parameters())
    torch.manual_seed(0)
    with infinity.zero.Init(config=nvme_config(tmp_path)) as init:
        model = auto.from_config(cfg)
    try:
        named = dict(model.named_parameters())
        assert named.keys() == plain.keys()
        assert all(p.data.numel() == 0 for p in named.values())  # every one really left
        for n, p in named.items():
            assert torch.equal(init.run.read_whole(p), plain[n].detach()), n
        largest = max(p.numel() * p.element_size() for p in plain.values())
        assert 0 < init.reopened_peak_bytes <= 2 * largest  # the parameters one function touches, not the model
    finally:
        init.run.close()


# ---- GatheredParameters ------------------------------------------------------------------------------
def gpt_and_batches():
    from training_reference import fresh_model, make_batches
    return fresh_model, make_batches()[:6]


def test_gathered_parameters_before_initialize_writes_zero_inits_partition(tmp_path):
    from training_reference import fresh_model
    with infinity.zero.Init(config=nvme_config(tmp_path)) as init:
        model = fresh_model()
    try:
        w = model.head.weight
        with infinity.zero.GatheredParameters(w):
            before = w.detach().clone()
            w.data.zero_()  # read-only block: dropped
        assert w.data.numel() == 0 and torch.equal(init.run.read_whole(w), before)
        with infinity.zero.GatheredParameters([w], modifier_rank=0):
            assert w.shape == before.shape
            w.data.fill_(0.5)
        assert w.data.numel() == 0 and torch.equal(init.run.read_whole(w), torch.full_like(before, 0.5))
    finally:
        init.run.close()


def test_gathered_parameters_after_initialize_changes_what_trains_on(tmp_path):
    """Halving one weight between steps through GatheredParameters(modifier_rank=0) trains exactly as
    halving it in plain torch: the new values reach the NVMe partition and the fp32 master weights."""
    from training_reference import ADAM, fresh_model, make_batches
    batches = make_batches()[:6]
    name = "blocks.0.up.weight"
    model = fresh_model()
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    want = []
    for k, (x, y) in enumerate(batches):
        if k == 3:
            with torch.no_grad():
                dict(model.named_parameters())[name].mul_(0.5)
        loss = model(x, y)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    want_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = nvme_config(tmp_path)
    cfg["train_micro_batch_size_per_gpu"] = 4
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    try:
        p = dict(engine.module.named_parameters())[name]
        got = []
        for k, (x, y) in enumerate(batches):
            if k == 3:
                with infinity.zero.GatheredParameters(p, modifier_rank=0):
                    halved = p.detach() * 0.5
                    p.data.mul_(0.5)
                assert p.data.numel() == 0  # partitioned again
                assert torch.equal(engine.parameter_values()[name], halved)  # read back from NVMe
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            got.append(loss.item())
        with infinity.zero.GatheredParameters(p):  # read-only: the change is dropped
            p.data.zero_()
        weights = engine.parameter_values()
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want, strict=True)), (got, want)
    assert float((weights[name] - want_weights[name]).norm() / want_weights[name].norm()) <= 1e-5


# ---- parameters read outside their module -----------------------------------------------------------
class PeerLinear(torch.nn.Module):
    """Uses another module's weight (peer, held in a list: not a submodule of this one)."""

    def __init__(self, peer: torch.nn.Linear):
        super().__init__()
        self.peer = [peer]
        self.bias = torch.nn.Parameter(torch.zeros(32))

    def forward(self, h):
        return torch.nn.functional.linear(h, self.peer[0].weight, self.bias)  # saves the Parameter itself


class ReadsInBackward(torch.autograd.Function):
    """Reads module.weight in backward only, where no forward saw it: undetectable."""

    @staticmethod
    def forward(ctx, h, module):
        ctx.module = module
        return h.clone()

    @staticmethod
    def backward(ctx, g):
        return g * ctx.module.weight, None


class TiedLm(torch.nn.Module):
    def __init__(self, backward_reader: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 32)
        self.mix = torch.nn.Linear(32, 32)
        self.peer = PeerLinear(self.mix)
        self.norm = torch.nn.LayerNorm(32)
        self.backward_reader = backward_reader

    def forward(self, x, y):
        h = torch.tanh(self.mix(self.embed(x)))
        h = torch.tanh(self.peer(h))
        if self.backward_reader:
            h = ReadsInBackward.apply(h, self.norm)
        vocab = self.embed.weight.shape[0]  # a metadata read: the real shape, nothing fetched
        logits = self.norm(h) @ self.embed.weight.t()  # the parent reads its child's weight
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))


def tied_batches():
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g)) for _ in range(6)]


def tied_model(backward_reader: bool = False) -> TiedLm:
    torch.manual_seed(0)
    return TiedLm(backward_reader)


def plain_run(model, batches):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for x, y in batches:
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_run(engine, batches):
    losses = []
    for x, y in batches:
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine.parameter_values()


def assert_close(got, want):
    (got_losses, got_weights), (want_losses, want_weights) = got, want
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got_losses, want_losses, strict=True)), \
        (got_losses, want_losses)
    for n, w in want_weights.items():
        assert float((got_weights[n] - w).norm() / w.norm()) <= 1e-5, n


def test_weights_read_outside_their_module_are_detected_and_train_as_torch(tmp_path):
    batches = tied_batches()
    want = plain_run(tied_model(), batches)
    engine, *_ = infinity.initialize(model=tied_model(), config=nvme_config(tmp_path))
    try:
        got = engine_run(engine, batches)
        assert set(engine.run.external.registered) == {("TiedLm", "embed.weight"), ("peer", "mix.weight")}
    finally:
        engine.close()
    assert_close(got, want)


def test_a_read_that_cannot_be_detected_is_named_with_its_fix(tmp_path):
    batches = tied_batches()
    engine, *_ = infinity.initialize(model=tied_model(backward_reader=True), config=nvme_config(tmp_path))
    try:
        loss = engine(*batches[0])
        with pytest.raises(infinity.ExternalParameterError, match=r"'norm.weight'.*register_external_parameter"):
            engine.backward(loss)
    finally:
        engine.close()


def test_register_external_parameter_serves_the_undetectable_read(tmp_path):
    batches = tied_batches()
    want = plain_run(tied_model(backward_reader=True), batches)
    model = tied_model(backward_reader=True)
    infinity.zero.register_external_parameter(model, model.norm.weight)  # before initialize: remembered
    engine, *_ = infinity.initialize(model=model, config=nvme_config(tmp_path))
    try:
        got = engine_run(engine, batches)
    finally:
        engine.close()
    assert_close(got, want)


# ---- resize_token_embeddings after initialize ---------------------------------------------------------
def lm_batches(vocab: int, steps: int):
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (2, 16), generator=g) for _ in range(steps)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def embeddings_of(model):
    return [model.get_input_embeddings().weight, model.get_output_embeddings().weight]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_resize_token_embeddings_after_initialize_trains_as_a_plain_resized_model(tmp_path, name):
    """Resized right after initialize (inside GatheredParameters with modifier_rank=0), the model trains
    exactly as the same model resized in plain Transformers and trained with torch AdamW."""
    auto, cfg = TINY[name]()
    batches = lm_batches(300, 4)
    torch.manual_seed(0)
    plain = auto.from_config(cfg)
    torch.manual_seed(1)
    plain.resize_token_embeddings(300, mean_resizing=False)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    want = []
    for ids in batches:
        loss = lm_loss(plain, ids)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    auto, cfg = TINY[name]()  # a fresh config: resizing changed the plain model's
    torch.manual_seed(0)
    engine, *_ = infinity.initialize(model=auto.from_config(cfg), config=nvme_config(tmp_path))
    try:
        model = engine.module
        torch.manual_seed(1)
        with infinity.zero.GatheredParameters(embeddings_of(model), modifier_rank=0):
            model.resize_token_embeddings(300, mean_resizing=False)
        assert model.get_input_embeddings().weight.data.numel() == 0  # partitioned again, at the new shape
        assert engine.run.shapes[engine.run.names.index(
            [n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight][0])][0] == 300
        got = []
        for ids in batches:
            loss = lm_loss(engine, ids)
            engine.backward(loss)
            engine.step()
            got.append(loss.item())
        weights = engine.parameter_values()
    finally:
        engine.close()
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want, strict=True)), (got, want)
    assert_weights_close(weights, {n: p.detach() for n, p in plain.named_parameters()}, len(batches))


def assert_weights_close(got, want, steps, rel=1e-5):
    """Per-parameter relative error at most rel; GPT-2's key bias as test_training.assert_same_weights says
    ([Note: the key bias] there: rounding noise that Adam turns into steps of about lr)."""
    for name, w in want.items():
        g = got[name]
        if name.endswith("c_attn.bias"):
            h = w.shape[0] // 3
            assert float((g[h:2 * h] - w[h:2 * h]).abs().max()) <= 2 * 1e-3 * steps
            g, w = torch.cat([g[:h], g[2 * h:]]), torch.cat([w[:h], w[2 * h:]])
        assert float((g - w).norm() / w.norm()) <= rel, name


def test_resize_token_embeddings_after_training_steps_trains_on(tmp_path):
    """Resized after two steps: the old rows keep their trained values, every other parameter its values and
    Adam state, and training goes on over the new tokens."""
    auto, cfg = TINY["gpt2"]()
    torch.manual_seed(0)
    engine, *_ = infinity.initialize(model=auto.from_config(cfg), config=nvme_config(tmp_path))
    try:
        model = engine.module
        for ids in lm_batches(256, 2):
            engine.backward(lm_loss(engine, ids))
            engine.step()
        before = engine.parameter_values()
        with infinity.zero.GatheredParameters(embeddings_of(model), modifier_rank=0):
            model.resize_token_embeddings(300)
        after = engine.parameter_values()
        assert after["transformer.wte.weight"].shape == (300, 64)
        assert torch.equal(after["transformer.wte.weight"][:256], before["transformer.wte.weight"])
        assert all(torch.equal(after[n], v) for n, v in before.items() if n != "transformer.wte.weight")
        losses = []
        for ids in lm_batches(300, 3):
            loss = lm_loss(engine, ids)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        trained = engine.parameter_values()["transformer.wte.weight"]
        assert not torch.equal(trained[256:], after["transformer.wte.weight"][256:])  # the new rows train
        assert engine.save_checkpoint(str(tmp_path / "ckpt"))  # the checkpoint view follows the new run
    finally:
        engine.close()


def test_gathered_parameters_with_two_ranks_keeps_the_modifier_ranks_values(tmp_path):
    """Two ranks (gathered_worker.py): rank 0's changes, made before initialize (zero.Init's partitions) and
    between steps (the engine's), reach both ranks' partitions; the run equals plain torch with the same
    changes, and the ranks agree."""
    from pathlib import Path

    from test_distributed import check_ran, launch, results
    from training_reference import ADAM, fresh_model, make_batches
    steps, changed_at = 6, 3
    check_ran(launch(tmp_path, 2, "nvme", steps=steps, worker=Path(__file__).with_name("gathered_worker.py")))
    model = fresh_model()
    with torch.no_grad():
        model.head.weight.mul_(2.0)
    opt = torch.optim.AdamW(model.parameters(), lr=ADAM.lr, betas=ADAM.betas, eps=ADAM.eps,
                            weight_decay=ADAM.weight_decay)
    want = []
    for step, (x, y) in enumerate(make_batches()[:steps]):
        if step == changed_at:
            with torch.no_grad():
                model.blocks[0].up.weight.mul_(0.5)
        loss = model(x, y)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    two = results(tmp_path, 2)
    for run in two:
        assert all(abs(g - w) <= 1e-4 * abs(w) for g, w in zip(run["losses"], want, strict=True)), run["losses"]
    for n, p in model.named_parameters():
        if n.endswith("qkv.bias"):
            continue  # [Note: the key bias] in test_training.py
        assert float((two[0]["weights"][n] - p.detach()).norm() / p.detach().norm()) <= 1e-4, n
        assert torch.equal(two[0]["weights"][n], two[1]["weights"][n]), n


def test_a_partitioned_weight_replaced_outside_gathered_parameters_is_refused(tmp_path):
    """Setting .data of a partitioned parameter outside the block would be undone silently by its next
    fetch: the engine refuses, naming the parameter and GatheredParameters."""
    from infinity.errors import UsageError
    from training_reference import fresh_model, make_batches
    cfg = nvme_config(tmp_path)
    cfg["train_micro_batch_size_per_gpu"] = 4
    engine, *_ = infinity.initialize(model=fresh_model(), config=cfg)
    try:
        engine.module.head.weight.data = torch.zeros(256, 64)
        with pytest.raises(UsageError, match=r"'head.weight' is partitioned.*GatheredParameters"):
            engine(*make_batches()[0])
    finally:
        engine.close()
