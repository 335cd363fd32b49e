"""LoRA on a LLaMA through train(): peft's layers replace the nn.Linear projections while it
trains, and the merge at the end must still find the attention layout (it once raised
"head surgery does not support LlamaForCausalLM" there, after training, found by bench_scale)."""

from __future__ import annotations

import copy

import pytest
import torch
from surgery_fixtures import tiny_llama
from training_fixtures import make_data

from sentinel_core.config import ExperimentConfig
from sentinel_core.surgery import get_head_map, mask_heads
from sentinel_core.training import train


def test_lora_on_a_llama_trains_and_merges_a_rank_r_update_keeping_masked_heads(tmp_path):
    pytest.importorskip("peft")
    model = tiny_llama(seed=0)
    mask_heads(model, {1: [2]})
    before = copy.deepcopy(model.state_dict())
    config = ExperimentConfig(device="cpu", batch_size=4, max_steps=3, num_epochs=1, eval_every=100, patience=0,
                              learning_rate=1e-2, checkpoint_every=100, output_dir=str(tmp_path), quiet=True,
                              seed=0, max_eval_blocks=2, lora_rank=2, lora_target_modules="attention")
    result = train(model, make_data(32), config, stage="fine_tune", select_on=None)
    assert result.steps == 3
    after = model.state_dict()
    assert set(after) == set(before)  # merged: no lora_ entries left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for k in changed)
    for key in changed:
        singular = torch.linalg.svdvals((after[key] - before[key]).double())
        assert int((singular > singular[0] * 1e-4).sum()) == 2, key
    assert get_head_map(model).masked(1) == [2]
    assert all(p.requires_grad for p in model.parameters())
