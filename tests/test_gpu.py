"""The same behaviour on a CUDA GPU as on the CPU: surgery, reload, scoring, evaluation, training.

Every test here is skipped without CUDA (CI has none); they run on a GPU machine with
``python -m pytest tests/test_gpu.py``. Each one compares the GPU against an independent
computation: the CPU result of the same code, or masking against removal, as the CPU tests do.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from surgery_fixtures import inputs, logits, tiny_gpt2, tiny_llama
from training_fixtures import make_data, make_model

from sentinel_core.config import ExperimentConfig
from sentinel_core.evaluation import evaluate
from sentinel_core.model_io import load_model, save_model
from sentinel_core.strategies.gradient_scorer import gradient_scores
from sentinel_core.surgery import get_head_map, grow_heads, mask_heads, prune_heads
from sentinel_core.training import causal_lm_loss, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEL = {0: [1, 3], 1: [0, 2]}  # for LLaMA (2 KV heads of 2 queries): group 1 of layer 1 survives half
MAKERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(autouse=True)
def _exact_float32():
    # TF32 would make float32 matmuls on the GPU round differently from the CPU reference.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("family", sorted(MAKERS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_removed_heads_equal_masked_heads_on_the_gpu(family, attn, dtype):
    model = MAKERS[family](attn).to("cuda", dtype)
    x = inputs().to("cuda")
    masked = copy.deepcopy(model)
    mask_heads(masked, SEL)
    prune_heads(model, SEL)
    pruned_logits, masked_logits = logits(model, x).float(), logits(masked, x).float()
    # bf16 keeps 8 bits of mantissa: removal sums fewer terms, so it rounds differently.
    atol = 1e-5 if dtype == torch.float32 else 3e-2 * float(masked_logits.abs().max())
    torch.testing.assert_close(pruned_logits, masked_logits, atol=atol, rtol=0)
    # And the GPU agrees with the CPU on the pruned model (float32 only: bf16 kernels differ).
    if dtype == torch.float32:
        cpu = copy.deepcopy(model).to("cpu")
        torch.testing.assert_close(pruned_logits.cpu(), logits(cpu, x.cpu()), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pruned_and_grown_model_reloads_bit_identically_on_the_gpu(tmp_path, dtype):
    model = tiny_llama("sdpa").to("cuda", dtype)
    prune_heads(model, SEL)
    grow_heads(model, {1: 2}, generator=torch.Generator().manual_seed(0))
    x = inputs().to("cuda")
    before = logits(model, x)
    save_model(model, None, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m", device="cuda")
    assert next(loaded.parameters()).dtype == dtype and next(loaded.parameters()).is_cuda
    assert get_head_map(loaded).layers == get_head_map(model).layers
    assert torch.equal(logits(loaded, x), before)


def _batches(n: int = 3, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = inputs(batch=2, length=16, seed=seed + i)
        mask = torch.ones_like(ids)
        mask[1, 12:] = 0  # a padded row: padding must be handled the same way on both devices
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_gradient_scores_on_the_gpu_equal_the_cpu_scores():
    model = tiny_gpt2("eager")
    cpu = gradient_scores(copy.deepcopy(model), _batches()).scores
    gpu = gradient_scores(model.to("cuda"), _batches()).scores
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-7)


def test_entropy_scores_on_the_gpu_equal_the_cpu_scores():
    entropy = pytest.importorskip("sentinel_entropy.scorer")
    model = tiny_llama("sdpa")
    cpu = entropy.entropy_scores(copy.deepcopy(model), _batches()).scores
    gpu_model = model.to("cuda")
    gpu = entropy.entropy_scores(gpu_model, _batches()).scores
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)
    assert gpu_model.config._attn_implementation == "sdpa"  # eager only while scoring


def test_perplexity_on_the_gpu_equals_the_cpu_perplexity():
    model = tiny_gpt2("sdpa")
    ids = torch.randint(1, 100, (400,), generator=torch.Generator().manual_seed(3))
    cpu = evaluate(copy.deepcopy(model), ids, block_size=32, stride=16, device="cpu")
    gpu = evaluate(model, ids, block_size=32, stride=16, device="cuda")
    assert gpu.tokens == cpu.tokens
    assert gpu.loss == pytest.approx(cpu.loss, rel=1e-5)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_on_the_gpu_learns_and_keeps_float32_weights(tmp_path, precision):
    model, data = make_model(seed=0), make_data()
    config = ExperimentConfig(output_dir=str(tmp_path), device="cuda", mixed_precision=precision,
                              learning_rate=5e-3, batch_size=4, num_epochs=3, eval_every=8, patience=0,
                              checkpoint_every=16, quiet=True, seed=0)
    ids = data.validation.blocks
    with torch.no_grad():
        start_nll, count = causal_lm_loss(model(ids).logits, ids)
    result = train(model, data, config, stage="fine_tune")
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights
    assert math.isfinite(result.best_eval_loss)
    with torch.no_grad():
        end_nll, _ = causal_lm_loss(model.to("cpu")(ids).logits, ids)
    assert float(end_nll / count) < float(start_nll / count) - 1.0  # the toy language is learnable
