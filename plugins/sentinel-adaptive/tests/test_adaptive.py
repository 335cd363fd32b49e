"""The adaptive fine-tuner against a hand-written AdamW with a learning rate per weight entry."""

from __future__ import annotations

import math

import pytest
import torch
from sentinel_adaptive.plan import AdaptivePlan
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sentinel_core import plugins
from sentinel_core.config import ExperimentConfig
from sentinel_core.data import LMData, TokenSplit
from sentinel_core.errors import SentinelError
from sentinel_core.hookspecs import hookimpl
from sentinel_core.plugins import pm
from sentinel_core.surgery import grow_heads, prune_heads
from sentinel_core.training import cosine_schedule, train


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spin-waiting
    made these tests 20x slower; the setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


VOCAB, BLOCK, HEAD_DIM = 64, 16, 8


def gpt2(seed: int = 0, n_layer: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=BLOCK, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def operated_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Layer 0: head 1 removed and one head grown (id 4, last slot); layer 1: heads 0 and 2 removed;
    layer 2: untouched."""
    model = gpt2(seed)
    prune_heads(model, {0: [1], 1: [0, 2]})
    grow_heads(model, {0: 1}, generator=torch.Generator().manual_seed(1))
    return model


def data(n_train: int = 48) -> LMData:
    generator = torch.Generator().manual_seed(0)

    def split(n):
        starts = torch.randint(0, VOCAB, (n, 1), generator=generator)
        steps = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (n, 1), generator=generator)]
        blocks = (starts + steps * torch.arange(BLOCK)) % VOCAB
        return TokenSplit(ids=blocks.reshape(-1), blocks=blocks)

    return LMData(train=split(n_train), validation=split(4), test=None, block_size=BLOCK, source="toy",
                  validation_from_train=False)


def config(tmp_path, **overrides) -> ExperimentConfig:
    values = dict(device="cpu", batch_size=4, learning_rate=3e-3, num_epochs=1, eval_every=100, patience=0,
                  warmup_fraction=0.25, checkpoint_every=100, output_dir=str(tmp_path / "run"), quiet=True, seed=2,
                  fine_tune="adaptive",
                  options={"adaptive_boost": 3.0, "adaptive_growth_boost": 6.0, "adaptive_ramp": 0.5})
    values.update(overrides)
    return ExperimentConfig(**values)


def boost(step, total, peak, ramp):
    """The documented curve: linear 1 -> peak over ``ramp`` steps, then half a cosine back to 1."""
    if step < ramp:
        return 1 + (peak - 1) * step / ramp
    return 1 + (peak - 1) * 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))


class Snapshots:
    def __init__(self, model, stage="fine_tune"):
        self.model, self.stage, self.states, self.events = model, stage, {}, []

    @hookimpl
    def on_metric(self, event):
        if event.stage != self.stage:
            return
        self.events.append(event)
        if "loss" in event.values:
            self.states[event.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def run_with(recorder, fn):
    pm.register(recorder)
    try:
        return fn()
    finally:
        pm.unregister(recorder)


def grown_entries(name: str, shape) -> torch.Tensor:
    """By hand, from GPT-2's layout: layer 0 has slots [0, 2, 3, 4]; head 4 is slot 3 (entries 24..31)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    width = 4 * HEAD_DIM
    if name == "transformer.h.0.attn.c_attn.weight":
        for part in range(3):  # q | k | v column blocks
            mask[:, part * width + 24:part * width + 32] = True
    elif name == "transformer.h.0.attn.c_attn.bias":
        for part in range(3):
            mask[part * width + 24:part * width + 32] = True
    elif name == "transformer.h.0.attn.c_proj.weight":
        mask[24:32, :] = True
    return mask


def reference_adamw(model, lm_data, cfg, n_steps, boosts: bool):
    """AdamW written out with a learning-rate tensor per parameter (the per-entry rate the plugin
    promises), HF's loss, the loop's documented batch order, clipping and schedule."""
    blocks = lm_data.train.blocks
    total = min(blocks.shape[0] // cfg.batch_size, cfg.max_steps or 10**9)
    warmup = math.ceil(cfg.warmup_fraction * total)
    ramp = math.ceil(cfg.options["adaptive_ramp"] * total)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    named = list(model.named_parameters())
    moments = {name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in named}
    b1, b2, eps = 0.9, 0.999, 1e-8
    model.train()
    for step in range(n_steps):
        ids = blocks[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        base = cfg.learning_rate * cosine_schedule(step, total, warmup)
        t = step + 1
        with torch.no_grad():
            for name, p in named:
                m, v = moments[name]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                lr = torch.full_like(p, base)
                if boosts and name.startswith(("transformer.h.0.", "transformer.h.1.")):
                    lr *= boost(step, total, 3.0, ramp)
                    lr[grown_entries(name, p.shape)] = base * boost(step, total, 6.0, ramp)
                wd = 0.01 if p.ndim >= 2 else 0.0
                p.mul_(1 - lr * wd)
                p.sub_(lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps))
                p.grad = None
    return model


def test_touched_layers_and_grown_heads_get_their_own_rates(tmp_path, adaptive_plugin):
    cfg = config(tmp_path, max_steps=6)
    model = operated_gpt2()
    lm_data = data()
    snaps = Snapshots(model)
    result = run_with(snaps, lambda: plugins.fine_tune("adaptive", model=model, tokenizer=None, data=lm_data,
                                                     config=cfg, stage="fine_tune"))
    assert result.strategy == "adaptive"
    plan = result.extra["adaptive"]
    assert plan["touched_layers"] == [0, 1] and plan["grown_heads"] == {"0": [4]}
    assert [e for e in snaps.events if "adaptive_plan" in e.values]

    # The rates reported with every step follow the documented curves.
    steps = [e for e in snaps.events if "loss" in e.values]
    total, warmup, ramp = 6, 2, 3
    assert len(steps) == total
    for event in steps:
        s = event.step - 1
        base = 3e-3 * cosine_schedule(s, total, warmup)
        assert event.values["lr/base"] == pytest.approx(base)
        assert event.values["lr/touched"] == pytest.approx(base * boost(s, total, 3.0, ramp))
        assert event.values["lr/grown"] == pytest.approx(base * boost(s, total, 6.0, ramp))

    # The weights are what AdamW with those rates per entry gives...
    expected = reference_adamw(operated_gpt2(), lm_data, cfg, 6, boosts=True)
    got = snaps.states[6]
    for name, value in expected.state_dict().items():
        got_value = got[name]
        if name.endswith("attn.c_attn.bias"):
            # The key bias has an exactly zero gradient (softmax ignores a shift shared by all keys),
            # so Adam steps on rounding noise there; compare the query and value parts only.
            got_value, value = got_value.view(3, -1)[[0, 2]], value.view(3, -1)[[0, 2]]
        assert torch.allclose(got_value, value, atol=1e-5, rtol=0), name
    # ...and not what one rate for everything would give.
    plain = reference_adamw(operated_gpt2(), lm_data, cfg, 6, boosts=False).state_dict()
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight"):
        assert (got[name] - plain[name]).abs().max() > 1e-3, name


def test_an_unoperated_model_trains_exactly_like_plain(tmp_path, adaptive_plugin):
    a, b = gpt2(), gpt2()
    lm_data = data()
    snaps = Snapshots(a)
    run_with(snaps, lambda: plugins.fine_tune("adaptive", model=a, tokenizer=None, data=lm_data,
                                            config=config(tmp_path / "a", max_steps=4), stage="fine_tune"))
    train(b, lm_data, config(tmp_path / "b", max_steps=4, fine_tune="plain"), stage="fine_tune")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert all("lr" in e.values and "lr/touched" not in e.values for e in snaps.events if "loss" in e.values)


def test_attention_scope_boosts_only_attention_parameters():
    model = operated_gpt2()
    cfg = ExperimentConfig(options={"adaptive_scope": "attention"})
    plan = AdaptivePlan.from_model(model, cfg)
    expected = sum(p.numel() for layer in (0, 1) for p in model.transformer.h[layer].attn.parameters())
    assert plan.describe()["touched_parameters"] == expected
    whole = AdaptivePlan.from_model(model, ExperimentConfig())
    assert whole.describe()["touched_parameters"] == sum(
        p.numel() for layer in (0, 1) for p in model.transformer.h[layer].parameters())


def test_grown_gqa_groups_include_their_key_value_heads():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         hidden_size=32, intermediate_size=64, vocab_size=VOCAB, head_dim=8,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0))
    grow_heads(model, {0: 2, 1: 1}, generator=torch.Generator().manual_seed(0))
    plan = AdaptivePlan.from_model(model, ExperimentConfig())
    labels = {b.label for b in plan.blocks}
    # Layer 0: slots 4, 5 form a new group (kv slot 2); layer 1: slot 4 plus a dead slot 5, kv slot 2.
    for layer, q_slots in ((0, (4, 5)), (1, (4,))):
        for s in q_slots:
            assert f"layer {layer} q_proj.weight q{s}" in labels and f"layer {layer} o_proj.weight o{s}" in labels
        assert f"layer {layer} k_proj.weight k2" in labels and f"layer {layer} v_proj.weight v2" in labels
    assert not any(label.endswith(("k0", "k1", "v0", "v1")) for label in labels)
    o_block = next(b for b in plan.blocks if b.label == "layer 0 o_proj.weight o5")
    assert (o_block.dim, o_block.start, o_block.length) == (1, 40, 8)


def test_interrupted_adaptive_run_resumes_exactly(tmp_path, adaptive_plugin):
    lm_data = data()
    cfg = config(tmp_path, max_steps=6)
    reference = operated_gpt2()
    plugins.fine_tune("adaptive", model=reference, tokenizer=None, data=lm_data,
                    config=config(tmp_path / "ref", max_steps=6), stage="fine_tune")

    class Stop:
        @hookimpl
        def on_metric(self, event):
            if event.step == 3 and "loss" in event.values:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_with(Stop(), lambda: plugins.fine_tune("adaptive", model=operated_gpt2(), tokenizer=None, data=lm_data,
                                                 config=cfg, stage="fine_tune"))
    resumed = operated_gpt2()
    plugins.fine_tune("adaptive", model=resumed, tokenizer=None, data=lm_data, config=cfg, stage="fine_tune")
    for (name, x), y in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6, rtol=0), name


@pytest.mark.parametrize("options, message", [
    ({"adaptive_boost": 0}, "adaptive_boost"),
    ({"adaptive_growth_boost": "big"}, "adaptive_growth_boost"),
    ({"adaptive_ramp": 1.5}, "adaptive_ramp"),
    ({"adaptive_scope": "mlp"}, "adaptive_scope"),
])
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(SentinelError, match=message):
        AdaptivePlan.from_model(operated_gpt2(), ExperimentConfig(options=options))


def test_the_step_hook_leaves_other_optimizers_alone():
    plan = AdaptivePlan.from_model(operated_gpt2(), ExperimentConfig())
    plan.multiplier(0, 10, "touched")
    other = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([other], lr=0.1)
    with plan.grown_head_boost():
        other.grad = torch.ones(3)
        optimizer.step()
    assert torch.allclose(other.detach(), torch.full((3,), 0.9))
