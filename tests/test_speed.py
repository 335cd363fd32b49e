"""The interleaved speed comparison: what is timed, in which order, and how the ratio is formed.

The clock is replaced by a script of seconds per pass, so the arithmetic is checked exactly
(timings themselves are measured in bench/, never asserted in tests).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from surgery_fixtures import tiny_gpt2

from sentinel_core import speed
from sentinel_core.surgery import prune_heads


def test_ratio_is_the_median_of_paired_repeats_with_alternating_order(monkeypatch):
    before, after = tiny_gpt2(), tiny_gpt2()
    prune_heads(after, {0: [0, 1]})
    blocks = torch.zeros((6, 8), dtype=torch.long)
    # seconds per pass, in call order: 2 warm-ups, then repeats (before, after), (after, before), ...
    script = iter([9.0, 9.0, 2.0, 1.0, 1.25, 2.5, 4.0, 1.0, 1.0, 2.0])
    calls = []

    def fake_seconds(model, batches):
        calls.append(("before" if model is before else "after", len(batches), sum(b.shape[0] for b in batches)))
        return next(script)

    monkeypatch.setattr(speed, "_forward_seconds", fake_seconds)
    result = speed.compare_throughput(before, after, blocks, batch_size=4, repeats=4)
    assert [c[0] for c in calls] == ["before", "after", "before", "after", "after", "before", "before", "after",
                                     "after", "before"]
    assert calls[0][1:] == (1, 4) and all(c[1:] == (2, 6) for c in calls[2:])  # warm-up: one batch; then all blocks
    tokens = 6 * 8
    ratios = [2.0 / 1.0, 2.5 / 1.25, 4.0 / 1.0, 2.0 / 1.0]  # per repeat: before seconds / after seconds
    assert result["ratio"] == pytest.approx(statistics.median(ratios))
    assert result["ratio_range"] == pytest.approx([2.0, 4.0])
    assert result["tokens_per_second_before"] == pytest.approx(statistics.median([tokens / s for s in (2, 2.5, 4, 2)]))
    assert result["tokens_per_pass"] == tokens and result["repeats"] == 4 and result["method"] == "interleaved"


def test_models_come_back_in_their_own_mode_and_the_forward_really_runs():
    before, after = tiny_gpt2(), tiny_gpt2()
    after.train()
    result = speed.compare_throughput(before, after, torch.zeros((2, 8), dtype=torch.long), batch_size=2, repeats=1)
    assert not before.training and after.training
    assert result["tokens_per_second_before"] > 0 and result["ratio"] > 0
    with pytest.raises(ValueError, match="repeats"):
        speed.compare_throughput(before, after, torch.zeros((2, 8), dtype=torch.long), batch_size=2, repeats=0)


def test_the_summary_labels_a_skipped_or_failed_comparison_indicative(tmp_path, capsys):
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.run_measures import measure_speed, speed_summary

    results = {"baseline": {"tokens_per_second": 400.0}, "final": {"tokens_per_second": 716.0}}
    skipped = speed_summary({**results, "speed": measure_speed(tiny_gpt2(), "ignored", None,
                                                               ExperimentConfig(speed_repeats=0), "cpu")})
    assert skipped["method"] == "single-pass" and skipped["indicative"] is True
    assert skipped["ratio"] == pytest.approx(1.79) and "speed_repeats=0" in skipped["note"]
    failed = measure_speed(tiny_gpt2(), str(tmp_path / "moved-away"), torch.zeros((2, 8), dtype=torch.long),
                           ExperimentConfig(batch_size=2), "cpu")
    assert "does not exist" in failed["skipped"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Warning: the speed comparison is skipped")
    labelled = speed_summary({**results, "speed": failed})
    assert labelled["indicative"] is True and "the timed comparison failed" in labelled["note"]
